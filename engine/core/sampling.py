"""In-process sampling: each sample's noise drawn as torch tensors, added to the image, and run through a label
function in batches (``LocalRuntime``).

Which noise a sample gets (per-sample seed sequences and their streams) is ``certseg.engine.core.streams``'; the
contract every runtime answers (``Runtime``, ``batch_ranges``) is ``certseg.engine.core.contract``'s. Both are
re-exported here, where they were first defined. Noise is drawn per sample, never per batch, so a sample's noise
does not depend on the batch it travels in; multi-step denoising draws each sample's reverse-process noise from
its own stream per step (``ReverseNoise``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from certseg.engine.choices import NoiseBackend, choice
from certseg.engine.core.contract import Runtime, batch_ranges
from certseg.engine.core.streams import (
    REVERSE_STREAM,
    Stream,
    _seed64,
    _seed_sequence,
    reverse_seed_sequence,
    reverse_stream,
    sample_seed64,
    sample_seed_sequence,
)

if TYPE_CHECKING:
    from certseg.engine.maths.label_pipeline import LabelPhases, LabelPipeline

__all__ = [
    "REVERSE_STREAM", "LabelFn", "LocalRuntime", "NoiseSource", "PhaseObserver", "ReverseNoise", "Runtime", "Stream",
    "batch_ranges", "input_memory_format", "label_phases", "labels_to_numpy", "reverse_seed_sequence", "reverse_stream",
    "sample_seed64", "sample_seed_sequence", "takes_reverse_noise",
]

LabelFn = Callable[[torch.Tensor], torch.Tensor | np.ndarray]
"""A batched segmenter: noisy images (B, 3, H, W) float32 in [0, 1] pixel space -> labels (B, H, W) int, with
the value K (= number of classes) where a sample's output was non-finite (see ``certseg.engine.maths.stages``).
One with a true ``takes_reverse_noise`` attribute is also given the batch's ``ReverseNoise``."""


