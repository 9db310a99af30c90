"""certseg-bench end to end: same numbers as `certseg certify`, resume after a kill, baseline parity, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_io import png_header_only
from typer.testing import CliRunner

from certseg.bench import cli, plots
from certseg.bench.baseline import authors_certify
from certseg.bench.config import BenchConfig, Setting, image_seed
from certseg.bench.machine import cpu_name
from certseg.bench.report import write_report
from certseg.bench.results import ResultsFile, ResumeError, entry_key, labels_digest, load_entries, read_lines
from certseg.bench.tables import aggregate, radius_curves
from certseg.bench.timing import STAGES
from certseg.engine.commands import cli as certseg_cli
from certseg.engine.core.certify import min_samples_to_certify
from certseg.engine.errors import CheckpointError, InputError
from certseg.engine.files.radius_outputs import read_radius_npz
from certseg.engine.maths.label_pipeline import LabelPipeline
from certseg.engine.models.adm import build_adm
from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import default_model, save_model
from certseg.engine.runtimes.session import Session, Settings
from certseg.training import scenes

from conftest import REPO_ROOT, interrupt_when, needs_cityscapesscripts

torch.set_num_threads(1)
runner = CliRunner()


def tiny_hrnet_config(width: int = 4) -> dict:
    def stage(n: int) -> dict:
        return {"NUM_MODULES": 1, "NUM_BRANCHES": n, "BLOCK": "BASIC", "NUM_BLOCKS": [1] * n,
                "NUM_CHANNELS": [width * 2**i for i in range(n)], "FUSE_METHOD": "SUM"}

    stage1 = {"NUM_MODULES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1], "NUM_CHANNELS": [8], "FUSE_METHOD": "SUM"}
    return {"ALIGN_CORNERS": False,
            "EXTRA": {"FINAL_CONV_KERNEL": 1, "STAGE1": stage1, "STAGE2": stage(2), "STAGE3": stage(3),
                      "STAGE4": stage(4)}}


TINY_ADM = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,1",
            "attention_resolutions": "16", "num_head_channels": 32, "learn_sigma": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny 8-class HRNetV2 and a tiny ADM, saved self-describing (stand-ins for the shipped models)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = tiny_hrnet_config()
    segmenter, denoiser = folder / "tiny-seg.safetensors", folder / "tiny-adm.safetensors"
    save_model(segmenter, build_hrnet(config, scenes.NUM_CLASSES).eval(),
               {"name": "tiny-seg", "role": "segmenter", "family": "hrnet", "classes": list(scenes.CLASSES),
                "config": {"model_cfg": config, "num_classes": scenes.NUM_CLASSES}})
    save_model(denoiser, build_adm(TINY_ADM).eval(),
               {"name": "tiny-adm", "role": "denoiser", "family": "adm", "config": {"create_model_kwargs": TINY_ADM}})
    return SimpleNamespace(segmenter=segmenter, denoiser=denoiser,
                           args=["--segmenter", str(segmenter), "--denoiser", str(denoiser)])


def invoke(app, args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def bench(args: list[str]):
    """Run certseg-bench in-process, with the issue's space-separated multi-value form."""
    return invoke(cli.app, cli.expand_multi_values(args))


# ------------------------------------------------------------------------------------------------ the CLI form


def test_multi_value_options_accept_both_forms() -> None:
    spaced = ["--images", "2", "--method", "segcertify", "denoisecertify", "--sigma", "0.25", "0.5", "1.0",
              "--scale", "0.5", "--n", "40"]
    repeated = ["--images", "2", "--method", "segcertify", "--method", "denoisecertify", "--sigma", "0.25",
                "--sigma", "0.5", "--sigma", "1.0", "--scale", "0.5", "--n", "40"]
    assert cli.expand_multi_values(spaced) == repeated
    assert cli.expand_multi_values(repeated) == repeated
    assert cli.expand_multi_values(["--sigma"]) == ["--sigma"]  # no value: the parser reports it


