"""The one-shot GPU suite's dry run on CPU, so the command a lent GPU runs once cannot rot.

It runs the way the device machine runs it: ``python bench/gpu_suite.py`` from a plain checkout, with certseg not
installed and the optional packages (typer, rich, safetensors, Pillow, OpenCV, ONNX, Triton) not importable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certseg.bench.gpu.flops import count_flops
from certseg.bench.gpu.measure import device_runtime
from certseg.bench.gpu.models import DRY_RUN, FULL, build_models, make_pipeline, suite_image
from certseg.bench.gpu.suite import main
from certseg.bench.machine import cpu_name
from certseg.bench.timing import STAGES
from certseg.engine.core.pipeline import certify_image
from certseg.engine.digest import certificate_sha256
from certseg.engine.runtimes.torch_runtime import torch_runtime

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("typer", "rich", "safetensors", "PIL", "cv2", "onnx", "onnxruntime", "tritonclient", "pytriton")
LAUNCH = f"""
import runpy, sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))  # None: "not installed" for import and for find_spec alike
sys.meta_path = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
sys.path = [p for p in sys.path if "__editable__" not in p]
try:
    import certseg
except ImportError:
    pass
else:
    raise SystemExit("certseg is importable without the checkout shim: the test would prove nothing")
sys.argv = ["bench/gpu_suite.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_suite.py", run_name="__main__")
"""
RUN_KEYS = {"method", "precision", "variant", "images", "seconds_per_image", "seconds_per_image_min", "samples_per_s",
            "warm_up_s", "stages", "stage_split_total_s", "peak_gpu_mib", "peak_rss_mib", "certificate_sha256",
            "certificates_identical", "certified_fraction", "non_finite", "labels_on_device", "noise_backend",
            "flop_limit_s", "peak_rate", "flop_limit_fraction"}
REPORT_KEYS = {"suite", "version", "dry_run", "started_utc", "budget_s", "environment", "profile", "models", "flops",
               "peak", "measured_matmul_tflops", "runs", "served", "target", "skipped", "sections"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin",
           "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", LAUNCH, "--dry-run", "--out", str(out), "--budget-s", "120"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), done.stdout


def certificate_digest(result) -> str:
    return certificate_sha256(result.labels, result.certificate.agree)


def test_dry_run_writes_every_key_and_a_row_per_run(dry_run: tuple[dict, str, str]) -> None:
    report, table, _ = dry_run
    assert set(report) == REPORT_KEYS and report["dry_run"] is True
    assert report["environment"]["host_cpu"] == report["environment"]["device_name"] == cpu_name()  # no CUDA: the CPU
    assert {(r["method"], r["precision"], r["variant"]) for r in report["runs"]} >= {
        ("denoisecertify", "fp32", "eager"), ("segcertify", "fp32", "eager"),
        ("denoisecertify", "bf16", "eager"), ("segcertify", "bf16", "eager")}
    for run in report["runs"]:
        assert set(run) == RUN_KEYS
        assert set(run["stages"]) == set(STAGES)
        assert run["certificates_identical"] and run["labels_on_device"] and run["noise_backend"] == "torch"
        assert run["samples_per_s"] == pytest.approx((DRY_RUN.n0 + DRY_RUN.n) / run["seconds_per_image"])
        assert run["peak_gpu_mib"] is None and run["flop_limit_fraction"] is None  # no GPU, no datasheet peak
    denoise = [r for r in report["runs"] if r["method"] == "denoisecertify"]
    assert all(r["stages"]["denoise"] > 0 for r in denoise)
    assert all(r["stages"]["denoise"] == 0 for r in report["runs"] if r["method"] == "segcertify")
    assert {name: info["status"] for name, info in report["sections"].items()} == dict.fromkeys(
        ["environment", "models", "flops", "eager", "compiled", "eager-fp32", "compiled-more", "served"], "done")
    rows = [line for line in table.splitlines() if line.startswith("| denoisecertify") or line.startswith("| segcert")]
    assert len(rows) == len(report["runs"])
    assert report["target"]["met"] is None and report["target"]["best_seconds_per_image"] is None  # no fp16 on CPU


def test_dry_run_certificates_equal_certify_image_run_directly(dry_run: tuple[dict, str, str]) -> None:
    """Same models, image and seed through the plain runtime (numpy labels, host counts, no timer): same bytes."""
    report, _, _ = dry_run
    threads = torch.get_num_threads()
    torch.set_num_threads(report["environment"]["torch_threads"])  # CPU bf16 sums depend on the thread count
    try:
        _check_digests(report)
    finally:
        torch.set_num_threads(threads)


def _check_digests(report: dict) -> None:
    denoiser, segmenter = build_models(DRY_RUN, "cpu")
    image = suite_image(DRY_RUN)
    checked = 0
    for run in report["runs"]:
        if run["variant"] != "eager":
            continue
        pipeline = make_pipeline(DRY_RUN, run["method"], denoiser, segmenter)
        runtime = torch_runtime(pipeline, device=torch.device("cpu"), precision=run["precision"],
                                batch_size=DRY_RUN.batch, noise_backend="torch")
        result = certify_image(runtime, image, num_classes=DRY_RUN.num_classes, sigma=DRY_RUN.sigma, n0=DRY_RUN.n0,
                               n=DRY_RUN.n, tau=DRY_RUN.tau, alpha=DRY_RUN.alpha, seed=DRY_RUN.seed)
        assert len(np.unique(result.certificate.agree)) > 3  # counts that vary, so the digest can tell
        assert certificate_digest(result) == run["certificate_sha256"], run
        checked += 1
    assert checked == 4
    compiled = {(r["method"], r["precision"]): r["certificate_sha256"] for r in report["runs"]
                if r["variant"].startswith("compiled")}
    eager = {(r["method"], r["precision"]): r["certificate_sha256"] for r in report["runs"] if r["variant"] == "eager"}
    assert compiled and all(eager[key] == digest for key, digest in compiled.items())


def test_missing_parts_are_one_skipped_line_each(dry_run: tuple[dict, str, str]) -> None:
    report, table, stdout = dry_run
    skipped = report["skipped"]
    assert all("\n" not in line for line in skipped)
    assert [line.split(":")[0] for line in skipped] == ["cuda", "served"]
    assert "no tritonserver" in skipped[1] and report["served"]["status"].startswith("skipped: no tritonserver")
    assert all(f"- {line}" in table for line in skipped)
    assert stdout.count("skipped: ") == 2


def test_device_runtime_yields_the_labels_as_tensors_with_the_same_values() -> None:
    denoiser, segmenter = build_models(DRY_RUN, "cpu")
    pipeline = make_pipeline(DRY_RUN, "segcertify", denoiser, segmenter)
    kept = device_runtime(pipeline, torch.device("cpu"), "fp32", 5)
    plain = torch_runtime(pipeline, device=torch.device("cpu"), batch_size=5, noise_backend="torch")
    image = suite_image(DRY_RUN)
    batches = list(kept.labels(image, sigma=0.25, seed=3, start=2, count=12))
    assert [type(b) for b in batches] == [torch.Tensor] * 3
    expected = np.concatenate(list(plain.labels(image, sigma=0.25, seed=3, start=2, count=12)))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)


def test_a_spent_budget_skips_each_configuration_with_one_line(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    assert main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    assert torch.get_num_threads() == threads  # the dry run's one thread is not left behind
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report) == REPORT_KEYS and report["runs"] == []
    budget_lines = [line for line in report["skipped"] if "s left, about" in line]
    assert len(budget_lines) == 2 * 2 + 2  # eager: 2 methods x fp32, bf16; compiled: 2 methods x bf16


def test_the_full_size_suite_needs_a_gpu_and_says_so_in_one_line(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dry-run" in err
    assert main(["--dry-run", "--out", str(tmp_path), "--images", "0"]) == 2


def test_full_size_flops_give_the_issue_s_flop_limit() -> None:
    """Counted on the meta device: HRNetV2-W48 at 1024×2048 is the published ~0.7 TMAC; one DenoiseCertify image
    (110 samples) at 989 TFLOP/s takes about 0.4 s."""
    denoise = count_flops(FULL, "denoisecertify")
    segment = count_flops(FULL, "segcertify")
    assert segment["denoiser_per_sample"] == 0
    assert segment["segmenter_per_sample"] == denoise["segmenter_per_sample"]
    assert denoise["per_sample"] == denoise["denoiser_per_sample"] + denoise["segmenter_per_sample"]
    assert denoise["per_image"] == 110 * denoise["per_sample"]
    assert 0.95 < segment["segmenter_per_sample"] / 2 / 696.2e9 < 1.15  # HRNet paper: 696.2 GFLOPs (MACs)
    assert 0.35 < denoise["per_image"] / 989.4e12 < 0.45


def test_gpu_only_fields_render_in_both_files(tmp_path: Path, dry_run: tuple[dict, str, str]) -> None:
    """What only a GPU fills in (peaks, fractions, memory, the target) still writes strict JSON and a table."""
    from certseg.bench.gpu.flops import PEAK_TFLOPS, peak_for
    from certseg.bench.gpu.report import write

    report = json.loads(json.dumps(dry_run[0]))
    peaks = {"device": "NVIDIA H200", "tflops": PEAK_TFLOPS["H200"], "source": "NVIDIA datasheet, dense, SXM"}
    assert peak_for(peaks, "fp16") == (989.4, "fp16")
    assert peak_for(peaks, "fp32") == ((494.7, "tf32") if torch.backends.cudnn.allow_tf32 else (66.9, "fp32"))
    run = {**report["runs"][0], "precision": "fp16", "variant": "compiled-reduce-overhead", "peak_gpu_mib": 20480.5,
           "flop_limit_s": 0.415, "peak_rate": "fp16", "flop_limit_fraction": 0.25, "seconds_per_image": float("nan")}
    report.update(peak=peaks, measured_matmul_tflops={"bf16": 790.2}, runs=[run],
                  target={**report["target"], "best_seconds_per_image": 1.2, "best_variant": run["variant"],
                          "met": True})
    write(tmp_path, report)
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["runs"][0]["seconds_per_image"] is None  # NaN never reaches the file
    table = (tmp_path / "gpu.md").read_text()
    assert "25.0 % of fp16" in table and "20480" in table and "790 TFLOP/s" in table and "met: True" in table
    assert not list(tmp_path.glob(".*partial"))
