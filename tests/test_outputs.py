"""The three output files are written all or nothing, and --out / --labels are checked before any sample."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.engine.commands import certify_command
from certseg.engine.commands.certify_command import CertifyRequest, run_certify
from certseg.engine.core.certify import certify, radius
from certseg.engine.core.pipeline import CertifiedSegmentation
from certseg.engine.errors import InputError
from certseg.engine.files import outputs
from certseg.engine.files.images import read_labels
from certseg.engine.models.registry import shipped_models
from certseg.engine.runtimes import session as session_module

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)


def result_with(labels: np.ndarray, num_classes: int = 3) -> CertifiedSegmentation:
    """A certified map equal to ``labels`` (every pixel agreed in all n = 100 samples)."""
    certificate = certify(labels, np.full(labels.shape, 100), 100, tau=0.75, alpha=0.1)
    return CertifiedSegmentation(certificate=certificate, labels=certificate.labels(num_classes),
                                 num_classes=num_classes, sigma=0.25, radius=radius(0.25, 0.75), n0=10, n=100, seed=1)


IMAGE = np.random.default_rng(0).random((3, 6, 8), dtype=np.float32)
FIRST = result_with(np.zeros((6, 8), dtype=np.uint8))
SECOND = result_with(np.tile(np.arange(8, dtype=np.uint8) % 3, (6, 1)))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in the folder, hidden ones included, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def check_json_vouches_for_the_maps(folder: Path) -> None:
    """The contract of the JSON: if present, it names the sha256 of exactly the PNGs beside it."""
    report = folder / "im.json"
    if not report.exists():
        return
    recorded = json.loads(report.read_text())["outputs"]
    for entry in recorded.values():
        assert hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def test_a_rerun_replaces_all_three_files_and_the_json_vouches_for_the_new_maps(tmp_path: Path) -> None:
    outputs.write_outputs(tmp_path, "im", IMAGE, FIRST, {"run": 1})
    outputs.write_outputs(tmp_path, "im", IMAGE, SECOND, {"run": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.certified.png", "im.json", "im.overlay.png"]
    np.testing.assert_array_equal(read_labels(tmp_path / "im.certified.png"), SECOND.labels)
    assert json.loads((tmp_path / "im.json").read_text())["run"] == 2
    check_json_vouches_for_the_maps(tmp_path)
    with Image.open(tmp_path / "im.overlay.png") as overlay:
        assert overlay.format == "PNG" and overlay.size == (8, 6)


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_the_overlay_leaves_the_earlier_run_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs.write_outputs(tmp_path, "im", IMAGE, FIRST, {"run": 1})
    before = snapshot(tmp_path)
    monkeypatch.setattr(outputs, "write_rgb_png", disk_full)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_outputs(tmp_path, "im", IMAGE, SECOND, {"run": 2})
    assert snapshot(tmp_path) == before  # same files, same bytes, no temporary file left


@pytest.mark.parametrize("failing_sync", [1, 2, 3])
def test_disk_full_at_any_file_leaves_no_partial_new_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_sync: int
) -> None:
    """ENOSPC surfacing when the certified map, the overlay or the JSON is flushed; a first run into an empty
    folder then leaves nothing at all."""
    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) == failing_sync:
            disk_full()
        real_fsync(descriptor)

    outputs.write_outputs(tmp_path / "earlier", "im", IMAGE, FIRST, {"run": 1})
    before = snapshot(tmp_path / "earlier")
    monkeypatch.setattr(outputs.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        outputs.write_outputs(tmp_path / "earlier", "im", IMAGE, SECOND, {"run": 2})
    assert snapshot(tmp_path / "earlier") == before
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        outputs.write_outputs(tmp_path / "fresh", "im", IMAGE, SECOND, {"run": 2})
    assert snapshot(tmp_path / "fresh") == {}


def test_a_crash_between_renames_never_leaves_a_json_vouching_for_other_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs.write_outputs(tmp_path, "im", IMAGE, FIRST, {"run": 1})
    real_replace = os.replace
    done = []

    def replace_then_crash(source: object, target: object) -> None:
        if done:
            raise OSError(errno.EIO, "crash")
        done.append(target)
        real_replace(source, target)

    monkeypatch.setattr(outputs.os, "replace", replace_then_crash)
    with pytest.raises(OSError):
        outputs.write_outputs(tmp_path, "im", IMAGE, SECOND, {"run": 2})
    check_json_vouches_for_the_maps(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def refuse_to_open(*args: object, **kwargs: object) -> None:
    raise AssertionError("the session was opened")


@pytest.mark.parametrize("layout", ["out is a file", "a file above out"])
def test_an_out_that_is_a_file_fails_before_the_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if layout == "out is a file" else tmp_path / "taken" / "sub"
    monkeypatch.setattr(certify_command.Session, "open", refuse_to_open)
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_certify(CertifyRequest(image=EXAMPLE, out=out, progress=False))
    assert (tmp_path / "taken").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_fails_before_the_models_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setattr(certify_command.Session, "open", refuse_to_open)
    with pytest.raises(InputError, match="cannot write"):
        run_certify(CertifyRequest(image=EXAMPLE, out=locked / "out", progress=False))


@needs_shipped
def test_labels_out_of_range_fail_before_any_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 classes: the value 9 is neither a class nor the ignore index 255."""
    labels = np.zeros((128, 256), dtype=np.uint8)
    labels[5, 7] = 9
    labels[0, 0] = 255
    Image.fromarray(labels).save(tmp_path / "labels.png")

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampling started")

    monkeypatch.setattr(session_module, "certify_image", no_sampling)
    request = CertifyRequest(image=EXAMPLE, labels=tmp_path / "labels.png", out=tmp_path / "out", progress=False)
    with pytest.raises(InputError, match=r"labels.png: label values must be classes 0..7 or ignore=255, got 0..9"):
        run_certify(request)
    assert not (tmp_path / "out").exists()