def test_both_forms_parse_to_the_same_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[BenchConfig] = []

    def fake_prepare(config: BenchConfig):
        seen.append(config)
        raise InputError("stop here")

    monkeypatch.setattr("certseg.bench.run.prepare", fake_prepare)
    for args in (["--sigma", "0.25", "0.5", "--scale", "0.5", "1", "--method", "segcertify"],
                 ["--sigma", "0.25", "--sigma", "0.5", "--scale", "0.5", "--scale", "1", "--method", "segcertify"]):
        result = runner.invoke(cli.app, cli.expand_multi_values(args))
        assert result.exit_code == 2 and "stop here" in result.output
    assert seen[0] == seen[1]
    assert seen[0].grid() == [Setting("segcertify", 0.5, 0.25), Setting("segcertify", 0.5, 0.5),
                              Setting("segcertify", 1.0, 0.25), Setting("segcertify", 1.0, 0.5)]


def test_seeds_derive_from_the_root_seed_and_image_index() -> None:
    assert image_seed(0, 3) == image_seed(0, 3) < 2**63
    assert len({image_seed(s, i) for s in range(3) for i in range(50)}) == 150


# ------------------------------------------------------------------------------ bench == certseg certify


def _shipped_or_tiny(models: SimpleNamespace, method: str) -> list[str]:
    """The shipped default models when they exist (the issue's check), the tiny ones otherwise."""
    try:
        default_model("segmenter", method)
        return []
    except CheckpointError:
        return models.args


def test_bench_20_images_match_certseg_certify(models: SimpleNamespace, tmp_path: Path) -> None:
    size = (64, 128)
    alpha = 0.05
    n = min_samples_to_certify(0.75, alpha, size[0] * size[1]) + 3
    model_args = _shipped_or_tiny(models, "segcertify")
    out, data = tmp_path / "bench", tmp_path / "data"
    result = bench(["--images", "20", "--method", "segcertify", "--sigma", "0.25", "--n0", "2", "--n", str(n),
                    "--alpha", str(alpha), "--scene-size", "64x128", "--write-data", str(data), "--out", str(out),
                    "--quiet", "--seed", "7", *model_args])
    assert "Certified segmentation" in result.output and "Throughput" in result.output
    _, entries = load_entries(out / "results.jsonl")
    assert len(entries) == 20
    assert [e["seed"] for e in entries] == [image_seed(7, i) for i in range(20)]
    for entry in (entries[0], entries[13]):
        image = Path(entry["image_path"])
        labels = data / "gtFine" / "val" / scenes.CITY / f"{entry['image']}_gtFine_labelTrainIds.png"
        invoke(certseg_cli.app, [
            "certify", str(image), "--method", "segcertify", "--sigma", "0.25", "--n0", "2", "--n", str(n),
            "--alpha", str(alpha), "--seed", str(entry["seed"]), "--out", str(tmp_path / "certify"),
            "--labels", str(labels), "--quiet", *model_args,
        ])
        stem = image.stem
        certified = np.asarray(Image.open(tmp_path / "certify" / f"{stem}.certified.png"))
        assert labels_digest(certified) == entry["labels_sha256"]
        report = json.loads((tmp_path / "certify" / f"{stem}.json").read_text())
        assert report["seed"] == entry["seed"]
        assert report["abstain_percent"] == pytest.approx(100 * entry["abstain_fraction"], abs=1e-12)
        assert report["metrics"]["certified_accuracy"] == pytest.approx(entry["metrics"]["certified_accuracy"],
                                                                        abs=1e-12)
        # The bench keeps the dataset convention (all K classes); certify reports it as mean_iou_all_classes.
        assert report["metrics"]["mean_iou_all_classes"] == pytest.approx(entry["metrics"]["mean_iou"], abs=1e-12)
    # The stage split accounts for the sampling time it splits: on CPU the stage maths run in a second thread
    # (overlapped), so the stages may add up to twice the wall time, and the models' thread's to no more than it.
    for entry in entries:
        stages, sampling = entry["timings"]["stages"], entry["timings"]["sampling"]
        assert set(stages) == set(STAGES) and entry["timings"]["stages_overlapped"] is True
        split = sum(v for k, v in stages.items() if k != "certify")
        assert 0.6 * sampling <= split <= 2.05 * sampling + 1e-3
        assert stages["segment"] + stages["denoise"] + stages["count"] <= 1.05 * sampling + 1e-3


