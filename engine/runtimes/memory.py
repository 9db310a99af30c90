"""Whether certifying an image fits in memory, decided before the first forward pass.

The bytes one sample holds after each op of the label pipeline grow linearly with the image's pixels (noise,
noisy copy, the segmenter's activations, full-size logits; the denoiser works at its own fixed size), so two
tiny probe runs of the real pipeline, with every tensor they allocate tracked, give one line per op, and the
peak at any size is the highest of those lines (``probe_pipeline_memory``). Added to that are the per-image
arrays the engine keeps on the host (counters, certificate, overlay), counted per pixel below, a margin and a
fixed overhead, both measured against the peak resident memory of real runs (``tests/test_memory.py``).

An image that cannot fit is refused in seconds with one line naming the estimate, the memory available and a
``--batch`` (or image size) that fits, instead of failing after minutes with a traceback. The first guard, the
pixel limit checked from image headers, is ``certseg.engine.limits``.

torch is imported only to probe or to ask a CUDA device (``tensor_bytes`` holds the tracking): clients of a
server, which hold no model memory, import this module for its types without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certseg.engine.cache import cache_dir, write_json_file
from certseg.engine.errors import InputError

__all__ = ["MemoryEstimate", "PipelineMemory", "estimate_memory", "probe_pipeline_memory"]

_TENSOR_BYTES = ("LiveTensorBytes", "tensor_timeline")
"""Names of ``certseg.engine.runtimes.tensor_bytes`` also reachable here, loaded (with torch) on first use."""


def __getattr__(name: str) -> Any:
    if name in _TENSOR_BYTES:
        from certseg.engine.runtimes import tensor_bytes

        return getattr(tensor_bytes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_bytes(count: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (1.5 GiB, 312.0 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """One field of a cgroup ``memory.stat`` file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def host_available_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Memory this process can still take: MemAvailable, capped by the headroom under the cgroup's limit
    (containers; page cache that can be dropped counts as free); None if unknown (not Linux)."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):
            used = max(0, usage - _stat(cgroup / stat_file, inactive))
            headroom = max(0, limit - used)
            available = headroom if available is None else min(available, headroom)
            break
    return available


def device_available_bytes(device: str) -> int | None:
    """Free memory of a CUDA device (what the driver has free plus what torch's cache holds unused); None for
    the CPU (see ``host_available_bytes``) and other devices."""
    import torch

    resolved = torch.device(device)
    if resolved.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(resolved)
    return int(free + torch.cuda.memory_reserved(resolved) - torch.cuda.memory_allocated(resolved))


SAMPLING_HOST_BYTES_PER_PIXEL = 48
"""Host bytes per image pixel held while sampling, besides the batch and K bytes of selection counts: the pixel
index and update temporaries of the counters (8-byte ints), guess and agreements (measured: 42 with K = 8)."""
NUMPY_NOISE_BYTES_PER_PIXEL = 12
"""numpy-philox noise is drawn on the host, 3 float32 values per pixel per sample, before torch copies it."""
OUTPUT_BYTES_PER_PIXEL = 128
"""Host bytes per pixel after sampling: the certificate (p-values, flags) and the overlay's float temporaries
(measured: about 110)."""
MARGIN = 1.3
"""Headroom on the tracked bytes for what tracking cannot see: memory the allocator holds but no tensor uses
(measured on CPU: resident memory grows up to 1.22× the tracked bytes), convolution scratch space."""
ONNX_MARGIN = 1.7
"""The same for ONNX Runtime, which is estimated from the torch models it was exported from but keeps its own
arena and copies every input and output (measured on CPU: 1.58× the torch pipeline's tracked bytes)."""
OVERHEAD_BYTES = 384 << 20
"""Once per run on a CUDA device (and on the host beside it): what the first forward passes load (kernels,
workspaces); not measured on a GPU yet, so it keeps the CPU's first, larger figure."""
CPU_OVERHEAD_BYTES = 256 << 20
"""Once per run on CPU: what the probe and the first forward passes load (thread pools, oneDNN kernels and their
scratch). Measured with the shipped models and BatchNorm folded (fresh processes, two threads, huge pages, batch 4,
peak RSS growth over a whole certify): 153-190 MiB at 128x256, 211-325 MiB at 384x768 and 457-644 MiB at
768x1536, whose per-pixel parts the lines above cover; 384 MiB (from the unfolded models) put the estimate at
2.5x a real run's growth at 384x768."""
PROBE_SIDES = (128, 256)
"""The segmenter input sides of the two probe runs: small, and multiples of 32 so that every stride of a
segmenter divides them and activations are exactly proportional to the pixels."""
PROBE_BATCH = 2
PROBE_VERSION = 1
"""Part of the key of cached probe results: bump when the probe or what it runs changes."""
AUTO_BATCH_LIMITS = {"cpu": 4, "cuda": 64}
"""The largest auto batch per device type. On CPU the cores are busy at one sample and larger batches only cost
page faults and memory (``python -m certseg.bench.batch_sweep``, DenoiseCertify 256×512, one thread: batch 1 / 4 /
16 / 64 took 13.0 / 13.0 / 14.4 / 16.7 s with peaks of 345 / 508 / 997 / 2425 MiB); a GPU needs more samples in
flight to be busy."""
AUTO_MEMORY_FRACTION = 0.75
"""The share of the memory available an auto batch may plan to use: the rest is left to other processes and to
what grows while the run lasts (the estimate itself already holds its margins)."""


