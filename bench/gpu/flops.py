"""FLOPs per sample (counted on the ``meta`` device: shapes only, no memory, no time) and the peak they are set
against, so each measured time can be read as a fraction of the FLOP limit (FLOPs per image / peak FLOP/s).
The count is the official models' (HRNet's head in the official order); the suite runs the head factored
(``HRNetV2.factor_head``), which does fewer, so the fraction is the official work over the time taken."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from certseg.bench.gpu.models import Profile, build_models, make_pipeline

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
}
"""NVIDIA's dense (no sparsity) tensor-core figures for the SXM parts; fp32 is the non-tensor-core rate."""


def count_flops(profile: Profile, method: str) -> dict[str, float]:
    """FLOPs of one sample through the label pipeline (matmuls and convolutions, as FlopCounterMode counts them)."""
    denoiser, segmenter = build_models(profile, "meta")
    pipeline = make_pipeline(profile, method, denoiser, segmenter)
    noisy = torch.empty((1, 3, *profile.image_size), device="meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        pipeline(noisy)
    counts = counter.get_flop_counts()
    per_module = {role: float(sum(counts.get(f"LabelPipeline.{role}", {}).values())) for role in ("denoiser",
                                                                                                 "segmenter")}
    per_sample = float(counter.get_total_flops())
    return {"per_sample": per_sample, **{f"{role}_per_sample": value for role, value in per_module.items()},
            "per_image": per_sample * (profile.n0 + profile.n)}


def device_peaks(device: torch.device) -> dict[str, Any] | None:
    """The peak table of this GPU (None: not a GPU the table knows, fractions are then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return {"device": name, "tflops": peaks, "source": "NVIDIA datasheet, dense, SXM"}
    return None


def peak_for(peaks: dict[str, Any] | None, precision: str) -> tuple[float | None, str | None]:
    """(TFLOP/s, which rate) for a precision: fp32 runs its convolutions on TF32 tensor cores when cuDNN may."""
    if peaks is None:
        return None, None
    if precision == "fp32":
        rate = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
        return peaks["tflops"][rate], rate
    return peaks["tflops"][precision], precision


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, seconds: float = 0.5) -> float:
    """What a plain square matmul reaches here (the practical ceiling, beside the datasheet's peak)."""
    a = torch.randn((size, size), device=device, dtype=dtype)
    b = torch.randn((size, size), device=device, dtype=dtype)
    torch.matmul(a, b)
    torch.cuda.synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            torch.matmul(a, b)
        torch.cuda.synchronize(device)
        count += 10
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e12
