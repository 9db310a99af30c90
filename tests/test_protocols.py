"""``certseg-bench --protocol``: the peers' Pascal-Context protocol (480 × 480 squash, SegCertify long side 520)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datasets import fake_pascal_context
from typer.testing import CliRunner

from certseg.bench import cli
from certseg.bench.datasets.common import DatasetError
from certseg.bench.protocols import PEERS, resolve_protocol
from certseg.bench.results import read_lines
from certseg.engine.choices import Dataset, Method
from certseg.engine.core.certify import min_samples_to_certify
from certseg.engine.maths.label_pipeline import make_spec
from certseg.engine.runtimes.settings import Settings

runner = CliRunner()


def segmenter_size(preset_settings: Settings, image_size: tuple[int, int]) -> tuple[int, int]:
    return make_spec(preset_settings.method, preset_settings.sigma, image_size, scale=preset_settings.scale,
                     denoiser_size=(256, 256)).segmenter_size


@pytest.mark.parametrize(("scale", "long_side"), [(1.0, 520), (0.5, 260), (0.75, 390), (0.25, 130)])
def test_peers_pascal_context_segcertify_long_side_is_520_times_scale(scale: float, long_side: int) -> None:
    preset = resolve_protocol("peers", Dataset.pascal_context, None)
    assert preset.squash == 480
    settings = preset.engine_settings(Settings(method=Method.segcertify, scale=scale))
    assert segmenter_size(settings, (480, 480)) == (long_side, long_side)
    # DenoiseCertify resizes the denoised image to scale × the (squashed) image size, as the paper describes
    denoise = preset.engine_settings(Settings(method=Method.denoisecertify, scale=scale))
    assert denoise.scale == scale and segmenter_size(denoise, (480, 480)) == (round(480 * scale),) * 2


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_peers_cityscapes_equals_certseg_protocol(scale: float) -> None:
    """Long side 2048 · scale on 1024 × 2048 images is scale × the image size: the same segmenter input."""
    peers = resolve_protocol("peers", Dataset.cityscapes, None)
    own = resolve_protocol("certseg", Dataset.cityscapes, None)
    base = Settings(method=Method.segcertify, scale=scale)
    assert peers.squash is None
    assert segmenter_size(peers.engine_settings(base), (1024, 2048)) == segmenter_size(
        own.engine_settings(base), (1024, 2048)) == (round(1024 * scale), round(2048 * scale))


def test_protocol_errors() -> None:
    with pytest.raises(DatasetError, match="procedural dataset has no peers' protocol"):
        resolve_protocol("peers", Dataset.procedural, None)
    with pytest.raises(DatasetError, match="drop --resize 512"):
        resolve_protocol("peers", Dataset.pascal_context, 512)
    assert resolve_protocol("peers", Dataset.pascal_context, 480) == PEERS[Dataset.pascal_context]
    assert resolve_protocol("certseg", Dataset.pascal_context, 300).squash == 300
    with pytest.raises(DatasetError, match="long side of 2048"):
        PEERS[Dataset.cityscapes].check_image("frankfurt_0", (512, 1024))
    PEERS[Dataset.cityscapes].check_image("frankfurt_0", (1024, 2048))


def _context_segmenter(path: Path) -> Path:
    """A 59-class ONNX segmenter (strided 1 × 1 convolution, fixed seed): any size in, scores at 1/4 out."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 59, 1, stride=4).eval()
    axes = {"pixels": {0: "batch", 2: "h", 3: "w"}, "scores": {0: "batch", 2: "oh", 3: "ow"}}
    with torch.no_grad():
        torch.onnx.export(conv, (torch.rand(1, 3, 32, 32),), str(path), input_names=["pixels"],
                          output_names=["scores"], dynamic_axes=axes, opset_version=18, dynamo=False)
    return path


def test_bench_peers_protocol_on_pascal_context_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "pc"
    fake_pascal_context(root, ["2008_000002"], size=(30, 40))
    segmenter = _context_segmenter(tmp_path / "context59.onnx")
    alpha = 0.1
    n = min_samples_to_certify(0.75, alpha, 480 * 480) + 2
    common = ["--root", str(root), "--images", "1", "--method", "segcertify", "--sigma", "0.25",
              "--segmenter", str(segmenter), "--n0", "2", "--n", str(n), "--alpha", str(alpha), "--quiet",
              "--threads", "1"]
    peers = runner.invoke(cli.app, [*common, "--protocol", "peers", "--out", str(tmp_path / "peers")])
    assert peers.exit_code == 0, peers.output
    assert "protocol peers (squash to 480×480, SegCertify segmenter long side 520·scale" in " ".join(
        peers.output.split())
    records = read_lines(tmp_path / "peers" / "results.jsonl")
    header = records[0]
    assert header["compat"]["protocol"] == "peers" and header["dataset"]["resize"] == 480
    (entry,) = [r for r in records if r.get("kind") == "entry"]
    assert entry["image_size"] == [480, 480] and entry["scale"] == 1.0
    assert entry["pipeline"]["segmenter_size"] == [520, 520]

    own = runner.invoke(cli.app, [*common, "--out", str(tmp_path / "own")])
    assert own.exit_code == 0, own.output
    (own_entry,) = [r for r in read_lines(tmp_path / "own" / "results.jsonl") if r.get("kind") == "entry"]
    assert own_entry["image_size"] == [30, 40] and own_entry["pipeline"]["segmenter_size"] == [30, 40]

    # a results file cannot be resumed under the other protocol
    mixed = runner.invoke(cli.app, [*common, "--protocol", "peers", "--out", str(tmp_path / "own")])
    assert mixed.exit_code != 0 and "protocol" in mixed.output


def test_results_from_before_protocols_resume_as_certseg(tmp_path: Path) -> None:
    """A header written before --protocol existed has no protocol key: it stands for certseg's own."""
    args = ["--images", "1", "--method", "segcertify", "--sigma", "0.25", "--n0", "2", "--n", "40",
            "--alpha", "0.1", "--scene-size", "32x64", "--quiet", "--threads", "1", "--out", str(tmp_path)]
    assert runner.invoke(cli.app, args).exit_code == 0
    path = tmp_path / "results.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    del lines[0]["compat"]["protocol"]
    del lines[0]["protocol"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = runner.invoke(cli.app, [*args, "--sigma", "0.5"])
    assert again.exit_code == 0, again.output
    entries = [r for r in read_lines(path) if r.get("kind") == "entry"]
    assert sorted(e["sigma"] for e in entries) == [0.25, 0.5]
    assert np.isfinite(entries[0]["metrics"]["certified_accuracy"])
