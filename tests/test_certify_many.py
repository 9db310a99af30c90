"""``certseg certify A B dir/ 'glob'``: the image list, one session for all images, per-image seeds, a failed
image skipped, ``--skip-existing``; and one image file exactly as before."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from certseg.engine.errors import InputError
from certseg.engine.files.image_list import expand_images
from certseg.engine.models.registry import shipped_models
from certseg.engine.seeds import image_seed

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"
FAST = ["--method", "segcertify", "--n0", "2", "--n", "64", "--batch", "4", "--threads", "1", "--quiet"]
"""Tiny runs: 32x64 crops of the sample, the shipped SegCertify segmenter."""

needs_shipped = pytest.mark.skipif("procedural-hrnet-noise025" not in shipped_models(),
                                   reason="needs the shipped segmenter")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_the_list_keeps_argument_order_sorts_within_folders_and_patterns_and_drops_repeats(tmp_path: Path) -> None:
    for name in ("d/b.png", "d/a.JPG", "d/notes.txt", "d/.hidden.png", "d/sub/deep.png", "g/z.png", "g/y.jpeg",
                 "g/x.gif", "one.png"):
        touch(tmp_path / name)
    listed = expand_images([tmp_path / "one.png", str(tmp_path / "d"), str(tmp_path / "g" / "*"),
                            str(tmp_path / "d" / "b.png"), str(tmp_path / "." / "one.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in listed.paths] == [
        "one.png", "d/a.JPG", "d/b.png", "g/y.jpeg", "g/z.png"]  # a folder is not searched below itself
    assert not listed.single_file
    deep = expand_images([str(tmp_path / "d" / "**" / "*.png")])
    assert [p.name for p in deep.paths] == ["b.png", "deep.png"] and not deep.single_file
    assert expand_images([tmp_path / "one.png"]).single_file
    assert expand_images([tmp_path / "missing.png"]).single_file  # read, and refused, as one image always was
    assert not expand_images([tmp_path / "g"]).single_file  # a folder of one image is a run of several


def test_nothing_found_and_one_stem_twice_are_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image"):
        expand_images([str(tmp_path / "empty"), str(tmp_path / "*.png")])
    touch(tmp_path / "a" / "street.png")
    touch(tmp_path / "b" / "street.jpg")
    with pytest.raises(InputError, match=r"a/street.png and .*b/street.jpg would both write <out>/street\.\*"):
        expand_images([tmp_path / "a", tmp_path / "b"])


def crops(folder: Path) -> dict[str, Path]:
    """Four 32x64 crops of the sample: d/a.png, d/b.jpg (a folder), g/c.png (a pattern), e.png (a file), and an
    unreadable d/bad.png."""
    with Image.open(EXAMPLE) as street:
        street = street.convert("RGB")
        made = {"a": "d/a.png", "b": "d/b.jpg", "c": "g/c.png", "e": "e.png"}
        for name, left in zip(made.values(), (0, 64, 128, 192), strict=True):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            street.crop((left, 48, left + 64, 80)).save(folder / name)
    (folder / "d" / "bad.png").write_bytes(b"\x89PNG broken")
    return {stem: folder / name for stem, name in made.items()}


def count_session_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """The arguments of every call of the classmethod ``Session.<name>`` from now on in the test."""
    from certseg.engine.runtimes.session import Session

    calls: list[object] = []
    real = getattr(Session, name).__func__

    def counted(cls, *args, **kwargs):
        calls.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Session, name, classmethod(counted))
    return calls


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every Session.open call of the test (the models load there)."""
    return count_session_calls(monkeypatch, "open")


def certify(*args: str) -> object:
    from certseg.engine.commands.cli import app

    return CliRunner().invoke(app, ["certify", *map(str, args)])


