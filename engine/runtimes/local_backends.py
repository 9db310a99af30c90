"""The backends whose models run in this process: PyTorch (``TorchBackend``) and ONNX Runtime (``OnnxBackend``).

Models are loaded once per process (and again when their file changes). Split from
``certseg.engine.runtimes.backends`` (the interface, and the Triton servers' backend) because loading and running
models needs torch, which a client of a server never imports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from certseg.engine.choices import Method, Precision, RuntimeName
from certseg.engine.core.contract import Runtime
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.errors import InputError
from certseg.engine.maths.label_pipeline import LabelPipeline, PipelineSpec
from certseg.engine.models import facts
from certseg.engine.models.fold_batchnorm import fold_batchnorm
from certseg.engine.models.info import ONNX_FAMILY, LoadedModel, Role
from certseg.engine.models.registry import default_model, load_model, resolve
from certseg.engine.runtimes.backends import MemoryProbe
from certseg.engine.runtimes.memory import MARGIN, ONNX_MARGIN, cpu_model_batch
from certseg.engine.runtimes.process import set_threads
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.torch_runtime import autocast_label_fn, resolve_device, torch_runtime


@lru_cache(maxsize=8)
def _cached_model(ref: str, role: Role, device: str, stamp: tuple[int, int] | None, fold: bool,
                  factor: bool) -> LoadedModel:
    loaded = load_model(ref, role, device=device)
    if fold:
        fold_batchnorm(loaded.module)
        if hasattr(loaded.module, "fuse_pointwise"):  # HRNet: with its norms folded, each conv's ReLU/add fused too
            loaded.module.fuse_pointwise()
    if factor and hasattr(loaded.module, "factor_head"):
        loaded.module.factor_head()
    return loaded


def _open_model(ref: str, role: Role, device: str, fold: bool = False, factor: bool = False) -> LoadedModel:
    """A model loaded once per process, and again when its file changed (re-exported to the same path);
    ``fold``: its BatchNorms folded into their convolutions (and an HRNet's ReLUs and residual adds fused into them
    where the kernels allow, ``HRNetV2.fuse_pointwise``); ``factor``: an HRNet's head factored
    (``HRNetV2.factor_head``); each combination a copy of its own, cached apart."""
    path, _ = resolve(ref)
    stat = path.stat() if path.is_file() else None
    return _cached_model(ref, role, device, None if stat is None else (stat.st_mtime_ns, stat.st_size), fold,
                         factor)


def _check_onnx_models(settings: Settings, models: list[LoadedModel]) -> None:
    """ONNX files run as given, in ONNX Runtime: refuse the settings that would need them to be something else."""
    onnx = next((m for m in models if m.family == ONNX_FAMILY), None)
    if onnx is None:
        return
    if settings.runtime != RuntimeName.onnx:
        raise InputError(f"{onnx.name} is an ONNX graph, which --runtime {settings.runtime} cannot run: use "
                         "--runtime onnx (the default when a model is an .onnx file)")
    if settings.precision != Precision.fp32:
        raise InputError(f"{onnx.name} is an ONNX graph and runs as given (fp32): drop --precision "
                         f"{settings.precision}")


@dataclass(frozen=True)
class LocalBackend(ABC):
    """Models loaded in this process (once per process), run here on ``torch_device``."""

    settings: Settings
    segmenter: LoadedModel
    denoiser: LoadedModel | None
    torch_device: torch.device
    threads: int | None = None
    """ONNX Runtime's intra-op threads (None: its default); torch's are process-wide (``process.set_threads``)."""

    @staticmethod
    def open(settings: Settings, threads: int | None = None) -> LocalBackend:
        """Load the models of ``settings`` and check them against it; the backend is that of its runtime
        (decided here when none is named: ``Settings.resolved``, which also decides an auto noise backend).
        ``threads``: torch's CPU threads are set to it before any model runs, and ONNX Runtime sessions take it."""
        set_threads(threads)
        settings = settings.resolved()
        if settings.runtime == RuntimeName.triton:
            raise InputError("--runtime triton: Triton servers run the pipeline; name them with --server HOST:PORT")
        if settings.compile and settings.runtime != RuntimeName.torch:
            raise InputError(f"--compile compiles torch models: use --runtime torch, not --runtime {settings.runtime} "
                             "(ONNX Runtime optimises its graphs itself)")
        if settings.precision == Precision.int8 and settings.runtime != RuntimeName.onnx:
            raise InputError("--precision int8 runs int8 graphs in ONNX Runtime: pass --runtime onnx (the default "
                             "runtime with int8), not --runtime torch")
        device = resolve_device(settings.device)
        fold = settings.folds_batchnorm
        segmenter = _open_model(settings.segmenter or default_model("segmenter", settings.method), "segmenter",
                                str(device), fold, settings.factors_head)
        denoiser = None
        if settings.method == Method.denoisecertify:
            denoiser = _open_model(settings.denoiser or default_model("denoiser", settings.method), "denoiser",
                                   str(device), fold)
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
        kind = OnnxBackend if settings.runtime == RuntimeName.onnx else TorchBackend
        return kind(settings, segmenter, denoiser, device, threads)

    @property
    def device(self) -> str:
        return str(self.torch_device)

    def label_pipeline(self, spec: PipelineSpec) -> LabelPipeline:
        """The models as loaded, with the stage maths of ``spec`` around them."""
        return LabelPipeline(spec, self.segmenter.module, None if self.denoiser is None else self.denoiser.module)

    def runtime(self, spec: PipelineSpec, batch: int | None = None) -> Runtime:
        """The runtime of ``spec``, after checking that an ONNX segmenter's graph takes its input size."""
        contract = getattr(self.segmenter.module, "contract", None)
        if contract is not None and self.segmenter.input_size is None:
            height, width = spec.image_size
            contract.check_size(spec.segmenter_size, f"this {height}x{width} image at --scale {self.settings.scale}")
        batch = self.settings.batch if batch is None else batch
        if batch is None:
            raise ValueError("an auto batch is resolved by the session (Session.batch_for); pass batch")
        return self._runtime(spec, batch)

    @abstractmethod
    def _runtime(self, spec: PipelineSpec, batch: int) -> Runtime: ...

    @property
    @abstractmethod
    def memory_probe(self) -> MemoryProbe: ...

    def statistics(self) -> None:
        return None

    def precision_record(self, spec: PipelineSpec) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        """Nothing to release: the models stay cached for the next session."""
        return None