@dataclass(frozen=True)
class NoiseSource:
    """Standard-normal noise per sample index, from a named backend.

    ``numpy-philox`` (default): numpy's counter-based Philox generator; bit-identical on every platform and
    runtime (torch, ONNX, Triton). ``torch``: ``torch.randn`` with a per-sample ``torch.Generator`` on the
    target device (Philox on CUDA); reproducible for one device type and torch version, and avoids moving
    noise to the accelerator.
    """

    root_seed: int
    backend: NoiseBackend | str = NoiseBackend.numpy_philox
    """A member or its string; kept as the member."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", choice(NoiseBackend, self.backend, "noise backend"))
        if not isinstance(self.root_seed, (int, np.integer)) or self.root_seed < 0:
            raise ValueError(f"the root seed must be an integer >= 0, got {self.root_seed!r}")

    def sample(
        self, index: int, shape: Sequence[int], device: torch.device | str = "cpu", *, stream: Stream = ()
    ) -> torch.Tensor:
        """Noise of one sample, float32, on ``device``: its input noise, or the ``stream`` named."""
        sequence = _seed_sequence(self.root_seed, index, stream)
        if self.backend == NoiseBackend.numpy_philox:
            generator = np.random.Generator(np.random.Philox(sequence))
            noise = generator.standard_normal(tuple(shape), dtype=np.float32)
            return torch.from_numpy(noise).to(device)
        torch_generator = torch.Generator(device=device)
        torch_generator.manual_seed(_seed64(sequence))
        return torch.randn(tuple(shape), generator=torch_generator, device=device, dtype=torch.float32)

    def fill(self, start: int, out: torch.Tensor, *, stream: Stream = ()) -> torch.Tensor:
        """Write the noise of samples ``start .. start+len(out)`` into ``out`` (count, *shape), in place.

        Bit-identical to ``sample`` per index (the same generators fill the same number of values in the same
        order), but without a per-sample tensor and a stacking copy: a batch costs one buffer, reusable across
        batches. numpy-philox fills a CPU ``out`` through a numpy view of it (numpy releases the GIL meanwhile);
        on another device it draws each sample on the host and copies it over. ``stream``: which of each sample's
        streams (``()``: the input noise).
        """
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"noise buffers are contiguous float32, got {out.dtype} with strides {out.stride()}")
        shape = tuple(out.shape[1:])
        for offset in range(out.shape[0]):
            sequence = _seed_sequence(self.root_seed, start + offset, stream)
            if self.backend == NoiseBackend.numpy_philox:
                generator = np.random.Generator(np.random.Philox(sequence))
                if out.device.type == "cpu":
                    generator.standard_normal(out=out[offset].numpy(), dtype=np.float32)
                else:
                    out[offset].copy_(torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)))
            else:
                torch_generator = torch.Generator(device=out.device)
                torch_generator.manual_seed(_seed64(sequence))
                torch.randn(shape, generator=torch_generator, out=out[offset])
        return out

    def batch(
        self, start: int, count: int, shape: Sequence[int], device: torch.device | str = "cpu", *, stream: Stream = ()
    ) -> torch.Tensor:
        """Noise of samples ``start .. start+count`` stacked to (count, *shape): one independent draw each."""
        return self.fill(start, torch.empty((count, *shape), dtype=torch.float32, device=device), stream=stream)


@dataclass(frozen=True)
class ReverseNoise:
    """The reverse-process noise of the samples ``start .. start+count`` of one batch, one stream per sample and step.

    Called as a ``NoiseFn`` (``multi_step_denoise`` takes it): ``reverse_noise(τ, (count, C, h, w))`` is each
    sample's own draw for the step leaving τ, stacked, so a sample's denoised image is the same alone, in any
    batch, on any server.
    """

    source: NoiseSource
    start: int
    count: int
    device: torch.device | str = "cpu"

    def __call__(self, timestep: int, shape: Sequence[int]) -> torch.Tensor:
        if int(shape[0]) != self.count:
            raise ValueError(f"reverse noise for {self.count} samples, asked for a batch of {shape[0]}")
        return self.source.batch(self.start, self.count, tuple(shape[1:]), self.device,
                                 stream=reverse_stream(timestep))


def label_phases(label_fn: LabelFn) -> LabelPhases | None:
    """``label_fn`` cut into prepare / scores / labels (its ``phases`` attribute: the label pipeline and the torch
    runtime's label functions have one), or None for a label function that is one call."""
    return getattr(label_fn, "phases", None)


class PhaseObserver(Protocol):
    """What an overlapped ``LocalRuntime`` tells: each call's models start (``enter``) and end (``leave``), in the
    models' thread; the seconds the other thread spent per stage (``add``: noise, preprocess, argmax, transfer)."""

    def enter(self) -> None: ...

    def leave(self) -> None: ...

    def add(self, stage: str, seconds: float) -> None: ...


def takes_reverse_noise(label_fn: LabelFn) -> bool:
    """Whether ``label_fn`` takes each batch's ``ReverseNoise`` (its ``takes_reverse_noise`` attribute), as the label
    pipeline does; other label functions are called with the noisy batch only."""
    return bool(getattr(label_fn, "takes_reverse_noise", False))


def labels_to_numpy(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Label maps as the smallest unsigned numpy dtype that holds them (uint8 for K <= 256)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"label values must lie in [0, 65535], got [{array.min()}, {array.max()}]")
    return array.astype(np.uint8 if (array.size == 0 or array.max() <= 255) else np.uint16)


def input_memory_format(label_fn: LabelFn) -> torch.memory_format:
    """The layout ``label_fn`` wants its input in (its ``memory_format`` attribute; contiguous NCHW by default)."""
    return getattr(label_fn, "memory_format", torch.contiguous_format)


@dataclass
class LocalRuntime:
    """In-process runtime: adds per-sample noise and runs a batched label function (any framework).

    The noise is drawn in the image's own channels (1 for grayscale, 3 for RGB), then gray is replicated to RGB.

    Memory: one noise buffer and one noisy buffer, each sized for the largest batch and reused by every batch
    (the last, smaller one takes a slice), instead of per-sample draws, a stacked copy, σ·ε, x + σ·ε and a layout
    copy per batch. The noisy buffer is laid out as the label function wants its input
    (``input_memory_format``), so it needs no copy there. The label function must not keep or return views of
    its input: the next batch overwrites it.

    Overlap: with ``prefetch``, a background thread works while the models run. On CPU, with a label function cut
    into phases (``label_phases``: the label pipeline's prepare / scores / labels), it forms each model call's
    noise, noisy copy and model input ahead, and runs the label step (upsample, argmax, finite check) of the
    call before, so the models' thread does little else (the label pipeline's stage maths run in the other
    thread, on another core where there is one; ``observer`` gets their seconds). Elsewhere it draws the next
    batch's noise into the noise buffer once the current batch's noisy copy has been formed from it (numpy and
    torch's CPU generators release the GIL). The samples, their order, their values and every operation on them
    are those of the plain loop: only the thread that runs them differs.
    """

    label_fn: LabelFn
    batch_size: int = 16
    device: torch.device | str = "cpu"
    noise_backend: NoiseBackend | str = NoiseBackend.numpy_philox
    pipeline: LabelPipeline | None = None
    """The label pipeline ``label_fn`` runs, where it runs one: observers hook it (the bench's stage timer)."""
    keep_labels_on_device: bool = False
    """Yield the label maps as torch tensors on ``device`` (for counting there) instead of numpy arrays."""
    prefetch: bool = True
    """Draw the next batch's noise in a background thread while the current batch runs (host-drawn noise only)."""
    model_batch: int | None = None
    """The most samples one label-function call takes (None: the whole batch). A larger batch is drawn and noised
    as one, then labelled in slices of this size, in index order (on CPU, see ``memory.cpu_model_batch``)."""
    observer: PhaseObserver | None = None
    """Told when each overlapped call's models start and end, and the seconds the other thread spent per stage
    (the bench's ``StageTimer``)."""

    def overlaps(self) -> bool:
        """Whether ``labels`` runs the stage maths around the models in a second thread (see Overlap above)."""
        return self.prefetch and torch.device(self.device).type == "cpu" and label_phases(self.label_fn) is not None

    def labels(
        self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int
    ) -> Iterator[np.ndarray | torch.Tensor]:
        """Label maps (b, H, W) of samples ``start .. start+count`` in index order: numpy arrays, or torch tensors on
        ``device`` with ``keep_labels_on_device``."""
        device = torch.device(self.device)
        clean = torch.as_tensor(np.asarray(image, dtype=np.float32), device=device)
        ranges = list(batch_ranges(start, count, self.batch_size))
        if not ranges:
            return
        if self.overlaps():
            yield from self._overlapped(clean, ranges, sigma=sigma, seed=seed)
            return
        source = NoiseSource(seed, self.noise_backend)
        noise = _NoiseBuffers(source, (max(size for _, size in ranges), *clean.shape), device)
        noisy = torch.empty((noise.shape[0], 3, *clean.shape[1:]), dtype=torch.float32, device=device,
                            memory_format=input_memory_format(self.label_fn))
        takes_reverse = takes_reverse_noise(self.label_fn)
        threaded = self.prefetch and noise.host.device.type == "cpu" and len(ranges) > 1
        executor = ThreadPoolExecutor(1, thread_name_prefix="certseg-noise") if threaded else None
        pending: Future[None] | None = None
        try:
            for position, (first, size) in enumerate(ranges):
                if pending is None:
                    noise.draw(first, size)
                else:
                    pending.result()
                    pending = None
                batch = noisy[:size]
                # x + σ·ε with today's rounding: σ·ε (float32), then + x; gray is replicated after the noise.
                torch.mul(noise.on_device(size).expand(-1, 3, -1, -1), sigma, out=batch)
                batch.add_(clean)
                if executor is not None and position + 1 < len(ranges):
                    pending = executor.submit(noise.draw, *ranges[position + 1])
                for call_first, call_size in self._calls([(first, size)]):
                    part = batch[call_first - first : call_first - first + call_size]
                    with torch.inference_mode():
                        if takes_reverse:
                            labels = self.label_fn(part, ReverseNoise(source, call_first, call_size, device))
                        else:
                            labels = self.label_fn(part)
                    yield self._output(labels, device)
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    def _calls(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(first sample, count) of each label-function call: the batches, sliced to ``model_batch``."""
        calls = []
        for first, size in ranges:
            step = size if self.model_batch is None else max(1, min(size, self.model_batch))
            calls.extend((first + offset, min(step, size - offset)) for offset in range(0, size, step))
        return calls

    def _overlapped(
        self, clean: torch.Tensor, ranges: list[tuple[int, int]], *, sigma: float, seed: int
    ) -> Iterator[np.ndarray | torch.Tensor]:
        """``labels`` on CPU with a phased label function: while call i's models run here, one worker thread runs
        the label step of call i-1 and forms call i+1's input.

        Two noisy buffers (slots) alternate between calls: the worker fills call i+1's slot while call i reads the
        other, whose previous user (call i-1) finished its models before call i+1 was handed out. One noise buffer
        serves every call: only the worker uses it, one job at a time. Worker jobs run in submission order, so a
        call's labels are ready before the next call's input is formed.
        """
        phases = label_phases(self.label_fn)
        assert phases is not None
        device = torch.device(self.device)
        calls = self._calls(ranges)
        source = NoiseSource(seed, self.noise_backend)
        largest = max(size for _, size in calls)
        noise = torch.empty((largest, *clean.shape), dtype=torch.float32)
        noisy = [torch.empty((largest, 3, *clean.shape[1:]), dtype=torch.float32,
                             memory_format=input_memory_format(self.label_fn)) for _ in range(2)]
        size_hw = tuple(clean.shape[-2:])
        takes_reverse = takes_reverse_noise(self.label_fn)
        observer = self.observer

        def note(stage: str, started: float) -> float:
            now = time.perf_counter()
            if observer is not None:
                observer.add(stage, now - started)
            return now

        def form_input(slot: int, first: int, size: int) -> torch.Tensor:
            started = time.perf_counter()
            batch = noisy[slot][:size]
            # x + σ·ε with the plain loop's rounding: σ·ε (float32), then + x; gray is replicated after the noise.
            torch.mul(source.fill(first, noise[:size]).expand(-1, 3, -1, -1), sigma, out=batch)
            batch.add_(clean)
            started = note("noise", started)
            with torch.inference_mode():
                prepared = phases.prepare(batch)
            note("preprocess", started)
            return prepared

        def label_step(logits: torch.Tensor, valid: torch.Tensor | None) -> np.ndarray | torch.Tensor:
            started = time.perf_counter()
            with torch.inference_mode():
                labels = phases.labels(logits, valid, size_hw)
            started = note("argmax", started)
            output = self._output(labels, device)
            note("transfer", started)
            return output

        executor = ThreadPoolExecutor(1, thread_name_prefix="certseg-stages")
        pending: deque[Future[np.ndarray | torch.Tensor]] = deque()
        try:
            next_input = executor.submit(form_input, 0, *calls[0])
            for index, (first, size) in enumerate(calls):
                prepared = next_input.result()
                if index + 1 < len(calls):
                    next_input = executor.submit(form_input, (index + 1) % 2, *calls[index + 1])
                if observer is not None:
                    observer.enter()
                with torch.inference_mode():
                    if takes_reverse:
                        logits, valid = phases.scores(prepared, ReverseNoise(source, first, size, device))
                    else:
                        logits, valid = phases.scores(prepared)
                if observer is not None:
                    observer.leave()
                del prepared
                pending.append(executor.submit(label_step, logits, valid))
                del logits, valid
                while len(pending) > 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def _output(self, labels: torch.Tensor | np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
        if not self.keep_labels_on_device:
            return labels_to_numpy(labels)
        if not isinstance(labels, torch.Tensor):
            labels = torch.from_numpy(labels_to_numpy(labels))
        return labels.to(device)


class _NoiseBuffers:
    """Where a runtime's noise is drawn (``host``) and where its models read it (``on_device``).

    Noise drawn on the host for another device (numpy-philox on CUDA) is copied over synchronously, so the host
    buffer is free to be refilled as soon as ``on_device`` returns.
    """

    def __init__(self, source: NoiseSource, shape: tuple[int, ...], device: torch.device) -> None:
        self.source, self.shape = source, shape
        on_host = source.backend == NoiseBackend.numpy_philox and device.type != "cpu"
        self.host = torch.empty(shape, dtype=torch.float32, pin_memory=on_host and device.type == "cuda") \
            if on_host else torch.empty(shape, dtype=torch.float32, device=device)
        self.device = torch.empty(shape, dtype=torch.float32, device=device) if on_host else self.host

    def draw(self, first: int, size: int) -> None:
        self.source.fill(first, self.host[:size])

    def on_device(self, size: int) -> torch.Tensor:
        if self.device is not self.host:
            self.device[:size].copy_(self.host[:size])
        return self.device[:size]
