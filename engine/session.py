"""A certification session: models loaded once, then any number of images certified with one set of settings.

``certseg certify`` and ``certseg-bench`` both go through here, so the same image, settings and seed give the
same certificate from either command. ``Session.connect`` is the remote variant: the models live on Triton
servers, which also say what they are (classes, denoiser size, hashes) so results record them the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from certseg.engine.choices import Method, NoiseBackend, Precision, RuntimeName, SharedMemory
from certseg.engine.denoise import LINEAR
from certseg.engine.errors import InputError
from certseg.engine.label_pipeline import LabelPipeline, PipelineSpec, make_spec
from certseg.engine.memory import (
    MARGIN,
    ONNX_MARGIN,
    PROBE_BATCH,
    MemoryEstimate,
    PipelineMemory,
    cached_pipeline_memory,
    estimate_memory,
    probe_pipeline_memory,
)
from certseg.engine.models import facts
from certseg.engine.models.registry import LoadedModel, Role, default_model, load_model, resolve
from certseg.engine.pipeline import CertifiedSegmentation, Progress, certified_space, certify_image
from certseg.engine.runtimes.torch_runtime import autocast_label_fn, resolve_device, torch_runtime
from certseg.engine.sampling import LabelFn, LocalRuntime, Runtime
from certseg.engine.settings import Settings

if TYPE_CHECKING:
    from certseg.engine.runtimes.triton_runtime import ServedModel, TritonRuntime


@lru_cache(maxsize=8)
def _cached_model(ref: str, role: Role, device: str, stamp: tuple[int, int] | None) -> LoadedModel:
    return load_model(ref, role, device=device)


def _open_model(ref: str, role: Role, device: str) -> LoadedModel:
    """A model loaded once per process, and again when its file changed (re-exported to the same path)."""
    path, _ = resolve(ref)
    stat = path.stat() if path.is_file() else None
    return _cached_model(ref, role, device, None if stat is None else (stat.st_mtime_ns, stat.st_size))


def _check_onnx_models(settings: Settings, models: list[LoadedModel]) -> None:
    """ONNX files run as given, in ONNX Runtime: refuse the settings that would need them to be something else."""
    onnx = next((m for m in models if m.family == "onnx"), None)
    if onnx is None:
        return
    if settings.runtime != RuntimeName.onnx:
        raise InputError(f"{onnx.name} is an ONNX graph, which --runtime {settings.runtime} cannot run: use "
                         "--runtime onnx (the default when a model is an .onnx file)")
    if settings.precision != Precision.fp32:
        raise InputError(f"{onnx.name} is an ONNX graph and runs as given (fp32): drop --precision "
                         f"{settings.precision}")


_PIPELINE_MEMORY: dict[tuple[Any, ...], PipelineMemory] = {}
"""Probe results per (models, settings that change activations): each is measured once per process."""


@dataclass
class Session:
    """Loaded models plus a runtime per image size; ``certify`` one image at a time."""

    settings: Settings
    segmenter: LoadedModel | ServedModel
    denoiser: LoadedModel | ServedModel | None
    device: torch.device | str
    runtime_factory: Callable[[LabelPipeline], Runtime] | None = None
    remote: TritonRuntime | None = None
    """Set by ``connect``: the Triton servers that run the whole label pipeline."""
    _runtimes: dict[tuple[int, int], tuple[PipelineSpec, Runtime]] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings) -> Session:
        """Load the models (once per process) for in-process runs; the runtime is decided here when none is named."""
        settings = settings.resolved()
        if settings.runtime == RuntimeName.triton:
            raise InputError("--runtime triton: Triton servers run the pipeline; name them with --server HOST:PORT")
        device = resolve_device(settings.device)
        segmenter_ref = settings.segmenter or default_model("segmenter", settings.method)
        segmenter = _open_model(segmenter_ref, "segmenter", str(device))
        denoiser = None
        if settings.method == Method.denoisecertify:
            denoiser_ref = settings.denoiser or default_model("denoiser", settings.method)
            denoiser = _open_model(denoiser_ref, "denoiser", str(device))
        if segmenter.num_classes is None:
            raise InputError(f"segmenter {segmenter.name} does not say how many classes it has")
        _check_onnx_models(settings, [m for m in (segmenter, denoiser) if m is not None])
        segmenter = facts.with_overrides(segmenter, mean=settings.seg_mean, std=settings.seg_std,
                                         input_size=settings.seg_input_size, classes_file=settings.classes)
        if segmenter.input_size is not None and settings.scale != 1.0:
            raise InputError(f"{segmenter.name} takes a fixed {segmenter.input_size[0]}x{segmenter.input_size[1]} "
                             "input, so --scale does not apply: leave it out")
        contract = getattr(segmenter.module, "contract", None)
        if contract is not None and settings.seg_input_size is not None:
            contract.check_size(segmenter.input_size, "--seg-input-size")
        return cls(settings=settings, segmenter=segmenter, denoiser=denoiser, device=device)

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
        from certseg.engine.runtimes.triton_runtime import ENSEMBLES, TritonRuntime, served_model

        local = [flag for flag, value in (("--seg-mean", settings.seg_mean), ("--seg-std", settings.seg_std),
                                          ("--seg-input-size", settings.seg_input_size),
                                          ("--classes", settings.classes)) if value is not None]
        if local:
            raise InputError(f"{local[0]} describes a local model; with --server the repository's models come with "
                             "their own (certseg-export takes the same options)")
        remote = TritonRuntime(
            servers, ENSEMBLES[settings.method], batch=settings.batch, in_flight=in_flight,
            shared_memory=shared_memory, retries=retries,
        )
        served = remote.pipeline.metadata  # the server decides these; record what it did
        settings = replace(settings, runtime=RuntimeName.triton, batch=remote.batch,
                           noise_backend=str(served.get("noise_backend", settings.noise_backend)),
                           precision=str(served.get("precision", settings.precision)))
        segmenter = served_model(remote.pipeline, "segmenter")
        denoising = settings.method == Method.denoisecertify
        denoiser = served_model(remote.pipeline, "denoiser") if denoising else None
        if segmenter is None or (denoising and denoiser is None):
            remote.close()
            raise InputError(f"{remote.model} on {', '.join(remote.servers)} lacks a segmenter or denoiser step")
        return cls(settings=settings, segmenter=segmenter, denoiser=denoiser,
                   device="triton:" + ",".join(remote.servers), remote=remote)

    def close(self) -> None:
        """Release the servers' connections (remote sessions); a local session holds nothing to release."""
        if self.remote is not None:
            self.remote.close()

    @property
    def num_classes(self) -> int:
        classes = self.segmenter.num_classes
        if classes is None:
            raise InputError(f"segmenter {self.segmenter.name} does not say how many classes it has")
        return int(classes)

    def runtime_for(self, image_size: tuple[int, int]) -> tuple[PipelineSpec, Runtime]:
        if image_size not in self._runtimes:
            s = self.settings
            spec = self._spec(image_size)
            contract = getattr(getattr(self.segmenter, "module", None), "contract", None)
            if contract is not None and self.segmenter.input_size is None:
                contract.check_size(spec.segmenter_size, f"this {image_size[0]}x{image_size[1]} image at --scale "
                                    f"{s.scale}")
            self._runtimes[image_size] = (spec, self._runtime(spec))
        return self._runtimes[image_size]

    def _spec(self, image_size: tuple[int, int]) -> PipelineSpec:
        """The pipeline spec for an image size: the settings plus what the models state (normalisation, fixed
        input size, noise schedule)."""
        s = self.settings
        return make_spec(
            s.method, s.sigma, image_size, scale=s.scale,
            denoiser_size=None if self.denoiser is None else self.denoiser.input_size,
            timestep_rule=s.t_rule, antialias=s.antialias,
            normalization=facts.normalization(self.segmenter), segmenter_input_size=self.segmenter.input_size,
            schedule=LINEAR if self.denoiser is None else facts.schedule(self.denoiser),
        )

    def _runtime(self, spec: PipelineSpec) -> Runtime:
        if self.remote is not None:
            return self.remote.with_pipeline(
                timestep=None if spec.timestep is None else spec.timestep.t, seg_size=spec.segmenter_size,
                antialias=spec.antialias,
            )
        s = self.settings
        if s.runtime == RuntimeName.onnx:
            return self._onnx_runtime(spec)
        pipeline = LabelPipeline(spec, self.segmenter.module, None if self.denoiser is None else self.denoiser.module)
        if self.runtime_factory is not None:
            return self.runtime_factory(pipeline)
        return torch_runtime(
            pipeline, device=torch.device(self.device), precision=s.precision, batch_size=s.batch,
            noise_backend=s.noise_backend,
        )

    def _onnx_runtime(self, spec: PipelineSpec) -> Runtime:
        """ONNX Runtime: an ONNX model file as given, other models on graphs exported from exactly their weights
        (exported once, then cached)."""
        from certseg.engine.runtimes.onnx_runtime import OrtModule, export_paths
        from certseg.export.cache import cached_export  # the one seam into certseg.export: torch weights -> graphs

        s = self.settings
        if s.precision == Precision.bf16:
            raise InputError("the ONNX runtime runs fp32 or fp16 graphs; use --precision fp32 or fp16")
        models = {"segmenter": self.segmenter, "denoiser": self.denoiser}
        modules = {role: m.module for role, m in models.items() if m is not None and m.family == "onnx"}
        exported = {role: m for role, m in models.items() if isinstance(m, LoadedModel) and role not in modules}
        if exported:
            folder = cached_export(exported.get("segmenter"), exported.get("denoiser"), spec.image_size,
                                   scale=spec.scale, fp16=s.precision == Precision.fp16)
            paths = export_paths(folder, precision=s.precision,
                                 expected_sha256={role: m.sha256 for role, m in exported.items()})
            for role in exported:
                path = paths[role]
                if path is None:
                    raise InputError(f"{folder} has no {s.precision} {role} graph")
                modules[role] = OrtModule(path)
        pipeline = LabelPipeline(spec, modules["segmenter"], modules.get("denoiser")).eval()
        return LocalRuntime(pipeline, batch_size=s.batch, device="cpu", noise_backend=s.noise_backend)

    def memory_estimate(self, image_size: tuple[int, int]) -> MemoryEstimate | None:
        """What certifying an image of ``image_size`` will need (None for Triton servers: they hold the memory).

        The label pipeline is probed once (``certseg.engine.memory``; cached per models and settings) on the
        torch models: the ONNX runtime runs graphs exported from them, so the torch probe in fp32 stands in for
        it, with a larger margin. An ONNX model file has no torch model: the probe runs it in ONNX Runtime and
        sees its inputs and outputs but not its activations, and the record says so. A model that cannot run at
        the probe's small sizes is not refused for that: its estimate counts the engine's own arrays only, and
        the record says why.
        """
        if self.remote is not None:
            return None
        s = self.settings
        onnx = s.runtime == RuntimeName.onnx
        device = torch.device("cpu") if onnx else torch.device(self.device)
        precision = Precision.fp32 if onnx else s.precision
        fixed = self.segmenter.input_size
        key = (self.segmenter.sha256, None if self.denoiser is None else self.denoiser.sha256, s.method, s.scale,
               s.antialias, precision, str(device), onnx, s.noise_backend, *(() if fixed is None else (fixed,)))
        files = [m.name for m in (self.segmenter, self.denoiser) if m is not None and m.family == "onnx"]

        def probe() -> PipelineMemory:
            memory = probe_pipeline_memory(
                lambda size: self._probe_run(size, device, precision, channels_last=not onnx), s.scale)
            if files:
                memory.probe["untracked"] = f"activations inside onnxruntime of {', '.join(files)}"
            return memory

        if key not in _PIPELINE_MEMORY:
            try:
                _PIPELINE_MEMORY[key] = cached_pipeline_memory(key, probe)
            except (RuntimeError, ValueError) as error:  # a model that cannot run at the probe's small sizes
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _PIPELINE_MEMORY[key] = PipelineMemory((), {"failed": f"{type(error).__name__}: {first}"})
        batch = min(s.batch, max(s.n0, s.n))
        return estimate_memory(_PIPELINE_MEMORY[key], image_size, batch=batch,
                               device="cpu" if device.type == "cpu" else str(device), num_classes=self.num_classes,
                               numpy_noise=s.noise_backend == NoiseBackend.numpy_philox,
                               margin=ONNX_MARGIN if onnx else MARGIN)

    def _probe_run(
        self, size: tuple[int, int], device: torch.device, precision: Precision, *, channels_last: bool
    ) -> Callable[[], object]:
        """A call that pushes ``PROBE_BATCH`` samples of a ``size`` image through this session's pipeline."""
        s = self.settings
        spec = self._spec(size)
        pipeline = LabelPipeline(spec, self.segmenter.module, None if self.denoiser is None else self.denoiser.module)
        # The torch runtime converts the models exactly so when it is built; ONNX exports them as loaded.
        label_fn: LabelFn = autocast_label_fn(pipeline, device, precision) if channels_last else pipeline
        runtime = LocalRuntime(label_fn, batch_size=PROBE_BATCH, device=device, noise_backend=s.noise_backend)
        image = np.full((3, *size), 0.5, dtype=np.float32)
        return lambda: list(runtime.labels(image, sigma=s.sigma, seed=0, start=0, count=PROBE_BATCH))

    def certify(
        self, image: np.ndarray, *, seed: int | None = None, progress: Progress | None = None
    ) -> tuple[CertifiedSegmentation, dict[str, Any]]:
        """Certify one (3, H, W) RGB or (1, H, W) gray image; returns the result and the JSON-ready record of how
        it was made.

        Refused in seconds, before any sample, when the memory estimate says the image cannot fit.
        """
        s = self.settings
        image_size = (int(image.shape[-2]), int(image.shape[-1]))
        s.validate(image_size[0] * image_size[1])
        memory = self.memory_estimate(image_size)
        if memory is not None:
            memory.check()
        spec, runtime = self.runtime_for(image_size)
        stages_before = self.remote.statistics() if self.remote is not None else None
        started = time.perf_counter()
        result = certify_image(
            runtime, image, num_classes=self.num_classes, sigma=s.sigma, n0=s.n0, n=s.n, tau=s.tau, alpha=s.alpha,
            fwer=s.fwer, seed=seed, progress=progress, non_finite=s.non_finite,
        )
        elapsed = time.perf_counter() - started
        timings: dict[str, Any] = dict(result.timings, total=elapsed, samples_per_second=(s.n0 + s.n) / elapsed)
        if self.remote is not None and stages_before is not None:
            from certseg.engine.runtimes.triton_runtime import stage_timings, statistics_delta

            timings["server_stages"] = stage_timings(statistics_delta(self.remote.statistics(), stages_before))
        record = {
            "settings": s.record(),
            "pipeline": spec.record(),
            "models": {
                "segmenter": self.segmenter.record(),
                "denoiser": None if self.denoiser is None else self.denoiser.record(),
            },
            "device": str(self.device),
            "timings": timings,
            "non_finite": result.non_finite,
            "certified_space": certified_space(int(image.shape[0])),
            "memory": None if memory is None else memory.record(),
        }
        return result, record
