"""Where the time of a certification goes: noise, preprocess, denoise, segment, argmax, transfer, count, certify.

Why it needs no engine change: ``Session`` builds its runtime through ``runtime_factory`` when one is set, so the
bench builds the very runtime Session would (``torch_runtime`` with the same settings), wraps its label function
and its sample generator, and puts forward hooks on the denoiser and segmenter modules. The maths and the noise
are untouched, so timed and untimed runs give identical certificates.

One batch of ``LocalRuntime.labels`` then splits as:
- noise: from asking for the batch to entering the label function (per-sample noise draws, x + σ·ε, copies);
- preprocess: label function time not spent in the models or after the segmenter (resizes, 2x−1, x0 formula,
  ImageNet normalisation);
- denoise / segment: inside the denoiser / segmenter forward;
- argmax: from the segmenter's output to leaving the label function (upsampling logits, argmax);
- transfer: from leaving the label function to the batch arriving as numpy (device → host);
- count: what the consumer (mode / agreement counting) does before asking for the next batch;
- certify: p-values and Holm (from the engine's own ``certify`` timing).
On CUDA every boundary synchronises, so each stage owns its kernels (a small cost, paid by every variant alike).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.engine.choices import NoiseBackend, Precision
from certseg.engine.label_pipeline import LabelPipeline
from certseg.engine.runtimes.torch_runtime import torch_runtime
from certseg.engine.sampling import LabelFn, LocalRuntime, Runtime

STAGES: tuple[str, ...] = ("noise", "preprocess", "denoise", "segment", "argmax", "transfer", "count", "certify")


class StageTimer:
    """Accumulates seconds per stage; ``reset`` before an entry, ``snapshot`` after it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.gpu_utilization: list[float] = []
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        self._call: dict[str, float] | None = None
        self._started: dict[str, float] = {}
        self.last_enter = 0.0
        self.last_exit = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += max(0.0, seconds)

    def reset(self) -> None:
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.gpu_utilization = []

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)

    # ---------------------------------------------------------------- models
    def instrument(self, pipeline: LabelPipeline) -> None:
        """Hook the pipeline's models (once per module: sessions share cached models)."""
        for stage, module in (("denoise", pipeline.denoiser), ("segment", pipeline.segmenter)):
            if module is None or id(module) in self._hooked:
                continue
            self._hooked.add(id(module))
            self._handles.append(module.register_forward_pre_hook(self._pre(stage)))
            self._handles.append(module.register_forward_hook(self._post(stage)))

    def _pre(self, stage: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._call is not None:
                self._started[stage] = self.now()

        return hook

    def _post(self, stage: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._call is not None and stage in self._started:
                end = self.now()
                self._call[stage] += end - self._started.pop(stage)
                if stage == "segment":
                    self._call["segment_end"] = end

        return hook

    def timed_call(self, fn: LabelFn, noisy: torch.Tensor) -> torch.Tensor:
        """Run one label-function call, splitting its time into preprocess / denoise / segment / argmax."""
        enter = self.now()
        self._call = {"denoise": 0.0, "segment": 0.0, "segment_end": 0.0}
        try:
            labels = fn(noisy)
            leave = self.now()
        finally:
            call, self._call = self._call, None
            self._started.clear()
        argmax = leave - call["segment_end"] if call["segment_end"] else 0.0
        self.add("denoise", call["denoise"])
        self.add("segment", call["segment"])
        self.add("argmax", argmax)
        self.add("preprocess", (leave - enter) - call["denoise"] - call["segment"] - argmax)
        self.last_enter, self.last_exit = enter, leave
        return labels

    def wrap_label_fn(self, fn: LabelFn) -> LabelFn:
        return lambda noisy: self.timed_call(fn, noisy)

    def sample_gpu_utilization(self) -> None:
        if not self.cuda:
            return
        try:
            self.gpu_utilization.append(float(torch.cuda.utilization()))
        except Exception:  # needs pynvml / NVML: report nothing rather than fail the run
            return

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()


@dataclass
class TimedRuntime:
    """A ``LocalRuntime`` whose batches are timed: noise before the label function, transfer after, count between."""

    inner: LocalRuntime
    timer: StageTimer

    def labels(self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int) -> Iterator[np.ndarray]:
        timer = self.timer
        batches = self.inner.labels(image, sigma=sigma, seed=seed, start=start, count=count)
        while True:
            asked = timer.now()
            try:
                batch = next(batches)
            except StopIteration:
                return
            arrived = timer.now()
            timer.add("noise", timer.last_enter - asked)
            timer.add("transfer", arrived - timer.last_exit)
            timer.sample_gpu_utilization()
            yield batch
            timer.add("count", timer.now() - arrived)


def timed_torch_runtime_factory(
    timer: StageTimer, *, device: torch.device, precision: Precision, batch_size: int, noise_backend: NoiseBackend
) -> Callable[[LabelPipeline], Runtime]:
    """A ``Session.runtime_factory`` building exactly Session's default torch runtime, with timing around it."""

    def factory(pipeline: LabelPipeline) -> Runtime:
        timer.instrument(pipeline)
        inner = torch_runtime(pipeline, device=device, precision=precision,
                              batch_size=batch_size, noise_backend=noise_backend)
        inner.label_fn = timer.wrap_label_fn(inner.label_fn)
        return TimedRuntime(inner, timer)

    return factory


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB); Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
