"""How closely an exported graph matches its torch module: the inputs compared on, and the statistics kept.

The same inputs also trace the graphs (``denoiser_parity_inputs`` / ``segmenter_parity_inputs`` at batch 2),
so parity is always measured at batches the graph was not traced at.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from certseg.engine.errors import CertsegError, first_line
from certseg.engine.maths.stages import normalize_imagenet
from certseg.engine.models.ort_module import OrtModule
from certseg.export.exported_graph import ExportedGraph
from certseg.export.progress import Log, note

PARITY_BATCHES: tuple[int, ...] = (1, 3)
"""Parity batches: neither is the traced example batch (2), so they also prove the batch is dynamic."""
PARITY_TIMESTEPS: tuple[int, ...] = (999, 73, 144, 258)
"""DenoiseCertify's t* for σ = 0.25/0.5/1 and the schedule's end, where fp16 rounding of t·f is worst."""
PROBE_TOLERANCE = 1e-3
"""Relative max error under which a graph traced with dynamic h/w counts as valid at another size."""


def denoiser_parity_inputs(size: tuple[int, int], batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t ~ N(0, 1) (the scale x_t has at every t) and timesteps cycling through ``PARITY_TIMESTEPS``."""
    x_t = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + batch))
    timesteps = torch.tensor([PARITY_TIMESTEPS[i % len(PARITY_TIMESTEPS)] for i in range(batch)])
    return x_t, timesteps


def segmenter_parity_inputs(size: tuple[int, int], batch: int, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised images: smooth random colour fields (upsampled 8x8 noise) plus fine noise in [0, 1]."""
    generator = torch.Generator().manual_seed(seed + 100 + batch)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    fine = 0.1 * torch.rand(batch, 3, *size, generator=generator)
    return normalize_imagenet((0.9 * smooth + fine).clamp(0, 1))


def parity_stats(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """max/mean |got - reference|, the reference's scale, and the fraction of positions whose argmax over
    dim 1 (the class, for segmenters) agrees."""
    if tuple(got.shape) != tuple(reference.shape):
        raise CertsegError(f"ONNX output shape {tuple(got.shape)} differs from torch's {tuple(reference.shape)}")
    diff = (got.double() - reference.double()).abs()
    return {
        "batch": int(reference.shape[0]),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "ref_max_abs": float(reference.abs().max()),
        "argmax_agreement": float((got.argmax(1) == reference.argmax(1)).double().mean()),
    }


def check_parity(
    torch_callable: Callable[..., torch.Tensor],
    onnx_path: str | Path,
    inputs: Sequence[torch.Tensor],
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Run ``inputs`` through torch and through the ONNX file (ONNX Runtime); ``parity_stats`` of the two."""
    with torch.no_grad():
        reference = torch_callable(*inputs)
    got = OrtModule(onnx_path, providers=providers, threads=threads)(*inputs)
    return parity_stats(reference, got)


def measure_parity(
    graph: ExportedGraph,
    reference_fn: Callable[..., torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, ...]],
    *,
    threads: int | None,
    log: Log | None,
) -> None:
    """Fill ``graph.parity`` (fp32 and fp16 files against one torch reference per batch) and report it."""
    started = time.perf_counter()
    variants = {"fp32": graph.path} | ({"fp16": graph.fp16_path} if graph.fp16_path is not None else {})
    sessions = {name: OrtModule(path, providers=["CPUExecutionProvider"], threads=threads)
                for name, path in variants.items()}
    graph.parity = {name: [] for name in variants}
    for inputs in batches:
        with torch.no_grad():
            reference = reference_fn(*inputs)
        for name, session in sessions.items():
            stats = parity_stats(reference, session(*inputs))
            graph.parity[name].append(stats)
            note(log, f"{graph.role} {name} parity at batch {stats['batch']}: max |Δ| {stats['max_abs']:.2e} "
                      f"(scale {stats['ref_max_abs']:.2g}), argmax agreement {stats['argmax_agreement']:.6f}")
    graph.seconds["parity"] = time.perf_counter() - started


def probe_size(size: tuple[int, int]) -> tuple[int, int]:
    """A second input size, about half the traced one and never equal to it, to test dynamic h/w."""
    probe = tuple(max(s // 2, 32) + 4 for s in size)
    return tuple(p + 4 if p == s else p for p, s in zip(probe, size, strict=True))  # type: ignore[return-value]


def size_probe_failure(module: nn.Module, path: Path, size: tuple[int, int], threads: int | None) -> str | None:
    """None when a segmenter graph traced with dynamic h/w matches torch at ``probe_size(size)``, else why not."""
    images = segmenter_parity_inputs(probe_size(size), 1, seed=7)
    try:
        with torch.no_grad():
            reference = module(images)
        got = OrtModule(path, providers=["CPUExecutionProvider"], threads=threads)(images)
        stats = parity_stats(reference, got)
    except Exception as error:  # any failure at the other size means the graph is not size-generic
        return first_line(error, with_type=True)
    if stats["max_abs"] > PROBE_TOLERANCE * max(1.0, stats["ref_max_abs"]):
        return f"max |Δ| {stats['max_abs']:.2e} at {probe_size(size)}"
    return None
