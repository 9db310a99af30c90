"""The precision-agreement benchmark at a tiny size: the labels it compares are the runtime's, its counts add up,
it resumes, and fp32 against itself is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from certseg.bench.precision_agreement import labels_at, scene_agreement
from certseg.engine.choices import Method, Precision
from certseg.engine.models.registry import shipped_models
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings

pytestmark = pytest.mark.skipif("procedural-hrnet-noise025" not in shipped_models(),
                                reason="the shipped default models are not in engine/weights")
IMAGE = np.random.default_rng(4).random((3, 32, 64), dtype=np.float32)


def test_the_labels_are_those_of_the_certify_runtime_and_the_counts_add_up() -> None:
    session = Session.open(Settings(method="segcertify", device="cpu", batch=3))
    _, runtime = session.runtime_for((32, 64))
    direct = np.concatenate(list(runtime.labels(IMAGE, sigma=0.25, seed=5, start=0, count=3)))
    np.testing.assert_array_equal(labels_at(Method.segcertify, Precision.fp32, 0.25, IMAGE, 5, 3), direct)
    record = scene_agreement(Method.segcertify, Precision.bf16, 0.25, IMAGE, seed=5, samples=3)
    lower = labels_at(Method.segcertify, Precision.bf16, 0.25, IMAGE, 5, 3)
    assert record["pixels"] == direct.size == 3 * 32 * 64
    assert record["equal"] == int((lower == direct).sum())
    assert record["worst_sample_agreement"] <= record["agreement"] == record["equal"] / record["pixels"]


def test_runs_resume_and_refuse_fp32(tmp_path: Path) -> None:
    out = tmp_path / "agree.jsonl"
    command = [sys.executable, "-m", "certseg.bench.precision_agreement", "--images", "2", "--samples", "1",
               "--method", "segcertify", "--scene-size", "32x64", "--threads", "1", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scene"] for r in lines] == sorted({r["scene"] for r in lines}) and len(lines) == 2
    assert "bf16 folded head-factored agrees with fp32" in first.stdout
    assert all(r["fold_batchnorm"] and r["factor_head"] for r in lines)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 2  # nothing measured twice
    refused = subprocess.run([*command[:3], "--precision", "fp32", "--no-fold-batchnorm", "--no-factor-head", "--out",
                              str(out)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "fp32 --no-fold-batchnorm --no-factor-head is the reference" in refused.stderr
    folded = subprocess.run([*command, "--precision", "fp32", "--images", "1"], capture_output=True, text=True,
                            timeout=300)
    assert folded.returncode == 0 and "fp32 folded head-factored agrees with fp32" in folded.stdout, folded.stderr


def test_int8_is_compared_with_fp32_on_onnx_runtime_and_both_are_timed(monkeypatch, tmp_path: Path) -> None:
    """int8 graphs run only in ONNX Runtime, so its reference is the fp32 graph there (bf16's stays torch)."""
    pytest.importorskip("onnxruntime.quantization")
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    record = scene_agreement(Method.segcertify, Precision.int8, 0.25, IMAGE, seed=5, samples=2, threads=1)
    reference = labels_at(Method.segcertify, Precision.fp32, 0.25, IMAGE, 5, 2, runtime="onnx", threads=1)
    lower = labels_at(Method.segcertify, Precision.int8, 0.25, IMAGE, 5, 2, threads=1)
    assert record["runtime"] == "onnx" and record["equal"] == int((reference == lower).sum())
    assert record["seconds"] > 0 and record["seconds_fp32"] > 0
    assert scene_agreement(Method.segcertify, Precision.bf16, 0.25, IMAGE, seed=5, samples=1)["runtime"] == "torch"
