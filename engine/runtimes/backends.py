"""Where a session's label pipeline runs: one backend per runtime (PyTorch, ONNX Runtime, Triton servers).

A backend holds the models (their ``ModelInfo``, and the modules where they run in this process) and the settings
as it runs them; it builds the runtime of each ``PipelineSpec``, says how the memory estimate probes it (it does
not for servers, which hold the memory), reports statistics where it has them, and closes. ``Session`` talks to
this interface alone, so no part of it asks which runtime it has.

The backends that load models into this process (``LocalBackend``, ``TorchBackend``, ``OnnxBackend``) live in
``certseg.engine.runtimes.local_backends``, which imports torch; they are reachable from here too, loaded on first
use, so a session on Triton servers imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from certseg.engine.choices import Method, NoiseBackend, Precision, RuntimeName, SharedMemory
from certseg.engine.core.contract import Runtime
from certseg.engine.errors import InputError
from certseg.engine.maths.pipeline_spec import PipelineSpec
from certseg.engine.models.info import ModelInfo
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.triton_runtime import ENSEMBLES, TritonRuntime, served_model

if TYPE_CHECKING:
    import torch

    from certseg.engine.core.sampling import LabelFn

_LOCAL = ("LocalBackend", "TorchBackend", "OnnxBackend", "_cached_model", "_open_model", "_check_onnx_models")
"""Names of ``certseg.engine.runtimes.local_backends`` also reachable here, loaded (with torch) on first use."""


def __getattr__(name: str) -> Any:
    if name in _LOCAL:
        from certseg.engine.runtimes import local_backends

        return getattr(local_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SERVER_BATCH = 1 << 30
"""An auto batch on Triton servers: as many samples per request as the servers take (their ``max_batch``)."""


@dataclass(frozen=True)
class MemoryProbe:
    """How the memory estimate runs a backend's label pipeline in this process (``certseg.engine.runtimes.memory``)."""

    label_fn: Callable[[PipelineSpec], LabelFn]
    device: torch.device
    precision: Precision
    margin: float
    onnx: bool
    """Whether the estimate is for ONNX Runtime (part of the key the probe's result is cached under)."""
    untracked: str | None = None
    """What the probe cannot see, said in the estimate's record."""


class Backend(Protocol):
    """The models, and the runtime that runs them for each pipeline spec."""

    settings: Settings
    """The settings as this backend runs them (servers decide their batch, precision and noise backend)."""
    segmenter: ModelInfo
    denoiser: ModelInfo | None

    @property
    def device(self) -> str:
        """Where the models run, as results record it."""
        ...

    @property
    def memory_probe(self) -> MemoryProbe | None:
        """None where the memory is not this process's (servers)."""
        ...

    def runtime(self, spec: PipelineSpec, batch: int | None = None) -> Runtime:
        """The runtime of ``spec``, ``batch`` samples per forward pass (None: the settings' batch; servers decide
        their own)."""
        ...

    def statistics(self) -> dict[str, Any] | None:
        """Cumulative per-step statistics where the backend has them (Triton servers), else None."""
        ...

    def precision_record(self, spec: PipelineSpec) -> dict[str, Any] | None:
        """What a certificate must record about its models' arithmetic beyond ``settings.precision`` (int8: the
        quantisation recipe and calibration set), else None."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TritonBackend:
    """Triton servers serving the certseg ensembles run the whole label pipeline; they also say what their models
    are (classes, denoiser size, hashes), so results record them as they record local ones."""

    settings: Settings
    segmenter: ModelInfo
    denoiser: ModelInfo | None
    remote: TritonRuntime
    device: str
    """``triton:`` and the servers' addresses."""

    @classmethod
    def connect(
        cls, settings: Settings, servers: tuple[str, ...], *, in_flight: int = 2,
        shared_memory: SharedMemory = SharedMemory.auto, retries: int = 3,
    ) -> TritonBackend:
        """Connect to ``servers`` (gRPC HOST:PORT); unreachable servers, a missing ensemble or another repository
        version raise ``ServerError`` here, before any work starts."""
        if settings.precision == Precision.int8:
            raise InputError("--precision int8 runs in-process on ONNX Runtime; servers run their repository's "
                             "graphs: drop --precision int8 or --server")
        if settings.compile:
            raise InputError("--compile compiles in-process torch models; servers run their repository's graphs: "
                             "drop --compile or --server")
        local = [flag for flag, value in (("--seg-mean", settings.seg_mean), ("--seg-std", settings.seg_std),
                                          ("--seg-input-size", settings.seg_input_size),
                                          ("--classes", settings.classes)) if value is not None]
        if local:
            raise InputError(f"{local[0]} describes a local model; with --server the repository's models come with "
                             "their own (certseg-export takes the same options)")
        remote = TritonRuntime(
            servers, ENSEMBLES[settings.method], batch=SERVER_BATCH if settings.batch is None else settings.batch,
            in_flight=in_flight, shared_memory=shared_memory, retries=retries,
        )
        served = remote.pipeline.metadata  # the server decides these; record what it did
        settings = replace(settings, runtime=RuntimeName.triton, batch=remote.batch,
                           noise_backend=str(served.get("noise_backend",
                                                        settings.noise_backend or NoiseBackend.numpy_philox)),
                           precision=str(served.get("precision", settings.precision)))
        segmenter = served_model(remote.pipeline, "segmenter")
        denoising = settings.method == Method.denoisecertify
        denoiser = served_model(remote.pipeline, "denoiser") if denoising else None
        if segmenter is None or (denoising and denoiser is None):
            remote.close()
            raise InputError(f"{remote.model} on {', '.join(remote.servers)} lacks a segmenter or denoiser step")
        return cls(settings, segmenter, denoiser, remote, device="triton:" + ",".join(remote.servers))

    @property
    def memory_probe(self) -> None:
        return None

    def runtime(self, spec: PipelineSpec, batch: int | None = None) -> Runtime:
        """The same connections, with this spec's t*, segmenter size and resize mode in every request (``batch``
        is the servers': the one they were connected with)."""
        return self.remote.with_pipeline(
            timestep=None if spec.timestep is None else spec.timestep.t, seg_size=spec.segmenter_size,
            antialias=spec.antialias, denoise_steps=spec.denoise_steps,
        )

    def statistics(self) -> dict[str, Any]:
        return self.remote.statistics()

    def precision_record(self, spec: PipelineSpec) -> None:
        return None

    def close(self) -> None:
        """Release the servers' connections."""
        self.remote.close()
