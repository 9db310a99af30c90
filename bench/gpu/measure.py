"""One measured configuration (method × precision × eager/compiled) through the shipped path: ``torch_runtime`` with
noise drawn on the device, labels kept there and counted there, ``certify_image``; the stage split from the bench's
``StageTimer`` on one more image (its synchronisation would slow the throughput images, so they run without it)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.bench.gpu.models import Profile, make_pipeline
from certseg.bench.timing import StageTimer, gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from certseg.engine.core.pipeline import CertifiedSegmentation, certify_image
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.digest import certificate_sha256
from certseg.engine.runtimes.torch_runtime import torch_runtime


def certificate_digest(result: CertifiedSegmentation) -> str:
    """The certificate's sha256 (``certseg.engine.digest.certificate_sha256``, the digest tests pin)."""
    return certificate_sha256(result.labels, result.certificate.agree)


def device_runtime(pipeline: nn.Module, device: torch.device, precision: str, batch: int) -> LocalRuntime:
    """The torch runtime as shipped, with noise drawn on the device and labels left there."""
    return torch_runtime(pipeline, device=device, precision=precision, batch_size=batch, noise_backend="torch",
                         keep_labels_on_device=True)


def compiled(module: nn.Module, backend: str, mode: str) -> nn.Module:
    """``torch.compile`` of one model for one batch shape (``mode`` applies to inductor only)."""
    options: dict[str, Any] = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    return torch.compile(module, backend=backend, dynamic=False, **options)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    profile: Profile, method: str, precision: str, variant: str, models: tuple[nn.Module, nn.Module],
    device: torch.device, image: np.ndarray,
) -> dict[str, Any]:
    """Warm up on one image, time ``profile.images`` images, then split one more into stages; one record."""
    pipeline = make_pipeline(profile, method, *models)
    runtime = device_runtime(pipeline, device, precision, profile.batch)

    def certify(on: Any) -> CertifiedSegmentation:
        result = certify_image(on, image, num_classes=profile.num_classes, sigma=profile.sigma, n0=profile.n0,
                               n=profile.n, tau=profile.tau, alpha=profile.alpha, seed=profile.seed)
        _sync(device)
        return result

    reset_gpu_peak(device)
    started = time.perf_counter()
    first = certify(runtime)
    warm_up_s = time.perf_counter() - started
    digests = [certificate_digest(first)]
    seconds = []
    for _ in range(profile.images):
        started = time.perf_counter()
        digests.append(certificate_digest(certify(runtime)))
        seconds.append(time.perf_counter() - started)
    timer = StageTimer(device)
    try:
        timed = certify(timer.wrap(runtime))
        stages = {**timer.snapshot(), "certify": timed.timings["certify"]}
    finally:
        timer.close()
    digests.append(certificate_digest(timed))
    per_image = float(np.mean(seconds))
    samples = profile.n0 + profile.n
    return {
        "method": method, "precision": precision, "variant": variant, "images": len(seconds),
        "seconds_per_image": per_image, "seconds_per_image_min": float(np.min(seconds)),
        "samples_per_s": samples / per_image, "warm_up_s": warm_up_s,
        "stages": stages, "stage_split_total_s": float(sum(stages.values())),
        "peak_gpu_mib": gpu_peak_mib(device), "peak_rss_mib": peak_rss_mib(),
        "certificate_sha256": digests[0], "certificates_identical": len(set(digests)) == 1,
        "certified_fraction": float(first.certificate.certified.mean()),
        "non_finite": first.non_finite,
        "labels_on_device": bool(getattr(runtime, "keep_labels_on_device", False)),
        "noise_backend": str(runtime.noise_backend),
    }