CPU_BATCH_PIXELS = 1 << 19
"""On CPU an auto batch holds at most this many image pixels (524,288: four 256×512 images, one 512×1024): past
it activations leave the caches and a sample costs more in a batch than alone (HRNet, one thread, 512×1024:
0.23 s per sample at batch 1, 0.28 s at batch 4)."""


CPU_MODEL_CALL_PIXELS = CPU_BATCH_PIXELS
"""On CPU one model call takes at most this many image pixels (524,288: four 256×512 images, one 512×1024),
whatever ``--batch`` asks: a larger batch is drawn as one and run as several calls (``LocalRuntime.model_batch``).
Measured (``batch_sweep``, DenoiseCertify 256×512, one thread, torch's huge pages on, medians of 2): batch 1 / 4 /
16 / 64 as single calls took 12.5 / 11.2 / 12.5 / 17.3 s, with 1.3 / 1.3 / 3.2 / 8.1 s of system time: a call past
the budget pays for fresh activation memory every time. Below it, a batch's certificate is what it was."""


def cpu_model_batch(device: str, image_size: tuple[int, int]) -> int | None:
    """The most samples one model call takes on ``device`` for images of ``image_size``: on CPU (and other non-CUDA
    types) ``CPU_MODEL_CALL_PIXELS`` worth, at least 1; None on CUDA (the batch is the call)."""
    return _model_call_limit(device, image_size[0] * image_size[1])