@needs_shipped
def test_a_folder_a_pattern_and_a_file_in_one_command(tmp_path: Path, opened: list[object]) -> None:
    images = crops(tmp_path)
    out = tmp_path / "out"
    result = certify(tmp_path / "d", tmp_path / "g" / "*.png", images["e"], "--seed", "7", "--out", out, *FAST)
    assert result.exit_code == 1, result.output  # d/bad.png failed
    assert len(opened) == 1  # models loaded once for all images
    assert result.stderr.strip().splitlines() == [
        f"certseg: {tmp_path / 'd' / 'bad.png'}: not a readable image (UnidentifiedImageError: cannot identify "
        f"image file {str(tmp_path / 'd' / 'bad.png')!r})"]
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [str(images[s]) for s in "abce"]
    assert lines[-1].startswith("certseg: 4 certified, 0 skipped, 1 failed of 5 images; certified ")
    assert "root seed 7" in lines[-1]
    # the list: d/a.png, d/b.jpg, d/bad.png, g/c.png, e.png; image k's seed is image_seed(7, k)
    for stem, index in (("a", 0), ("b", 1), ("c", 3), ("e", 4)):
        report = json.loads((out / f"{stem}.json").read_text())
        assert (report["seed"], report["root_seed"], report["image_index"]) == (image_seed(7, index), 7, index)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{kind}" for s in "abce"
                                                           for kind in ("certified.png", "overlay.png", "json"))
    # each certificate is the one a one-image run with its seed makes
    for stem, index in (("b", 1), ("e", 4)):
        alone = tmp_path / f"alone-{stem}"
        single = certify(images[stem], "--seed", image_seed(7, index), "--out", alone, *FAST)
        assert single.exit_code == 0, single.output
        assert (alone / f"{stem}.certified.png").read_bytes() == (out / f"{stem}.certified.png").read_bytes()
        report = json.loads((alone / f"{stem}.json").read_text())
        assert report["seed"] == image_seed(7, index) and "root_seed" not in report and "image_index" not in report


@needs_shipped
def test_skip_existing_resumes_and_redoes_nothing(tmp_path: Path, opened: list[object]) -> None:
    images = crops(tmp_path)
    (tmp_path / "d" / "bad.png").unlink()
    out = tmp_path / "out"
    first = certify(tmp_path / "d", images["e"], "--out", out, *FAST)  # no --seed: one root seed drawn
    assert first.exit_code == 0, first.output
    reports = {s: json.loads((out / f"{s}.json").read_text()) for s in "abe"}
    root = reports["a"]["root_seed"]
    assert [(r["root_seed"], r["image_index"], r["seed"]) for r in reports.values()] == [
        (root, k, image_seed(root, k)) for k in range(3)]
    (out / "b.json").unlink()  # as if interrupted before b finished
    stamps = {s: os.stat(out / f"{s}.json").st_mtime_ns for s in "ae"}
    again = certify(tmp_path / "d", images["e"], "--out", out, "--seed", root, "--skip-existing", *FAST)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[-1].startswith("certseg: 1 certified, 2 skipped, 0 failed of 3 images")
    assert {s: os.stat(out / f"{s}.json").st_mtime_ns for s in "ae"} == stamps
    redone = json.loads((out / "b.json").read_text())
    assert redone["outputs"] == reports["b"]["outputs"]  # the same seed gives the same certificate
    opened.clear()
    done = certify(tmp_path / "d", images["e"], "--out", out, "--skip-existing", *FAST)
    assert done.exit_code == 0 and "0 certified, 3 skipped, 0 failed" in done.stdout and opened == []
    alone = certify(images["e"], "--out", out, "--skip-existing", *FAST)  # one file: skipped the same way
    assert alone.exit_code == 0 and "0 certified, 1 skipped, 0 failed of 1 images" in alone.stdout and opened == []


