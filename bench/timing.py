"""Where the time of a certification goes: noise, preprocess, denoise, segment, argmax, transfer, count, certify.

Nothing is rebuilt for it: ``Session.wrap_runtime`` hands the bench each runtime the session built, and
``StageTimer.wrap`` times its batches and puts forward hooks on the label pipeline it runs (the runtime's
``pipeline``) and on that pipeline's denoiser and segmenter. The maths and the noise are untouched, so timed and
untimed runs give identical certificates.

One batch of ``LocalRuntime.labels`` then splits as:
- noise: from asking for the batch to entering the label pipeline (per-sample noise draws, x + σ·ε, copies, the
  layout and autocast around the pipeline);
- preprocess: pipeline time not spent in the models or after the segmenter (resizes, 2x−1, x0 formula,
  ImageNet normalisation);
- denoise / segment: inside the denoiser / segmenter forward;
- argmax: from the segmenter's output to leaving the pipeline (upsampling logits, argmax);
- transfer: from leaving the pipeline to the batch arriving as numpy (device → host);
- count: what the consumer (mode / agreement counting) does before asking for the next batch;
- certify: p-values and Holm (from the engine's own ``certify`` timing).
On CUDA every boundary synchronises, so each stage owns its kernels (a small cost, paid by every variant alike).
On CPU the runtime overlaps (``LocalRuntime.overlaps``): noise, preprocess, argmax and transfer then run in its
second thread while the models run, and it reports their seconds itself, so the stages add up to more than the
wall time; SegCertify's preprocess is its model input, DenoiseCertify's also the maths between its models.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.engine.core.sampling import LabelFn, LocalRuntime, Runtime
from certseg.engine.maths.label_pipeline import LabelPipeline

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
        self.overlapped = False
        """Whether a runtime it timed ran the stage maths in a second thread (their seconds then overlap the
        models': the stages add up to more than the wall time)."""

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

    # ---------------------------------------------------------------- hooks
    def wrap(self, runtime: Runtime) -> Runtime:
        """``runtime`` with its batches timed and the label pipeline it runs hooked; a runtime that runs none in
        this process (servers: they report their own stages) is returned as it is."""
        if not isinstance(runtime, LocalRuntime) or runtime.pipeline is None:
            return runtime
        self.instrument(runtime.pipeline)
        if runtime.overlaps():  # its other thread reports its stages; its models' thread enters and leaves
            self.overlapped = True
            return TimedRuntime(dataclasses.replace(runtime, observer=self), self)
        return TimedRuntime(runtime, self)

    def instrument(self, pipeline: LabelPipeline) -> None:
        """Hook the pipeline's calls and its models (each module once: sessions share cached models)."""
        if id(pipeline) not in self._hooked:
            self._hooked.add(id(pipeline))
            self._handles.append(pipeline.register_forward_pre_hook(lambda module, args: self.enter()))
            self._handles.append(pipeline.register_forward_hook(lambda module, args, output: self.leave()))
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

    def enter(self) -> None:
        """A label call starts (the pipeline's pre-hook, or an overlapped call's models: ``sampling.PhaseObserver``):
        the models' hooks count from here."""
        self._started.clear()
        self._call = {"denoise": 0.0, "segment": 0.0, "segment_end": 0.0}
        self.last_enter = self.now()

    def leave(self) -> None:
        """A label call ends: split its time into preprocess / denoise / segment / argmax (for an overlapped call,
        the time outside its models here is DenoiseCertify's maths between them)."""
        if self._call is None:
            return
        leave = self.now()
        call, self._call = self._call, None
        self._started.clear()
        argmax = leave - call["segment_end"] if call["segment_end"] else 0.0
        self.add("denoise", call["denoise"])
        self.add("segment", call["segment"])
        self.add("argmax", argmax)
        self.add("preprocess", (leave - self.last_enter) - call["denoise"] - call["segment"] - argmax)
        self.last_exit = leave

    def timed_call(self, fn: LabelFn, noisy: torch.Tensor, *more: Any) -> torch.Tensor:
        """Run one label call (``more``: its further arguments, such as the batch's reverse noise), timed: an
        instrumented pipeline times itself through its hooks, anything else is timed here as one call."""
        if id(fn) in self._hooked:
            return fn(noisy, *more)
        self.enter()
        try:
            return fn(noisy, *more)
        finally:
            self.leave()

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
    """A runtime whose batches are timed: noise before its label pipeline, transfer after, count between."""

    inner: Runtime
    timer: StageTimer
    @property
    def overlapped(self) -> bool:
        """The runtime runs noise, preprocess, argmax and transfer in another thread and reports their seconds."""
        return isinstance(self.inner, LocalRuntime) and self.inner.overlaps()

    def labels(self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int) -> Iterator[np.ndarray]:
        timer = self.timer
        batches = self.inner.labels(image, sigma=sigma, seed=seed, start=start, count=count)
        overlapped = self.overlapped
        while True:
            asked = timer.now()
            try:
                batch = next(batches)
            except StopIteration:
                return
            arrived = timer.now()
            if not overlapped:
                timer.add("noise", timer.last_enter - asked)
                timer.add("transfer", arrived - timer.last_exit)
            timer.sample_gpu_utilization()
            yield batch
            timer.add("count", timer.now() - arrived)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB); Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