def _model_call_limit(device: str, num_pixels: int) -> int | None:
    if str(device).split(":")[0] == "cuda":
        return None
    return max(1, CPU_MODEL_CALL_PIXELS // max(1, num_pixels))


BATCH_BUFFER_BYTES_PER_PIXEL = 24
"""Per sample of a batch beyond one model call: its float32 noise and noisy copy (3 channels each)."""
OVERLAP_BYTES_PER_PIXEL = 24
"""On CPU, per sample of a model call, for the stage maths in the runtime's second thread (``LocalRuntime.overlaps``):
the other slot's noisy copy (12, float32 RGB; the noise buffer is shared) and the next call's model input (12); the
label step of the call before adds its one sample's full-size float32 scores (4 bytes per class, counted with the
classes)."""


def auto_batch_limit(device: str, image_size: tuple[int, int] | None = None) -> int:
    """The largest auto batch on ``device`` (cpu, cuda, cuda:1; another type: the CPU's), for images of
    ``image_size`` where given (on CPU: at most ``CPU_BATCH_PIXELS`` pixels per batch, at least 1)."""
    kind = str(device).split(":")[0]
    limit = AUTO_BATCH_LIMITS.get(kind, AUTO_BATCH_LIMITS["cpu"])
    if image_size is not None and kind != "cuda":  # the pixel budget is the CPU caches'; other types count as CPU
        limit = max(1, min(limit, CPU_BATCH_PIXELS // max(1, image_size[0] * image_size[1])))
    return limit


@dataclass(frozen=True)
class PipelineMemory:
    """Peak tensor bytes of one sample through the label pipeline at any image size: the largest of a few lines
    ``base + per_pixel × pixels``, one per moment of the run (see ``probe_pipeline_memory``)."""

    lines: tuple[tuple[float, float], ...]
    """(base bytes, bytes per image pixel) per sample; none is below another at every size."""
    probe: dict[str, Any]
    """How it was measured: the probe image sizes and peaks, for the record."""

    def per_sample(self, num_pixels: int) -> float:
        return max(0.0, max((base + per_pixel * num_pixels for base, per_pixel in self.lines), default=0.0))


def probe_sizes(scale: float) -> list[tuple[int, int]]:
    """Square probe images whose segmenter inputs (``scale`` × side) are the ``PROBE_SIDES``."""
    return [(max(1, round(side / scale)),) * 2 for side in PROBE_SIDES]  # type: ignore[misc]


def _upper_lines(lines: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """The lines not below another one at every size >= 0 (so that few are kept)."""
    kept = {line for line in lines if not any(o != line and o[0] >= line[0] and o[1] >= line[1] for o in lines)}
    return tuple(sorted(kept))


def probe_pipeline_memory(make_run: Callable[[tuple[int, int]], Callable[[], object]], scale: float) -> PipelineMemory:
    """Per-sample peak bytes at any size, from two small probe runs of the real pipeline.

    ``make_run(size)`` builds (untracked: moving weights is not the run's memory) a call that pushes
    ``PROBE_BATCH`` samples of a ``size`` image through the pipeline. A peak is not linear in the pixels (at
    small sizes the denoiser's fixed-size work is the peak, at large sizes the full-size logits are), but the
    occupancy after each op is: both runs make the same ops in the same order, so op i gives one line through
    its two occupancies, and the peak at any size is the largest of those lines. When the runs differ in their
    ops (e.g. a sliding window that takes more windows), the bound is the small run's peak plus the large run's
    peak per pixel, which is above any mix of a fixed part and a part proportional to the pixels.
    """
    from certseg.engine.runtimes.tensor_bytes import tensor_timeline

    sizes = probe_sizes(scale)
    runs = [make_run(size) for size in sizes]
    runs[0]()  # warm-up: first calls allocate caches that later calls reuse
    first, second = (np.asarray(tensor_timeline(run), dtype=np.float64) / PROBE_BATCH for run in runs)
    (n1, n2) = [h * w for h, w in sizes]
    if len(first) == len(second) and len(first) and n1 != n2:
        per_pixel = (second - first) / (n2 - n1)
        lines = _upper_lines(list(zip((first - per_pixel * n1).tolist(), per_pixel.tolist(), strict=True)))
        fit = "one line per op"
    else:
        lines = ((float(first.max(initial=0)), float(second.max(initial=0)) / n2),)
        fit = "small peak + large peak per pixel"
    probe = {"probe_sizes": [list(size) for size in sizes], "fit": fit,
             "probe_peak_bytes_per_sample": [float(first.max(initial=0)), float(second.max(initial=0))]}
    return PipelineMemory(lines, probe)


def cached_pipeline_memory(key: Sequence[object], probe: Callable[[], PipelineMemory]) -> PipelineMemory:
    """``probe()`` once per key: kept as JSON in the cache folder, since its numbers depend only on the models
    and settings in ``key`` and on torch's version, and the probe costs a few forward passes."""
    import torch

    digest = hashlib.sha256(json.dumps([PROBE_VERSION, torch.__version__, *key], default=str).encode())
    path = cache_dir() / "memory" / f"{digest.hexdigest()[:24]}.json"
    try:
        data = json.loads(path.read_text())
        return PipelineMemory(tuple((float(a), float(b)) for a, b in data["lines"]), dict(data["probe"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    memory = probe()
    write_json_file(path, {"key": [str(part) for part in key], "lines": memory.lines, "probe": memory.probe})
    return memory


@dataclass(frozen=True)
class MemoryEstimate:
    """What certifying one image at one batch size needs, where, and what is available there."""

    image_size: tuple[int, int]
    batch: int
    device: str
    num_classes: int
    pipeline: PipelineMemory
    numpy_noise: bool
    available: dict[str, int | None]
    """Bytes available per place: "host", and the CUDA device when the batch runs on one."""
    margin: float = MARGIN
    """Headroom on the probed pipeline bytes (``ONNX_MARGIN`` for ONNX Runtime)."""

    @property
    def num_pixels(self) -> int:
        return self.image_size[0] * self.image_size[1]

    @property
    def overhead_bytes(self) -> int:
        """The once-per-run overhead where the samples run (``CPU_OVERHEAD_BYTES`` on CPU, else ``OVERHEAD_BYTES``)."""
        return CPU_OVERHEAD_BYTES if self.device == "cpu" else OVERHEAD_BYTES

    def needs(self, batch: int | None = None, num_pixels: int | None = None) -> dict[str, int]:
        """Peak bytes beyond what is already allocated (models, the image), per place."""
        batch = self.batch if batch is None else batch
        pixels = self.num_pixels if num_pixels is None else num_pixels
        # One model call's samples go through the whole pipeline; the rest of a larger batch (CPU calls are capped,
        # ``cpu_model_batch``) only holds its noise and noisy copy meanwhile.
        limit = _model_call_limit(self.device, pixels)
        call = batch if limit is None else min(batch, limit)
        samples = self.margin * (call * self.pipeline.per_sample(pixels)
                                 + (batch - call) * BATCH_BUFFER_BYTES_PER_PIXEL * pixels)
        if limit is not None:  # CPU: the overlapped stage maths hold a call's worth more, and one label step
            samples += self.margin * (call * OVERLAP_BYTES_PER_PIXEL + 4 * self.num_classes) * pixels
        noise = batch * NUMPY_NOISE_BYTES_PER_PIXEL * pixels if self.numpy_noise else 0
        sampling = MARGIN * ((SAMPLING_HOST_BYTES_PER_PIXEL + self.num_classes) * pixels + noise)
        outputs = MARGIN * OUTPUT_BYTES_PER_PIXEL * pixels
        if self.device == "cpu":
            return {"host": int(self.overhead_bytes + max(sampling + samples, outputs))}
        on_device = OVERHEAD_BYTES + samples + MARGIN * 12 * pixels  # plus the image's copy on the device
        return {"host": int(OVERHEAD_BYTES + max(sampling, outputs)), self.device: int(on_device)}

    def shortfall(self, batch: int | None = None, num_pixels: int | None = None, fraction: float = 1.0) -> str | None:
        """The first place where the run does not fit (in ``fraction`` of what is available), or None."""
        for place, needed in self.needs(batch, num_pixels).items():
            available = self.available.get(place)
            if available is not None and needed > fraction * available:
                return place
        return None

    def auto_batch(self, upper: int, fraction: float = AUTO_MEMORY_FRACTION) -> int:
        """The largest batch from 1 to ``upper`` whose estimate fits ``fraction`` of the memory available everywhere;
        1 when none does (``check`` then says whether 1 fits at all)."""
        return _largest(1, max(1, int(upper)), lambda batch: self.shortfall(batch=batch, fraction=fraction) is None)

    def largest_batch(self) -> int | None:
        """The largest batch up to the requested one that fits, or None when not even 1 does."""
        batch = _largest(1, max(1, self.batch), lambda b: self.shortfall(batch=b) is None)
        return batch if self.shortfall(batch=batch) is None else None

    def largest_image(self, batch: int) -> int:
        """About the most pixels an image may have to fit at ``batch`` (bisection on the estimate)."""
        return _largest(0, max(1, self.num_pixels),
                        lambda pixels: self.shortfall(batch=batch, num_pixels=pixels) is None)

    def check(self) -> None:
        """Raise one line when the run cannot fit: the estimate, what is available, and what would fit."""
        place = self.shortfall()
        if place is None:
            return
        height, width = self.image_size
        needed, available = self.needs()[place], self.available[place]
        where = "memory" if place == "host" else f"{place} memory"
        message = (
            f"certifying a {height}x{width} image at --batch {self.batch} needs about {format_bytes(needed)} of "
            f"{where} (estimate), but {format_bytes(available or 0)} is available"
        )
        fits = self.largest_batch()
        if fits is not None:
            message += f"; --batch {fits} fits (about {format_bytes(self.needs(batch=fits)[place])})"
        else:
            largest = self.largest_image(1)
            message += (f"; even --batch 1 needs about {format_bytes(self.needs(batch=1)[place])}: at --batch 1 "
                        f"images up to about {largest:,} pixels fit (--max-pixels {largest})")
        raise InputError(message)

    def record(self) -> dict[str, Any]:
        """JSON-ready: the estimate and its parts, for the result's record."""
        return {
            "batch": self.batch,
            "needs_bytes": self.needs(),
            "available_bytes": self.available,
            "per_sample_bytes": int(self.margin * self.pipeline.per_sample(self.num_pixels)),
            "pipeline": {"lines": [list(line) for line in self.pipeline.lines], **self.pipeline.probe},
            "margin": self.margin,
            "overhead_bytes": self.overhead_bytes,
        }


def estimate_memory(
    pipeline: PipelineMemory,
    image_size: tuple[int, int],
    *,
    batch: int,
    device: str,
    num_classes: int,
    numpy_noise: bool,
    margin: float = MARGIN,
) -> MemoryEstimate:
    """The estimate for one image, with the memory available now on the host (and the CUDA device)."""
    available: dict[str, int | None] = {"host": host_available_bytes()}
    if device != "cpu":
        available[device] = device_available_bytes(device)
    return MemoryEstimate((int(image_size[0]), int(image_size[1])), int(batch), device, int(num_classes),
                          pipeline, numpy_noise, available, margin)


def _largest(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """The largest value in [low, high] that ``fits`` (which holds up to some value, then never: memory needs grow
    with the batch and the pixels), or ``low`` when none does: a bisection."""
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