@needs_shipped
def test_an_image_over_the_pixel_limit_fails_from_its_header_and_the_others_go_on(tmp_path: Path) -> None:
    from test_io import png_header_only

    crops(tmp_path)
    (tmp_path / "d" / "bad.png").unlink()
    bomb = png_header_only(tmp_path / "d" / "bomb.png", 14000, 14000)  # 100 bytes claiming 196 M pixels
    result = certify(tmp_path / "d", "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"certseg: {bomb}: 14000x14000 = 196,000,000 pixels exceeds the limit of 4,194,304 pixels (raise it with "
        "--max-pixels 196000000 if memory allows)"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["a.json", "b.json"]


@needs_shipped
def test_labels_with_several_images_are_a_folder_of_stems(tmp_path: Path) -> None:
    crops(tmp_path)
    (tmp_path / "d" / "bad.png").unlink()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(tmp_path / "labels" / "a.png")
    out = tmp_path / "out"
    result = certify(tmp_path / "d", "--labels", tmp_path / "labels", "--out", out, *FAST[:-1])  # with the bar
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"certseg: {tmp_path / 'd' / 'b.jpg'}: no label map {tmp_path / 'labels' / 'b.png'}"]
    assert "certified_accuracy" in json.loads((out / "a.json").read_text())["metrics"]
    assert not (out / "b.json").exists()
    refused = certify(tmp_path / "d", "--labels", tmp_path / "labels" / "a.png", "--out", tmp_path / "o2", *FAST)
    assert refused.exit_code != 0 and "give a folder holding <stem>.png" in refused.stderr


@pytest.mark.parametrize("case, message", [
    ("same-stem", "would both write <out>/a.*"),
    ("no-match", "no image (.png, .jpg, .jpeg) found"),
])
def test_run_wide_refusals_are_one_line_before_any_work(tmp_path: Path, opened: list[object], case: str,
                                                        message: str) -> None:
    crops(tmp_path)
    Image.new("RGB", (64, 32)).save(tmp_path / "g" / "a.png")
    args = [tmp_path / "d", tmp_path / "g"] if case == "same-stem" else [tmp_path / "nothing" / "*.png"]
    result = certify(*args, "--out", tmp_path / "out", *FAST)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and message in lines[0], result.output
    assert opened == [] and not (tmp_path / "out").exists()


@needs_shipped
def test_ctrl_c_keeps_the_images_already_certified(tmp_path: Path) -> None:
    """SIGINT once the first image's JSON is written: exit 130, one line, that image's outputs stay, none of the
    second image's (nor a temporary file) is left."""
    import subprocess
    import sys

    from conftest import interrupt_when

    with Image.open(EXAMPLE) as street:
        street = street.convert("RGB")
        (tmp_path / "d").mkdir()
        street.crop((0, 48, 64, 80)).save(tmp_path / "d" / "a.png")
        street.resize((1024, 512)).save(tmp_path / "d" / "b.png")  # minutes at n = 400: interrupted long before
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "certseg.engine.commands.cli", "certify", str(tmp_path / "d"), "--out", str(out),
         *FAST, "--n", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    stderr = interrupt_when(process, lambda: (out / "a.json").exists(), wait_s=300)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "certseg: interrupted" and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.certified.png", "a.json", "a.overlay.png"]


@needs_shipped
def test_several_images_on_a_server_share_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_server
) -> None:
    """--server: one Session.connect for all images, each image's seed derived as in-process."""
    server = default_server
    connected = count_session_calls(monkeypatch, "connect")
    crops(tmp_path)
    (tmp_path / "d" / "bad.png").unlink()
    result = certify(tmp_path / "d", tmp_path / "g", "--server", server.grpc_address, "--seed", "2",
                     "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert len(connected) == 1
    reports = [json.loads((tmp_path / "out" / f"{stem}.json").read_text()) for stem in "abc"]
    assert [(r["seed"], r["image_index"]) for r in reports] == [(image_seed(2, k), k) for k in range(3)]
    assert all(r["device"] == f"triton:{server.grpc_address}" for r in reports)
