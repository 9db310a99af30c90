"""FP16 TensorRT engines (serialized plans) from the exported ONNX files, with the TensorRT Python API.

TensorRT cannot be installed on the development machines (its PyPI wheels fetch from NVIDIA at install), so
this module is written against the documented TensorRT 10 API and every entry point skips with
``TENSORRT_MISSING`` when ``import tensorrt`` fails. Two build modes, chosen by what the installed TensorRT offers:

- TensorRT 10 (``BuilderFlag.FP16`` exists): the fp32 ONNX, weakly typed, FP16 allowed, and
  ``OBEY_PRECISION_CONSTRAINTS`` pinning normalisation and softmax layers, plus every layer computed from the
  ``timesteps`` input alone (the sinusoidal embedding and its MLPs), to float32.
- TensorRT 11+ (weak typing removed): a strongly typed network from the ``*.fp16.onnx`` file, whose fp32
  islands are already explicit casts in the graph.

Plans are GPU- and TensorRT-version-specific: build them on the serving machine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from certseg.engine.errors import CertsegError
from certseg.export.graph_surgery import derived_only_from
from certseg.export.progress import Log

TENSORRT_MISSING = "TensorRT is not installed: skipping engine build; ONNX files are ready for onnxruntime-gpu"
FP32_LAYER_TYPES: tuple[str, ...] = ("NORMALIZATION", "SOFTMAX")
"""``trt.LayerType`` names always kept in float32 (GroupNorm as InstanceNormalization, LayerNorm, attention)."""


class TensorRTUnavailable(CertsegError):
    """An engine build that was required (``--tensorrt``) but could not run or failed."""


@dataclass
class EngineBuild:
    """Outcome of one engine build: ``built`` (``path`` written), ``skipped`` (no TensorRT) or ``failed``."""

    status: Literal["built", "skipped", "failed"]
    message: str
    path: Path | None = None
    seconds: float = 0.0
    mode: str | None = None
    fp32_layers: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "status": self.status, "message": self.message, "file": None if self.path is None else self.path.name,
            "seconds": round(self.seconds, 3), "mode": self.mode, "fp32_layers": self.fp32_layers,
        }


def import_tensorrt() -> Any | None:
    """The ``tensorrt`` module, or None where it is missing or its libraries do not load."""
    try:
        import tensorrt
    except Exception:  # ImportError, or OSError from the bindings when libnvinfer/libnvonnxparser are absent
        return None
    return tensorrt


def tensorrt_available() -> bool:
    return import_tensorrt() is not None


def _major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def _network(trt: Any, builder: Any, strongly_typed: bool) -> Any:
    """A network definition: explicit batch before TensorRT 10 (the default since), strongly typed on request."""
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if _major(trt) < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return builder.create_network(flags)


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> list[str]:
    """Parse the ONNX file (external data is found beside it); the parser's errors, empty on success."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return []
    return [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["the ONNX parser failed"]


def _layer_edges(network: Any) -> list[tuple[list[str], list[str]]]:
    edges = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        edges.append(([t.name for t in inputs if t is not None], [t.name for t in outputs if t is not None]))
    return edges


def pin_fp32_layers(trt: Any, network: Any, fp32_sources: Sequence[str] = ()) -> int:
    """Set float32 precision and output types on normalisation/softmax layers and on every layer computed
    only from the ``fp32_sources`` inputs; returns how many layers were pinned (needs OBEY_PRECISION_CONSTRAINTS)."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    derived, _ = derived_only_from(_layer_edges(network), inputs.intersection(fp32_sources), set())
    kinds = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if i not in derived and layer.type not in kinds:
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not float_outputs:
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _profile(builder: Any, network: Any, shapes: Mapping[str, Sequence[int]], max_batch: int, opt: int) -> Any:
    """Batch 1 … max_batch (optimised for ``opt``) for every input at its per-sample shape."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise TensorRTUnavailable(f"no engine shape given for input {name!r}")
        sample = tuple(int(d) for d in shapes[name])
        profile.set_shape(name, (1, *sample), (opt, *sample), (max_batch, *sample))
    return profile


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    input_shapes: Mapping[str, Sequence[int]],
    max_batch: int,
    opt_batch: int | None = None,
    fp16: bool = True,
    fp32_sources: Sequence[str] = (),
    fp16_onnx: str | Path | None = None,
    workspace_bytes: int | None = None,
    log: Log | None = None,
) -> EngineBuild:
    """Build and write one serialized engine; never raises for a missing TensorRT (status ``skipped``).

    ``input_shapes`` maps each input to its per-sample shape (no batch dim); the profile spans batch
    1 … ``max_batch``, optimised for ``opt_batch`` (default: ``max_batch``, the batch a server fills).
    """
    trt = import_tensorrt()
    if trt is None:
        return EngineBuild("skipped", TENSORRT_MISSING)
    started = time.perf_counter()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    strongly_typed = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    source = Path(fp16_onnx) if strongly_typed and fp16_onnx is not None else onnx_path
    mode = "strongly-typed" if strongly_typed else ("fp16" if fp16 else "fp32")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _network(trt, builder, strongly_typed)
    errors = _parse(trt, network, logger, source)
    if errors:
        return EngineBuild("failed", f"TensorRT cannot parse {source.name}: {errors[0]}", mode=mode)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    pinned = 0
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_fp32_layers(trt, network, fp32_sources)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    max_batch = max(1, int(max_batch))
    opt = min(max_batch, max(1, int(opt_batch or max_batch)))
    config.add_optimization_profile(_profile(builder, network, input_shapes, max_batch, opt))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        return EngineBuild("failed", f"TensorRT failed to build an engine from {source.name}", mode=mode)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(memoryview(plan))
    seconds = time.perf_counter() - started
    if log is not None:
        log(f"TensorRT: wrote {plan_path.name} ({mode}, {pinned} layers pinned to fp32) in {seconds:.1f} s")
    return EngineBuild("built", f"built {plan_path.name}", plan_path, seconds, mode, pinned)
