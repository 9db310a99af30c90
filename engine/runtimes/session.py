"""A certification session: models loaded once, then any number of images certified with one set of settings.

``certseg certify`` and ``certseg-bench`` both go through here, so the same image, settings and seed give the
same certificate from either command. Where the models run is the session's backend
(``certseg.engine.runtimes.backends``): ``Session.open`` loads them into this process (PyTorch or ONNX Runtime),
``Session.connect`` uses Triton servers, which also say what their models are so results record them the same way.
Only ``Session.open`` imports torch (with the local backends): a session on servers starts without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from certseg.engine.choices import NoiseBackend, SharedMemory
from certseg.engine.core.contract import Runtime
from certseg.engine.core.pipeline import CertifiedSegmentation, Progress, certified_space, certify_image
from certseg.engine.errors import InputError
from certseg.engine.maths.pipeline_spec import PipelineSpec, make_spec
from certseg.engine.maths.schedules import LINEAR
from certseg.engine.models import facts
from certseg.engine.models.info import ModelInfo
from certseg.engine.runtimes.backends import Backend, MemoryProbe, TritonBackend
from certseg.engine.runtimes.certify_record import CertifyRecord, Timings
from certseg.engine.runtimes.memory import (
    PROBE_BATCH,
    MemoryEstimate,
    PipelineMemory,
    auto_batch_limit,
    cached_pipeline_memory,
    estimate_memory,
    probe_pipeline_memory,
)
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.triton_runtime import stage_timings, statistics_delta

_PIPELINE_MEMORY: dict[tuple[Any, ...], PipelineMemory] = {}
"""Probe results per (models, settings that change activations): each is measured once per process."""


@dataclass
class Session:
    """A backend's models plus a runtime per image size; ``certify`` one image at a time."""

    backend: Backend
    wrap_runtime: Callable[[Runtime], Runtime] | None = None
    """Applied to each runtime the session builds, and used in its place (the bench's stage timer wraps them)."""
    _runtimes: dict[tuple[int, int], tuple[PipelineSpec, Runtime]] = field(default_factory=dict)
    _batches: dict[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, *, threads: int | None = None) -> Session:
        """Load the models (once per process) for in-process runs; the runtime and an auto noise backend are
        decided here. ``threads``: torch's CPU threads (process-wide) and ONNX Runtime's, set before any model
        runs (None: their defaults)."""
        from certseg.engine.runtimes.local_backends import LocalBackend  # torch: only sessions that load models

        return cls(LocalBackend.open(settings, threads=threads))

    @classmethod
    def connect(
        cls,
        settings: Settings,
        servers: tuple[str, ...],
        *,
        in_flight: int = 2,
        shared_memory: SharedMemory = SharedMemory.auto,
        retries: int = 3,
    ) -> Session:
        """A session whose samples come from Triton ``servers`` (gRPC HOST:PORT) serving the certseg ensembles.

        Unreachable servers, a missing ensemble or another repository version raise ``ServerError`` here,
        before any work starts.
        """
        return cls(TritonBackend.connect(settings, servers, in_flight=in_flight, shared_memory=shared_memory,
                                         retries=retries))

    @property
    def settings(self) -> Settings:
        return self.backend.settings

    @property
    def segmenter(self) -> ModelInfo:
        return self.backend.segmenter

    @segmenter.setter
    def segmenter(self, model: ModelInfo) -> None:
        self._swap(segmenter=model)

    @property
    def denoiser(self) -> ModelInfo | None:
        return self.backend.denoiser

    @denoiser.setter
    def denoiser(self, model: ModelInfo | None) -> None:
        self._swap(denoiser=model)

    def _swap(self, **models: ModelInfo | None) -> None:
        """Run other models (a copy with other weights) from now on; runtimes built for the old ones are dropped."""
        self.backend = replace(self.backend, **models)
        self._runtimes.clear()
        self._batches.clear()

    @property
    def device(self) -> str:
        return self.backend.device

    def close(self) -> None:
        """Release what the backend holds (the servers' connections); local models stay cached."""
        self.backend.close()

    @property
    def num_classes(self) -> int:
        classes = self.segmenter.num_classes
        if classes is None:
            raise InputError(f"segmenter {self.segmenter.name} does not say how many classes it has")
        return int(classes)

    def runtime_for(self, image_size: tuple[int, int]) -> tuple[PipelineSpec, Runtime]:
        """The pipeline spec and the runtime for images of ``image_size`` (at ``batch_for`` it), built once."""
        if image_size not in self._runtimes:
            spec = self._spec(image_size)
            runtime = self.backend.runtime(spec, self.batch_for(image_size))
            self._runtimes[image_size] = (spec, runtime if self.wrap_runtime is None else self.wrap_runtime(runtime))
        return self._runtimes[image_size]

    def _spec(self, image_size: tuple[int, int]) -> PipelineSpec:
        """The pipeline spec for an image size: the settings plus what the models state (normalisation, fixed
        input size, noise schedule)."""
        s, denoiser = self.settings, self.denoiser
        return make_spec(
            s.method, s.sigma, image_size, scale=s.scale,
            denoiser_size=None if denoiser is None else denoiser.input_size,
            timestep_rule=s.t_rule, antialias=s.antialias,
            normalization=facts.normalization(self.segmenter), segmenter_input_size=self.segmenter.input_size,
            schedule=LINEAR if denoiser is None else facts.schedule(denoiser), denoise_steps=s.denoise_steps,
        )

    def batch_for(self, image_size: tuple[int, int]) -> int:
        """Samples per forward pass for images of ``image_size``, decided once per size: the settings' batch, or for
        an auto batch the largest up to ``AUTO_BATCH_LIMITS`` of the device (and the samples drawn) whose memory
        estimate fits ``AUTO_MEMORY_FRACTION`` of the memory available, at least 1 (the check before sampling then
        decides whether 1 fits at all); on CPU also at most ``CPU_BATCH_PIXELS`` pixels per batch. Noise is drawn per
        sample index, so no batch changes a sample's noise (the JSON records the batch: kernels may differ in the
        last bits per batch shape)."""
        if image_size not in self._batches:
            s = self.settings
            batch = s.batch
            if batch is None:
                upper = min(auto_batch_limit(self.device, image_size), max(s.n0, s.n))
                estimate = self._estimate(image_size, upper)
                batch = upper if estimate is None else estimate.auto_batch(upper)
            self._batches[image_size] = int(batch)
        return self._batches[image_size]

    def memory_estimate(self, image_size: tuple[int, int]) -> MemoryEstimate | None:
        """What certifying an image of ``image_size`` at ``batch_for`` it will need (None for Triton servers: they
        hold the memory).

        The label pipeline is probed once (``certseg.engine.runtimes.memory``; cached per models and settings) as the
        backend says (``MemoryProbe``): the torch runtime's pipeline as it runs; for ONNX Runtime, the torch models
        in fp32 stand in for the graphs exported from them, with a larger margin, and an ONNX model file runs in
        ONNX Runtime, whose activations the probe does not see (the record says so). A model that cannot run at
        the probe's small sizes is not refused for that: its estimate counts the engine's own arrays only, and
        the record says why.
        """
        if self.backend.memory_probe is None:
            return None
        s = self.settings
        return self._estimate(image_size, min(self.batch_for(image_size), max(s.n0, s.n)))

    def _estimate(self, image_size: tuple[int, int], batch: int) -> MemoryEstimate | None:
        """The memory estimate at ``batch`` (the pipeline probed once per models and settings)."""
        probe = self.backend.memory_probe
        if probe is None:
            return None
        s, fixed = self.settings, self.segmenter.input_size
        key = (self.segmenter.sha256, None if self.denoiser is None else self.denoiser.sha256, s.method, s.scale,
               s.antialias, probe.precision, str(probe.device), probe.onnx, s.noise_backend,
               *(() if fixed is None else (fixed,)), *(() if s.denoise_steps == 1 else (("steps", s.denoise_steps),)))

        def measure() -> PipelineMemory:
            memory = probe_pipeline_memory(lambda size: self._probe_run(size, probe), s.scale)
            if probe.untracked is not None:
                memory.probe["untracked"] = probe.untracked
            return memory

        if key not in _PIPELINE_MEMORY:
            try:
                _PIPELINE_MEMORY[key] = cached_pipeline_memory(key, measure)
            except (RuntimeError, ValueError) as error:  # a model that cannot run at the probe's small sizes
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _PIPELINE_MEMORY[key] = PipelineMemory((), {"failed": f"{type(error).__name__}: {first}"})
        device = "cpu" if probe.device.type == "cpu" else str(probe.device)
        return estimate_memory(_PIPELINE_MEMORY[key], image_size, batch=batch, device=device,
                               num_classes=self.num_classes, numpy_noise=s.noise_backend == NoiseBackend.numpy_philox,
                               margin=probe.margin)

    def _probe_run(self, size: tuple[int, int], probe: MemoryProbe) -> Callable[[], object]:
        """A call that pushes ``PROBE_BATCH`` samples of a ``size`` image through this session's pipeline."""
        from certseg.engine.core.sampling import LocalRuntime

        s = self.settings
        runtime = LocalRuntime(probe.label_fn(self._spec(size)), batch_size=PROBE_BATCH, device=probe.device,
                               noise_backend=s.noise_backend)
        image = np.full((3, *size), 0.5, dtype=np.float32)
        return lambda: list(runtime.labels(image, sigma=s.sigma, seed=0, start=0, count=PROBE_BATCH))

    def certify(
        self, image: np.ndarray, *, seed: int | None = None, progress: Progress | None = None
    ) -> tuple[CertifiedSegmentation, CertifyRecord]:
        """Certify one (3, H, W) RGB or (1, H, W) gray image; returns the result and the record of how it was made
        (``CertifyRecord.to_json()`` is its JSON).

        Refused in seconds, before any sample, when the memory estimate says the image cannot fit.
        """
        s = self.settings
        image_size = (int(image.shape[-2]), int(image.shape[-1]))
        s.validate(image_size[0] * image_size[1])
        self._spec(image_size)  # refuses a --denoise-steps that does not fit t* before any work
        memory = self.memory_estimate(image_size)
        if memory is not None:
            memory.check()
        spec, runtime = self.runtime_for(image_size)
        statistics = self.backend.statistics()
        started = time.perf_counter()
        result = certify_image(
            runtime, image, num_classes=self.num_classes, sigma=s.sigma, n0=s.n0, n=s.n, tau=s.tau, alpha=s.alpha,
            fwer=s.fwer, seed=seed, progress=progress, non_finite=s.non_finite,
        )
        elapsed = time.perf_counter() - started
        stages = None if statistics is None else stage_timings(statistics_delta(self.backend.statistics(), statistics))
        steps = result.timings
        timings = Timings(steps["selection"], steps["estimation"], steps["certify"], total=elapsed,
                          samples_per_second=(s.n0 + s.n) / elapsed, server_stages=stages)
        record = CertifyRecord(
            settings=replace(s, batch=self.batch_for(image_size)), pipeline=spec, segmenter=self.segmenter.info,
            denoiser=None if self.denoiser is None else self.denoiser.info, device=self.device, timings=timings,
            non_finite=result.non_finite, certified_space=certified_space(int(image.shape[0])), memory=memory,
            quantization=self.backend.precision_record(spec),
        )
        return result, record