# ------------------------------------------------------------------------------------------------- resume

RESUME_ARGS = ["--images", "4", "--scene-size", "32x64", "--method", "segcertify", "denoisecertify",
               "--sigma", "0.25", "0.5", "--n0", "2", "--n", "38", "--alpha", "0.1", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def uninterrupted(models: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    bench([*RESUME_ARGS, *models.args, "--out", str(out)])
    return out


def _entry_lines(path: Path) -> int:
    return sum(1 for r in read_lines(path) if r.get("kind") == "entry") if path.exists() else 0


def test_a_killed_run_resumes_without_redoing_finished_entries(
    models: SimpleNamespace, uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    results = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "certseg.bench.cli", *RESUME_ARGS, *models.args, "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    deadline = time.monotonic() + 60
    while _entry_lines(results) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert still_running, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    before = {entry_key(r): r for r in read_lines(results) if r.get("kind") == "entry"}
    assert 3 <= len(before) < 16
    with results.open("ab") as handle:  # as if the kill had hit a write: a partial last line
        handle.write(b'{"kind":"entry","image":"procedural_000000_0000')

    bench([*RESUME_ARGS, *models.args, "--out", str(out)])

    _, after = load_entries(results)
    keys = [entry_key(e) for e in after]
    assert len(keys) == len(set(keys)) == 16
    resumed = {entry_key(e): e for e in after}
    for key, entry in before.items():  # finished entries were kept, not recomputed
        assert resumed[key]["run_id"] == entry["run_id"] and resumed[key]["finished_at"] == entry["finished_at"]
    assert len({e["run_id"] for e in after}) == 2
    _, reference = load_entries(uninterrupted / "results.jsonl")
    expected = {entry_key(e): e for e in reference}
    assert set(expected) == set(resumed)
    for key, entry in expected.items():
        for field in ("labels_sha256", "confusion", "abstain_fraction", "seed", "timestep", "min_agreements"):
            assert resumed[key][field] == entry[field], (key, field)
    number_fields = ("accuracy", "mean_iou", "abstain_percent", "images", "radius")
    assert ([[getattr(r, f) for f in number_fields] for r in aggregate(after)]
            == [[getattr(r, f) for f in number_fields] for r in aggregate(reference)])


def test_denoisecertify_entries_match_certseg_certify(
    models: SimpleNamespace, uninterrupted: Path, tmp_path: Path
) -> None:
    _, entries = load_entries(uninterrupted / "results.jsonl")
    entry = next(e for e in entries if e["method"] == "denoisecertify" and e["sigma"] == 0.5 and e["image_index"] == 1)
    [image] = scenes.write_cityscapes_layout(tmp_path, num_images=1, height=32, width=64, first_held_out=1)
    invoke(certseg_cli.app, [
        "certify", str(image), "--method", "denoisecertify", "--sigma", "0.5", "--n0", "2", "--n", "38",
        "--alpha", "0.1", "--seed", str(entry["seed"]), "--out", str(tmp_path / "out"), "--quiet", *models.args,
    ])
    certified = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}.certified.png"))
    assert labels_digest(certified) == entry["labels_sha256"]
    report = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert report["timestep"]["t"] == entry["timestep"]


def test_resuming_with_other_settings_is_refused(models: SimpleNamespace, uninterrupted: Path) -> None:
    args = [a if a != "38" else "40" for a in RESUME_ARGS]  # n = 40 instead of 38
    result = runner.invoke(cli.app, cli.expand_multi_values([*args, *models.args, "--out", str(uninterrupted)]))
    assert result.exit_code == 2
    assert "cannot be resumed" in result.output and "n: 38 in the file, 40 now" in result.output


def test_results_file_drops_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    header = {"kind": "run", "compat": {"n": 10}}
    first = ResultsFile(path)
    first.open(header)
    first.append({"kind": "entry", "image": "a", "method": "segcertify", "sigma": 0.25, "scale": 1.0,
                  "variant": "engine"})
    with path.open("ab") as handle:
        handle.write(b'{"kind": "entry", "ima')
    again = ResultsFile(path)
    again.open(header)
    assert list(again.entries) == [("a", "segcertify", 0.25, 1.0, 1, "engine")]  # without denoise_steps: K = 1
    assert path.read_bytes().endswith(b"}\n")
    with pytest.raises(ResumeError, match="n: 10 in the file, 11 now"):
        ResultsFile(path).open({"kind": "run", "compat": {"n": 11}})


def test_report_writes_tables_and_plots(uninterrupted: Path) -> None:
    pytest.importorskip("matplotlib", reason="figures need certseg[bench]")
    header, entries = load_entries(uninterrupted / "results.jsonl")
    report = write_report(uninterrupted, header, entries).read_text()
    assert "| scale | method | σ | R | t* | acc | mIoU | abstain % | images |" in report
    assert "| 1.00 | segcertify | 0.25 | 0.17 |" in report and "Time split per stage" in report
    for name in ("accuracy", "miou", "abstain", "time_per_image", "stages"):
        assert f"![{name}]({name}.png)" in report
        with Image.open(uninterrupted / f"{name}.png") as image:
            assert image.size == (900, 520)
        assert (uninterrupted / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        svg = (uninterrupted / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "σ = 0.25" in (uninterrupted / "accuracy.svg").read_text()  # Greek letters kept as text
    figures = {p.name: p.read_bytes() for p in uninterrupted.glob("*.*") if p.suffix in (".png", ".pdf", ".svg")}
    result = bench(["--report-only", "--out", str(uninterrupted)])
    assert "report.md" in result.output
    assert {p.name: p.read_bytes() for p in uninterrupted.glob("*.*") if p.name in figures} == figures  # no dates


def test_report_without_matplotlib_says_so_in_one_line(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results.jsonl").write_bytes((uninterrupted / "results.jsonl").read_bytes())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as when not installed
    result = bench(["--report-only", "--out", str(tmp_path)])
    notes = [line for line in result.output.splitlines() if "certseg[bench]" in line]
    assert notes == ["certseg-bench: plots skipped: they need matplotlib (pip install 'certseg[bench]')"]
    report = (tmp_path / "report.md").read_text()
    assert "| 1.00 | segcertify | 0.25 | 0.17 |" in report and "plots skipped" in report and ".png)" not in report
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------------------------- baseline


@pytest.mark.parametrize(("method", "steps"), [("segcertify", 1), ("denoisecertify", 1), ("denoisecertify", 3)])
def test_authors_style_baseline_certifies_exactly_like_the_engine(models: SimpleNamespace, method: str,
                                                                  steps: int) -> None:
    config = BenchConfig(engine=Settings(segmenter=str(models.segmenter), denoiser=str(models.denoiser), n0=3, n=38,
                                         alpha=0.1, device="cpu", batch=8))
    session = Session.open(config.session_settings(Setting(method, 1.0, 0.5, steps)))
    image = scenes.generate_scene(scenes.held_out_seed(0), 32, 64).image
    engine, _ = session.certify(image, seed=11)
    spec, _ = session.runtime_for((32, 64))
    denoiser = None if session.denoiser is None else session.denoiser.module
    pipeline = LabelPipeline(spec, session.segmenter.module, denoiser)
    slow = authors_certify(pipeline, image, num_classes=8, sigma=0.5, n0=3, n=38, tau=0.75, alpha=0.1, seed=11)
    np.testing.assert_array_equal(slow.guess, engine.guess)
    np.testing.assert_array_equal(slow.agree, engine.certificate.agree)
    np.testing.assert_array_equal(slow.labels, engine.labels)
    assert 0 < slow.certified.sum() < slow.certified.size  # some certified, some abstained: Holm had work to do


def test_onnx_runtime_entries_match_certseg_certify_on_onnx(
    models: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--runtime onnx goes through the same Session as `certseg certify --runtime onnx`: identical labels."""
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path / "cache"))
    out, data = tmp_path / "bench", tmp_path / "data"
    common = ["--method", "segcertify", "--sigma", "0.25", "--n0", "2", "--n", "50", "--alpha", "0.1"]
    bench(["--images", "1", *common, "--scene-size", "64x128", "--write-data", str(data), "--runtime", "onnx",
           "--out", str(out), "--quiet", "--seed", "3", *models.args])
    _, entries = load_entries(out / "results.jsonl")
    assert len(entries) == 1
    image = Path(entries[0]["image_path"])
    invoke(certseg_cli.app, ["certify", str(image), *common, "--seed", str(entries[0]["seed"]), "--runtime", "onnx",
                             "--out", str(tmp_path / "certify"), "--quiet", *models.args])
    certified = np.asarray(Image.open(tmp_path / "certify" / f"{image.stem}.certified.png"))
    assert labels_digest(certified) == entries[0]["labels_sha256"]
    report = json.loads((tmp_path / "certify" / f"{image.stem}.json").read_text())
    assert report["settings"]["runtime"] == "onnx"


# ------------------------------------------------------------------------------------------------- errors


@needs_cityscapesscripts
def test_clear_errors_for_missing_data_and_mismatched_classes(models: SimpleNamespace, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["--dataset", "cityscapes", "--root", str(tmp_path / "nowhere"), "--quiet"])
    assert result.exit_code == 2 and "leftImg8bit/val/<city>" in result.output
    result = runner.invoke(cli.app, ["--runtime", "triton", "--baseline", "--images", "1", "--out",
                                     str(tmp_path / "triton")])
    assert result.exit_code == 2 and "--baseline runs the models in this process" in result.output
    root = tmp_path / "cityscapes"
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(_mkdir(root / "leftImg8bit/val/x") / "x_0_0_leftImg8bit.png")
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(_mkdir(root / "gtFine/val/x") / "x_0_0_gtFine_labelIds.png")
    result = runner.invoke(cli.app, ["--root", str(root), "--images", "1", "--method", "segcertify", "--n", "40",
                                     "--alpha", "0.1", "--out", str(tmp_path / "out"), "--quiet", *models.args])
    assert result.exit_code == 2 and "predicts 8 classes, but cityscapes has 19" in result.output


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@needs_cityscapesscripts
def test_images_over_the_pixel_limit_are_refused_from_their_header(models: SimpleNamespace, tmp_path: Path) -> None:
    """--max-pixels applies to the bench's reads too: a label map whose header claims 14000x14000 is refused
    before decoding (Pillow's own check would have raised), and so is a procedural --scene-size."""
    root = tmp_path / "cityscapes"
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(_mkdir(root / "leftImg8bit/val/x") / "x_0_0_leftImg8bit.png")
    png_header_only(_mkdir(root / "gtFine/val/x") / "x_0_0_gtFine_labelIds.png", 14000, 14000)
    args = ["--images", "1", "--method", "segcertify", "--n", "40", "--alpha", "0.1", "--quiet", *models.args]
    result = runner.invoke(cli.app, ["--root", str(root), "--out", str(tmp_path / "a"), *args])
    assert result.exit_code == 2 and "14000x14000 = 196,000,000 pixels exceeds the limit of 4,194,304" in result.output
    result = runner.invoke(cli.app, ["--root", str(root), "--out", str(tmp_path / "b"), "--max-pixels", "100", *args])
    assert result.exit_code == 2 and "leftImg8bit.png: 16x8 = 128 pixels exceeds the limit of 100" in result.output
    result = runner.invoke(cli.app, ["--scene-size", "4096x4096", "--out", str(tmp_path / "c"), *args])
    assert result.exit_code == 2 and "--scene-size: 4096x4096 = 16,777,216 pixels exceeds the limit" in result.output


def test_ctrl_c_prints_one_line_keeps_finished_entries_and_exits_130(models: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    results = out / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "certseg.bench.cli", *RESUME_ARGS, *models.args, "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    stderr = interrupt_when(process, lambda: _entry_lines(results) >= 1, wait_s=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["certseg-bench: interrupted (finished entries are kept; rerun to resume)"]
    assert _entry_lines(results) >= 1


def test_radius_map_curves_equal_the_certify_radius_maps_of_the_same_images(models: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    """--radius-map: each entry's compact record gives exactly the curve of certify --radius-map's npz for the same
    image and seed; the pooled curve is what the report tabulates and plots."""
    model_args = _shipped_or_tiny(models, "segcertify")
    out, data = tmp_path / "bench", tmp_path / "data"
    common = ["--method", "segcertify", "--sigma", "0.5", "--n0", "2", "--n", "40", "--alpha", "0.05"]
    result = bench(["--images", "3", *common, "--scene-size", "32x64", "--write-data", str(data), "--out", str(out),
                    "--quiet", "--seed", "3", "--radius-map", "--report", *model_args])
    assert "Certified accuracy vs radius" in result.output
    _, entries = load_entries(out / "results.jsonl")
    levels = np.array([0.0, 0.05, 0.1, 0.2, 0.3])
    hits, valid = np.zeros(len(levels)), 0
    for entry in entries:
        image = Path(entry["image_path"])
        labels = data / "gtFine" / "val" / scenes.CITY / f"{entry['image']}_gtFine_labelTrainIds.png"
        invoke(certseg_cli.app, ["certify", str(image), *common, "--seed", str(entry["seed"]), "--radius-map",
                                 "--out", str(tmp_path / "certify"), "--quiet", *model_args])
        radius, guess = read_radius_npz(tmp_path / "certify" / f"{image.stem}.radius.npz")
        target = np.asarray(Image.open(labels))
        correct = (guess == target) & (target != 255)
        own = radius_curves([entry])[0].accuracy_at(levels)
        expected = [(correct & (np.nan_to_num(radius, nan=-1.0) >= level - 1e-6)).sum() for level in levels]
        np.testing.assert_allclose(own * (target != 255).sum(), expected)
        hits += expected
        valid += int((target != 255).sum())
    assert hits[0] > 0 and hits[-1] < hits[0]  # a curve that falls: the check compares something
    np.testing.assert_allclose(radius_curves(entries)[0].accuracy_at(levels), hits / valid)
    report = (out / "report.md").read_text()
    assert "## Certified accuracy vs radius" in report
    assert (out / "accuracy_vs_radius.png").is_file() == (out / "accuracy_vs_radius.pdf").is_file() == plots.available()


def test_baseline_compare_isolates_engine_and_baseline_in_their_own_processes(tmp_path: Path) -> None:
    """Each variant runs in a fresh process (so each peak RSS is its own); their certificates are still equal."""
    out = tmp_path / "compare"
    alpha = 0.1
    n = min_samples_to_certify(0.75, alpha, 32 * 64) + 3
    done = subprocess.run(
        [sys.executable, "-m", "certseg.bench.baseline_compare", "--images", "1", "--n0", "2", "--n", str(n),
         "--alpha", str(alpha), "--method", "segcertify", "--scene-size", "32x64", "--threads", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_lines(out / "results.jsonl")
    entries = {r["variant"]: r for r in records if r.get("kind") == "entry"}
    assert set(entries) == {"engine", "baseline"}
    assert entries["engine"]["run_id"] != entries["baseline"]["run_id"]  # two runs: two processes
    assert entries["engine"]["labels_sha256"] == entries["baseline"]["labels_sha256"]
    (row,) = json.loads((out / "comparison.json").read_text())["rows"]
    assert row["identical_certificates"] is True
    assert row["engine_peak_rss_mib"] == entries["engine"]["peak_rss_mib"] > 0
    assert row["baseline_peak_rss_mib"] == entries["baseline"]["peak_rss_mib"] > 0
    recorded = json.loads((out / "comparison.json").read_text())["machine"]
    assert recorded["cpu"] == cpu_name() and recorded["conv3x3_gflops"] > 0 and recorded["baseline_pvalue_us"] > 0
    sessions = [r for r in records if r.get("kind") == "session"]
    assert len(sessions) == 3 and all(s["machine"]["cpu"] == cpu_name() for s in sessions)  # engine, baseline, report


# ------------------------------------------------------------------------------------------ --denoise-steps


STEPS_ARGS = ["--images", "2", "--scene-size", "32x64", "--method", "segcertify", "denoisecertify", "--sigma", "0.5",
              "--n0", "2", "--n", "38", "--alpha", "0.1", "--quiet", "--threads", "1"]


def test_denoise_steps_is_a_grid_axis_that_resumes_and_matches_certseg_certify(
    models: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "steps"
    result = bench([*STEPS_ARGS, "--denoise-steps", "1", "3", *models.args, "--out", str(out)])
    header, first = load_entries(out / "results.jsonl")
    keys = {entry_key(e)[1:5] for e in first}
    assert keys == {("segcertify", 0.5, 1.0, 1), ("denoisecertify", 0.5, 1.0, 1), ("denoisecertify", 0.5, 1.0, 3)}
    assert len(first) == 6 and "K" in result.output
    three = next(e for e in first if e["denoise_steps"] == 3 and e["image_index"] == 1)
    assert three["pipeline"]["denoise_steps"] == 3 and len(three["pipeline"]["denoise_timesteps"]) == 3

    bench([*STEPS_ARGS, "--denoise-steps", "3", "1", "2", *models.args, "--out", str(out)])  # resumes, adds K = 2
    _, second = load_entries(out / "results.jsonl")
    assert len(second) == 8
    kept = {entry_key(e): e["run_id"] for e in first}
    assert all(kept[entry_key(e)] == e["run_id"] for e in second if entry_key(e) in kept)
    assert {entry_key(e)[4] for e in second if entry_key(e) not in kept} == {2}
    rows = aggregate(second)
    assert sorted((r.method, r.denoise_steps) for r in rows) == [
        ("denoisecertify", 1), ("denoisecertify", 2), ("denoisecertify", 3), ("segcertify", 1)]

    [image] = scenes.write_cityscapes_layout(tmp_path / "data", num_images=1, height=32, width=64, first_held_out=1)
    invoke(certseg_cli.app, [
        "certify", str(image), "--sigma", "0.5", "--n0", "2", "--n", "38", "--alpha", "0.1", "--denoise-steps", "3",
        "--seed", str(three["seed"]), "--out", str(tmp_path / "one"), "--quiet", "--threads", "1", *models.args,
    ])
    certified = np.asarray(Image.open(tmp_path / "one" / f"{image.stem}.certified.png"))
    assert labels_digest(certified) == three["labels_sha256"]


def test_entries_written_before_denoise_steps_read_as_one_step(tmp_path: Path) -> None:
    old = {"kind": "entry", "image": "a", "method": "denoisecertify", "sigma": 0.25, "scale": 1.0,
           "variant": "engine"}
    assert entry_key(old) == ("a", "denoisecertify", 0.25, 1.0, 1, "engine")
    assert entry_key({**old, "denoise_steps": 5})[4] == 5
    with pytest.raises(InputError, match="integers >= 1"):
        BenchConfig(denoise_steps=(1, 0))
    grid = BenchConfig(methods=("segcertify", "denoisecertify"), sigmas=(0.25,), denoise_steps=(1, 5)).grid()
    assert grid == [Setting("segcertify", 1.0, 0.25), Setting("denoisecertify", 1.0, 0.25),
                    Setting("denoisecertify", 1.0, 0.25, 5)]