@dataclass(frozen=True)
class TorchBackend(LocalBackend):
    """PyTorch on CPU or CUDA, fp32 or fp16/bf16 autocast (``certseg.engine.runtimes.torch_runtime``)."""

    def _runtime(self, spec: PipelineSpec, batch: int) -> Runtime:
        s = self.settings
        return torch_runtime(self.label_pipeline(spec), device=self.torch_device, precision=s.precision,
                             batch_size=batch, noise_backend=s.noise_backend,
                             keep_labels_on_device=self.torch_device.type == "cuda",  # counted there
                             compile=s.compile, model_batch=cpu_model_batch(self.device, spec.image_size))

    @property
    def memory_probe(self) -> MemoryProbe:
        """The pipeline as the runtime runs it: converted to the device, layout and precision it runs in (eager even
        with ``compile``: compiling for the probe's small sizes would cost more than the run it plans)."""
        precision = self.settings.precision
        return MemoryProbe(lambda spec: autocast_label_fn(self.label_pipeline(spec), self.torch_device, precision),
                           self.torch_device, precision, MARGIN, onnx=False)


@dataclass(frozen=True)
class OnnxBackend(LocalBackend):
    """ONNX Runtime: an ONNX model file as given, other models on graphs exported from exactly their weights
    (exported once, then cached)."""

    def _runtime(self, spec: PipelineSpec, batch: int) -> Runtime:
        from certseg.engine.models.ort_module import OrtModule
        from certseg.engine.runtimes.onnx_runtime import export_paths
        from certseg.export.cache import cached_export  # the one seam into certseg.export: torch weights -> graphs

        s = self.settings
        if s.precision == Precision.bf16:
            raise InputError("the ONNX runtime runs fp32, fp16 or int8 graphs; use --precision fp32, fp16 or int8")
        models = {"segmenter": self.segmenter, "denoiser": self.denoiser}
        modules = {role: self._with_threads(m.module) for role, m in models.items()
                   if m is not None and m.family == ONNX_FAMILY}
        exported = {role: m for role, m in models.items() if m is not None and role not in modules}
        if s.precision == Precision.int8:
            paths, _ = self._int8(spec)
            for role in exported:
                modules[role] = OrtModule(paths[role], threads=self.threads)
        elif exported:
            folder = cached_export(exported.get("segmenter"), exported.get("denoiser"), spec.image_size,
                                   scale=spec.scale, fp16=s.precision == Precision.fp16)
            paths = export_paths(folder, precision=s.precision,
                                 expected_sha256={role: m.sha256 for role, m in exported.items()})
            for role in exported:
                path = paths[role]
                if path is None:
                    raise InputError(f"{folder} has no {s.precision} {role} graph")
                modules[role] = OrtModule(path, threads=self.threads)
        pipeline = LabelPipeline(spec, modules["segmenter"], modules.get("denoiser")).eval()
        return LocalRuntime(pipeline, batch_size=batch, device="cpu", noise_backend=s.noise_backend,
                            pipeline=pipeline, model_batch=cpu_model_batch("cpu", spec.image_size))

    def _int8(self, spec: PipelineSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        """The int8 graphs of ``spec`` (quantised once, then cached) and their record."""
        from certseg.engine.runtimes.onnx_runtime import int8_paths
        from certseg.export.cache import cached_int8_export

        folder = cached_int8_export(self.segmenter, self.denoiser, spec)
        expected = {role: m.sha256 for role, m in (("segmenter", self.segmenter), ("denoiser", self.denoiser))
                    if m is not None}
        return int8_paths(folder, expected_sha256=expected)

    def precision_record(self, spec: PipelineSpec) -> dict[str, Any] | None:
        """For int8: the int8 graphs' record (quantisation recipe, calibration set, versions, files)."""
        return self._int8(spec)[1] if self.settings.precision == Precision.int8 else None

    def _with_threads(self, module: Any) -> Any:
        """An ONNX model file's module (loaded once per process with ONNX Runtime's default threads), with a session
        of its own on ``threads`` when they are set."""
        from certseg.engine.models.ort_module import OrtModule

        if self.threads is None:
            return module
        rebuilt = OrtModule(module.path, threads=self.threads, input_order=module.input_names)
        if hasattr(module, "contract"):
            rebuilt.contract = module.contract
        return rebuilt.eval()

    @property
    def memory_probe(self) -> MemoryProbe:
        """The torch models in fp32 on the CPU stand in for the graphs exported from them (with a larger margin);
        an ONNX file runs in ONNX Runtime, whose activations the probe cannot see."""
        files = [m.name for m in (self.segmenter, self.denoiser) if m is not None and m.family == ONNX_FAMILY]
        untracked = f"activations inside onnxruntime of {', '.join(files)}" if files else None
        return MemoryProbe(self.label_pipeline, torch.device("cpu"), Precision.fp32, ONNX_MARGIN, onnx=True,
                           untracked=untracked)
