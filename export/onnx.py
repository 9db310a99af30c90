"""ONNX export of the two models, FP16 variants, parity against PyTorch, and ``export_models`` for the CLIs.

Graphs (names are the contract the runtimes and the Triton repository rely on):

- denoiser: ``x_t`` float32 (B, 3, S, S), ``timesteps`` int64 (B,) → ``eps`` float32 (B, 3, S, S). Only ε
  (channels 0-2) leaves the graph: the certifier uses nothing else, and it halves the transfer.
- segmenter: ``images`` float32 (B, 3, h, w), ImageNet-normalised at the segmenter's input size →
  ``logits`` float32 (B, K, h', w'). For ViT-Adapter these are class scores, not logits; only the argmax is used.

Each graph carries certseg's metadata props (``certseg.engine.models.facts.KEYS``: the segmenter's normalisation,
classes and palette, the denoiser's schedule), so the file alone says how to run it. A bring-your-own ONNX model
(``LoadedModel`` of family "onnx") is copied unchanged: no fp16 variant, no parity (there is no torch model).

The batch is always dynamic. HRNet keeps h/w dynamic too when a probe at a second size matches torch; models
with a fixed crop (ViT-Adapter: a slide over windows whose count depends on the size) are exported at the
deployment size. The legacy TorchScript exporter is the default: 10-15x faster than ``dynamo=True`` on these
models with the same parity; ``exporter="dynamo"`` is there for when legacy goes. Measured (torch 2.13, export
seconds on 2 shared CPU cores, legacy vs dynamo): golden ADM small 4.0 vs 48.6, golden HRNet small 1.9 vs 28.2,
small ViT-Adapter 5.2 vs 62.0; fp32 parity equal (~1e-6; 1e-5 for ViT-Adapter); dynamo files 5-40% larger.

FP16 variants (``*.fp16.onnx``) come from onnxruntime's converter with float32 I/O (``keep_io_types``). The
sinusoidal timestep embedding (t·f, sin, cos: the weight-free nodes computed from ``timesteps``) stays
float32: in fp16, t·f near t = 999 is rounded by up to 0.25 rad before the sin/cos.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from certseg.engine.choices import Exporter, choice
from certseg.engine.digest import file_sha256
from certseg.engine.errors import CertsegError, InputError, first_line
from certseg.engine.stages import as_pair, normalize_imagenet, scaled_size
from certseg.engine.versions import package_versions

if TYPE_CHECKING:
    import onnx

    from certseg.engine.models.registry import LoadedModel

Log = Callable[[str], None]
DEFAULT_OPSET = 18
"""Opset 17 exports a Split that ORT refuses; 18-21 load (measured with torch 2.13 and onnxruntime 1.2x)."""
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
"""Weights above this many bytes go to ``<file>.data``: protobuf cannot serialise a model of 2 GiB or more."""
PARITY_BATCHES: tuple[int, ...] = (1, 3)
"""Parity batches: neither is the traced example batch (2), so they also prove the batch is dynamic."""
PARITY_TIMESTEPS: tuple[int, ...] = (999, 73, 144, 258)
"""DenoiseCertify's t* for σ = 0.25/0.5/1 and the schedule's end, where fp16 rounding of t·f is worst."""
PROBE_TOLERANCE = 1e-3
"""Relative max error under which a graph traced with dynamic h/w counts as valid at another size."""
DENOISER_INPUTS = ("x_t", "timesteps")
DENOISER_OUTPUTS = ("eps",)
SEGMENTER_INPUTS = ("images",)
SEGMENTER_OUTPUTS = ("logits",)
DENOISER_FP32_SOURCES: tuple[str, ...] = ("timesteps",)
"""FP16 denoiser: the weight-free nodes computed from ``timesteps`` stay fp32. Measured on the golden ADM
(fp16 vs fp32 ε, mean |Δ| ×1e4 for t = 1…999): flat ~1.0 with it, growing 1.0 → 12.3 without it."""
SEGMENTER_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
"""FP16 segmenters keep these ops fp32 (HRNet has none). On the small ViT-Adapter it halves the mean error
and lifts argmax agreement from 0.9938 to 0.9995 on one input set. Keeping the denoiser's GroupNorm
(InstanceNormalization) fp32 made it worse (max |Δ| 1.2e-3 vs 7e-4): the extra casts cost more than they save."""


EXPORT_FORMAT_VERSION = 2
"""Bump when exported graphs change for the same weights (cached exports are keyed by it). 2: metadata props."""


def _log(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)


def _require_onnx():
    """The ``onnx`` package, or a one-line error naming the extra that provides it."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise CertsegError(f"ONNX export needs the onnx extra (pip install 'certseg[onnx]'): {error}") from None
    return onnx


class EpsOnly(nn.Module):
    """The UNet with ε (output channels 0-2) only; a learn_sigma model's variance channels are dropped."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, timesteps)[:, :3]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the file declares it (dynamic dims are named strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ExportedGraph:
    """One exported model: its files, I/O, how it was made and how closely it matches torch."""

    role: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    exporter: str
    external_data: bool
    dynamic_size: bool
    example_size: tuple[int, int]
    fp16_path: Path | None = None
    parity: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fp32_in_fp16: dict[str, list[str]] = field(default_factory=dict)
    side_files: tuple[Path, ...] = ()
    """A bring-your-own file's external-data files, under their own names (its graph refers to them so)."""

    @property
    def data_path(self) -> Path | None:
        """The side file holding the weights when they are stored as external data."""
        if self.side_files:
            return self.side_files[0]
        return self.path.with_name(self.path.name + ".data") if self.external_data else None

    def files(self) -> list[Path]:
        """Every file of this graph: fp32, its external data, fp16 and (if any) the fp16's external data."""
        paths = [self.path, self.data_path, *self.side_files[1:], self.fp16_path]
        if self.fp16_path is not None:
            paths.append(self.fp16_path.with_name(self.fp16_path.name + ".data"))
        return [p for p in paths if p is not None and p.is_file()]

    def record(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "data_file": None if self.data_path is None else self.data_path.name,
            "fp16_file": None if self.fp16_path is None else self.fp16_path.name,
            "inputs": [spec.record() for spec in self.inputs],
            "outputs": [spec.record() for spec in self.outputs],
            "opset": self.opset,
            "exporter": self.exporter,
            "external_data": self.external_data,
            "dynamic_size": self.dynamic_size,
            "example_size": list(self.example_size),
            "parity": self.parity,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "fp32_in_fp16": self.fp32_in_fp16,
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------- graph analysis


def derived_only_from(
    nodes: Sequence[tuple[Sequence[str], Sequence[str]]], sources: set[str], constants: set[str]
) -> tuple[set[int], set[int]]:
    """(derived, constant) node indices of a topologically ordered graph given as (inputs, outputs) pairs.

    ``derived``: nodes computed from ``sources`` and constants only, with at least one source-derived input
    (for the denoiser: the timestep embedding and the per-block embedding projections). ``constant``: nodes
    computed from constants only. Shared by the FP16 ONNX conversion and the TensorRT precision pins.
    """
    derived_tensors, constant_tensors = set(sources), set(constants)
    derived, constant = set(), set()
    for index, (inputs, outputs) in enumerate(nodes):
        used = [name for name in inputs if name]
        if all(name in constant_tensors for name in used):
            constant.add(index)
            constant_tensors.update(outputs)
        elif all(name in constant_tensors or name in derived_tensors for name in used):
            derived.add(index)
            derived_tensors.update(outputs)
    return derived, constant


def _fp32_island(model: onnx.ModelProto, sources: Sequence[str]) -> list[str]:
    """Names of the weight-free nodes computed only from ``sources`` (for the denoiser: t, t·f, sin, cos,
    concat), plus the Constant nodes they read. Nodes reading weights are left out: fp16 embedding MLPs
    measured as accurate (golden ADM: max |Δ| 7.4e-4 vs 8.2e-4 with them fp32) at half the bytes."""
    graph = model.graph
    edges = [(list(node.input), list(node.output)) for node in graph.node]
    derived, constant = derived_only_from(edges, set(sources), set())
    read = {name for i in derived for name in graph.node[i].input}
    feeding = {i for i in constant if read.intersection(graph.node[i].output)}
    return [graph.node[i].name for i in sorted(derived | feeding)]


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: the FP16 converter's block list works by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def _drop_cast_round_trips(model: onnx.ModelProto) -> int:
    """Remove the converter's fp32 → fp16 → fp32 casts between two kept-fp32 nodes; returns how many.

    The converter puts every output of a blocked node through fp16 before the next node casts it back, so a
    chain of fp32 nodes would still be rounded to fp16 at each step. Only converter-inserted casts (named
    ``*_cast_to_fp16_node`` / ``*_cast_to_fp32_node``, always from float32) are touched.
    """
    from onnx import TensorProto

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or not node.name.endswith("_cast_to_fp32_node"):
            continue
        source = producer.get(node.input[0])
        if (
            _cast_target(node) == TensorProto.FLOAT
            and source is not None
            and source.op_type == "Cast"
            and source.name.endswith("_cast_to_fp16_node")
            and _cast_target(source) == TensorProto.FLOAT16
        ):
            rename[node.output[0]] = source.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _prune_dead_casts(graph)
    return len(rename)


def _prune_dead_casts(graph: onnx.GraphProto) -> None:
    """Drop Cast nodes whose outputs nothing reads (repeat: removing one may orphan its producer cast)."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not read.intersection(n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
        gone = {out for node in dead for out in node.output}
        for info in [v for v in graph.value_info if v.name in gone]:
            graph.value_info.remove(info)


# ------------------------------------------------------------------------------------------------ saving, specs


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (what decides whether the protobuf would pass 2 GiB)."""
    from onnx import helper

    total = 0
    for init in model.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += math.prod(init.dims) * itemsize
    return total


def save_model(
    model: onnx.ModelProto, path: Path, *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> bool:
    """Write ``path``, with every weight in ``<path>.data`` when they pass the threshold; True if external.

    A stale ``.data`` file is deleted first (onnx appends to an existing one). ``model`` is consumed: saving
    as external data moves its tensors out.
    """
    onnx = _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    external = tensor_bytes(model) > external_data_threshold
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name,
        size_threshold=1024,
    )
    return external


def _dim(dim: Any) -> int | str:
    return dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")


def _declare_shape(value: Any, shape: Sequence[int | str]) -> None:
    dims = value.type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        dim = dims.add()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = int(size)


def graph_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The declared inputs and outputs of an ONNX file (weights not loaded)."""
    onnx = _require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorSpec(value.name, dtype, tuple(_dim(d) for d in tensor.shape.dim))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    return inputs, tuple(spec(v) for v in model.graph.output)


# ---------------------------------------------------------------------------------------------------- exporting


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' tracer/deprecation warnings and dynamo's progress lines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _trace(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    file: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    exporter: Exporter | str,
) -> None:
    """Run one exporter into ``file`` (weights may land beside it); a failure becomes one ``CertsegError`` line
    (the original exception stays attached as ``__cause__`` for debugging)."""
    exporter = choice(Exporter, exporter, "exporter", InputError)
    try:
        _run_exporter(module, args, file, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, opset=opset, exporter=exporter)
    except CertsegError:
        raise
    except Exception as error:
        raise CertsegError(f"torch.onnx ({exporter} exporter) failed: {first_line(error, with_type=True)}") from error


def _run_exporter(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    file: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    exporter: Exporter,
) -> None:
    with _quiet(), torch.no_grad():
        if exporter == Exporter.legacy:
            torch.onnx.export(
                module, args, str(file), dynamo=False, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                do_constant_folding=True,
            )
            return
        dims: dict[str, torch.export.Dim] = {}
        shapes = tuple(
            {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in dynamic_axes[name].items()}
            for name in input_names
        )
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=shapes, optimize=True, verbose=False,
        )
        program.save(str(file), external_data=True)


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
    exporter: Exporter | str = Exporter.legacy,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    output_shapes: Mapping[str, Sequence[int | str]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bool:
    """Export ``module`` traced on ``args`` to ``path``; True when the weights went to ``<path>.data``.

    Both exporters write into a scratch folder first (legacy scatters one file per tensor above 2 GB, dynamo
    names its own data file); the model is then re-saved with one consolidated data file or none.
    ``output_shapes`` overrides the declared output shapes (the legacy exporter leaves ones behind a Resize
    as opaque names, which Triton configs and TensorRT profiles cannot use). ``metadata`` becomes the file's
    metadata props (certseg's contract keys).
    """
    onnx = _require_onnx()
    if opset < 18:
        raise InputError(f"opset must be >= 18 (opset 17 exports a Split that onnxruntime refuses), got {opset}")
    with tempfile.TemporaryDirectory(prefix="certseg-onnx-") as scratch:
        file = Path(scratch) / "model.onnx"
        _trace(module, args, file, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
               opset=opset, exporter=exporter)
        model = onnx.load(str(file))
    for output in model.graph.output:
        if output_shapes and output.name in output_shapes:
            _declare_shape(output, output_shapes[output.name])
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return save_model(model, Path(path), external_data_threshold=external_data_threshold)


def fp16_path_for(path: Path) -> Path:
    """``denoiser.onnx`` → ``denoiser.fp16.onnx``."""
    return path.with_name(path.stem + ".fp16" + path.suffix)


def convert_to_fp16(
    src: Path,
    dst: Path | None = None,
    *,
    fp32_sources: Sequence[str] = (),
    op_block_list: Sequence[str] = (),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """An FP16 copy of ``src`` with float32 inputs/outputs (onnxruntime's converter, ``keep_io_types``).

    Nodes computed only from the ``fp32_sources`` inputs stay float32 as one island (no fp16 round trips
    inside it), as do the op types in ``op_block_list`` (added to the converter's own list). Shape inference
    runs on the weight-free graph, so models over 2 GB convert too.
    """
    onnx = _require_onnx()
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    dst = dst or fp16_path_for(src)
    model = onnx.load(str(src), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    load_external_data_for_model(model, str(src.parent))
    _name_nodes(model)
    island = _fp32_island(model, fp32_sources) if fp32_sources else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True, node_block_list=island,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list),
        )
    _drop_cast_round_trips(converted)
    save_model(converted, dst, external_data_threshold=external_data_threshold)
    return dst


# ------------------------------------------------------------------------------------------------------- parity


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
    from certseg.engine.runtimes.onnx_runtime import OrtModule

    with torch.no_grad():
        reference = torch_callable(*inputs)
    got = OrtModule(onnx_path, providers=providers, threads=threads)(*inputs)
    return parity_stats(reference, got)


def _measure_parity(
    graph: ExportedGraph,
    reference_fn: Callable[..., torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, ...]],
    *,
    threads: int | None,
    log: Log | None,
) -> None:
    """Fill ``graph.parity`` (fp32 and fp16 files against one torch reference per batch) and print it."""
    from certseg.engine.runtimes.onnx_runtime import OrtModule

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
            _log(log, f"{graph.role} {name} parity at batch {stats['batch']}: max |Δ| {stats['max_abs']:.2e} "
                      f"(scale {stats['ref_max_abs']:.2g}), argmax agreement {stats['argmax_agreement']:.6f}")
    graph.seconds["parity"] = time.perf_counter() - started


def _fill_fp16(
    graph: ExportedGraph, fp16: bool, fp32_sources: Sequence[str], fp32_ops: Sequence[str], threshold: int,
    log: Log | None,
) -> None:
    if not fp16:
        return
    started = time.perf_counter()
    graph.fp16_path = convert_to_fp16(graph.path, fp32_sources=fp32_sources, op_block_list=fp32_ops,
                                      external_data_threshold=threshold)
    graph.fp32_in_fp16 = {"sources": list(fp32_sources), "ops": list(fp32_ops)}
    graph.seconds["fp16"] = time.perf_counter() - started
    _log(log, f"{graph.role}: wrote {graph.fp16_path.name} in {graph.seconds['fp16']:.1f} s")


# ---------------------------------------------------------------------------------------------------- denoiser


def denoiser_parity_inputs(size: tuple[int, int], batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t ~ N(0, 1) (the scale x_t has at every t) and timesteps cycling through ``PARITY_TIMESTEPS``."""
    x_t = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + batch))
    timesteps = torch.tensor([PARITY_TIMESTEPS[i % len(PARITY_TIMESTEPS)] for i in range(batch)])
    return x_t, timesteps


def export_denoiser(
    module: nn.Module,
    path: str | Path,
    *,
    image_size: int | Sequence[int],
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    exporter: Exporter | str = Exporter.legacy,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    threads: int | None = None,
    log: Log | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ExportedGraph:
    """Export the UNet as ``x_t``, ``timesteps`` → ``eps`` (dynamic batch) at its native ``image_size``.

    With ``fp16`` also writes ``<name>.fp16.onnx`` (timestep embedding kept fp32). Parity against torch is
    measured at each of ``parity_batches`` (none: skip) and stored in the returned graph.
    """
    path = Path(path)
    size = as_pair(image_size)
    wrapped = EpsOnly(module).eval()
    axes = {"x_t": {0: "batch"}, "timesteps": {0: "batch"}, "eps": {0: "batch"}}
    started = time.perf_counter()
    external = export_graph(
        wrapped, denoiser_parity_inputs(size, 2), path, input_names=DENOISER_INPUTS, output_names=DENOISER_OUTPUTS,
        dynamic_axes=axes, opset=opset, exporter=exporter, external_data_threshold=external_data_threshold,
        metadata=metadata,
    )
    inputs, outputs = graph_io(path)
    graph = ExportedGraph(
        role="denoiser", path=path, inputs=inputs, outputs=outputs, opset=opset, exporter=exporter,
        external_data=external, dynamic_size=False, example_size=size,
        seconds={"export": time.perf_counter() - started},
    )
    _log(log, f"denoiser: wrote {path.name}{' (+ .data)' if external else ''} with the {exporter} exporter "
              f"in {graph.seconds['export']:.1f} s")
    _fill_fp16(graph, fp16, DENOISER_FP32_SOURCES, (), external_data_threshold, log)
    if parity_batches:
        _measure_parity(graph, wrapped, [denoiser_parity_inputs(size, b) for b in parity_batches], threads=threads,
                        log=log)
    return graph


# --------------------------------------------------------------------------------------------------- segmenter


def segmenter_parity_inputs(size: tuple[int, int], batch: int, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised images: smooth random colour fields (upsampled 8x8 noise) plus fine noise in [0, 1]."""
    generator = torch.Generator().manual_seed(seed + 100 + batch)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    fine = 0.1 * torch.rand(batch, 3, *size, generator=generator)
    return normalize_imagenet((0.9 * smooth + fine).clamp(0, 1))


def probe_size(size: tuple[int, int]) -> tuple[int, int]:
    """A second input size, about half the traced one and never equal to it, to test dynamic h/w."""
    probe = tuple(max(s // 2, 32) + 4 for s in size)
    return tuple(p + 4 if p == s else p for p, s in zip(probe, size, strict=True))  # type: ignore[return-value]


def _size_probe(module: nn.Module, path: Path, size: tuple[int, int], threads: int | None) -> str | None:
    """None when the graph matches torch at ``probe_size(size)``, else why not."""
    from certseg.engine.runtimes.onnx_runtime import OrtModule

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


def export_segmenter(
    module: nn.Module,
    path: str | Path,
    *,
    example_size: int | Sequence[int],
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    exporter: Exporter | str = Exporter.legacy,
    dynamic_size: bool | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    threads: int | None = None,
    log: Log | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ExportedGraph:
    """Export a segmenter as ``images`` → ``logits`` (dynamic batch), traced at ``example_size`` (h, w).

    ``dynamic_size`` None (auto): dynamic h/w unless the model has a fixed ``crop_size`` (ViT-Adapter), kept
    only if the graph matches torch at a second size, else re-exported at ``example_size``. True/False force it.
    """
    path = Path(path)
    size = as_pair(example_size)
    module = module.eval()
    dynamic = (not hasattr(module, "crop_size")) if dynamic_size is None else bool(dynamic_size)
    notes = [] if dynamic or dynamic_size is False else [f"fixed size: the model has a fixed crop {module.crop_size}"]
    started = time.perf_counter()
    external = _export_segmenter_graph(module, path, size, dynamic, opset, exporter, external_data_threshold,
                                       metadata)
    if dynamic and dynamic_size is None:
        problem = _size_probe(module, path, size, threads)
        if problem is not None:
            notes.append(f"fixed size: the dynamic-size graph failed at another size ({problem})")
            _log(log, f"segmenter: {notes[-1]}; re-exporting at {size[0]}x{size[1]}")
            dynamic = False
            external = _export_segmenter_graph(module, path, size, False, opset, exporter, external_data_threshold,
                                               metadata)
    inputs, outputs = graph_io(path)
    graph = ExportedGraph(
        role="segmenter", path=path, inputs=inputs, outputs=outputs, opset=opset, exporter=exporter,
        external_data=external, dynamic_size=dynamic, example_size=size, notes=notes,
        seconds={"export": time.perf_counter() - started},
    )
    shape = "dynamic" if dynamic else f"{size[0]}x{size[1]}"
    _log(log, f"segmenter: wrote {path.name} ({shape} input) with the {exporter} exporter "
              f"in {graph.seconds['export']:.1f} s")
    _fill_fp16(graph, fp16, (), SEGMENTER_FP32_OPS, external_data_threshold, log)
    if parity_batches:
        _measure_parity(graph, module, [(segmenter_parity_inputs(size, b),) for b in parity_batches],
                        threads=threads, log=log)
    return graph


def _export_segmenter_graph(
    module: nn.Module, path: Path, size: tuple[int, int], dynamic: bool, opset: int, exporter: Exporter | str,
    threshold: int, metadata: Mapping[str, str] | None = None,
) -> bool:
    spatial_in = {2: "height", 3: "width"} if dynamic else {}
    spatial_out = {2: "out_height", 3: "out_width"} if dynamic else {}
    axes = {"images": {0: "batch", **spatial_in}, "logits": {0: "batch", **spatial_out}}
    with torch.no_grad():
        traced = list(module(segmenter_parity_inputs(size, 1)).shape)
    declared: list[int | str] = ["batch", traced[1], *(["out_height", "out_width"] if dynamic else traced[2:])]
    return export_graph(
        module, (segmenter_parity_inputs(size, 2),), path, input_names=SEGMENTER_INPUTS,
        output_names=SEGMENTER_OUTPUTS, dynamic_axes=axes, opset=opset, exporter=exporter,
        external_data_threshold=threshold, output_shapes={"logits": declared}, metadata=metadata,
    )


# ------------------------------------------------------------------------------------------------ both, on disk


@dataclass
class ExportResult:
    """What ``export_models`` wrote: graphs, engines and the ``export.json`` record.

    ``segmenter``, ``denoiser``, ``*_fp16``, ``*_plan`` (paths) and ``metadata`` are the attributes the Triton
    repository writer (``certseg.export.repository.model_files``) reads.
    """

    out_dir: Path
    image_size: tuple[int, int]
    segmenter_size: tuple[int, int]
    denoiser_size: tuple[int, int] | None
    max_batch: int
    segmenter_graph: ExportedGraph | None
    """None only for a denoiser-only export (the in-process ONNX runtime's cache, beside an ONNX segmenter)."""
    denoiser_graph: ExportedGraph | None
    models: dict[str, dict[str, Any] | None]
    engines: dict[str, Any] = field(default_factory=dict)
    manifest: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)
    client_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def graphs(self) -> dict[str, ExportedGraph]:
        return {g.role: g for g in (self.segmenter_graph, self.denoiser_graph) if g is not None}

    @property
    def parity(self) -> dict[str, dict[str, list[dict[str, float]]]]:
        return {role: graph.parity for role, graph in self.graphs.items()}

    @property
    def segmenter(self) -> Path | None:
        return None if self.segmenter_graph is None else self.segmenter_graph.path

    @property
    def denoiser(self) -> Path | None:
        return None if self.denoiser_graph is None else self.denoiser_graph.path

    @property
    def segmenter_fp16(self) -> Path | None:
        return None if self.segmenter_graph is None else self.segmenter_graph.fp16_path

    @property
    def denoiser_fp16(self) -> Path | None:
        return None if self.denoiser_graph is None else self.denoiser_graph.fp16_path

    def _plan(self, role: str) -> Path | None:
        build = self.engines.get(role)
        return build.path if build is not None and build.status == "built" else None

    @property
    def segmenter_plan(self) -> Path | None:
        return self._plan("segmenter")

    @property
    def denoiser_plan(self) -> Path | None:
        return self._plan("denoiser")

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready facts for clients: class names and palette (when the checkpoint has them), model
        records, the served image size."""
        facts = {key: value for key, value in self.client_facts.items() if value is not None}
        return facts | {
            "segmenter": self.models.get("segmenter"),
            **({"denoiser": self.models["denoiser"]} if self.models.get("denoiser") else {}),
            "image_size": list(self.image_size),
            "segmenter_size": list(self.segmenter_size),
        }


def versions() -> dict[str, str | None]:
    """Versions of everything that shapes the exported files (None where a package is not installed)."""
    return package_versions(("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "certseg"))


def _model_record(model: LoadedModel) -> dict[str, Any]:
    """What clients record about an exported model, including how the pipeline must run it (the repository
    writer renders the segmenter's normalisation and the denoiser's schedule from here)."""
    from certseg.engine.models import facts

    record = model.record() | {"num_classes": model.num_classes, "input_size": model.input_size}
    if model.role == "segmenter":
        record["normalization"] = facts.normalization_record(facts.normalization(model))
    else:
        record["schedule"] = facts.schedule(model).record()
    return record


def external_data_files(path: Path) -> list[Path]:
    """The side files an ONNX file keeps its weights in (relative to its folder), by the names it uses."""
    onnx = _require_onnx()
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return [path.parent / name for name in sorted(names)]


def copy_onnx_model(model: LoadedModel, path: Path, log: Log | None = None) -> ExportedGraph:
    """A bring-your-own ONNX model into the export folder, byte for byte (its sha256 stays the model's), with
    its external-data files under the names its graph refers to."""
    onnx = _require_onnx()
    source = Path(model.source)
    started = time.perf_counter()
    sides = external_data_files(source)
    copied = []
    for side in sides:
        target = path.parent / side.name
        if target.exists() and target.read_bytes() != side.read_bytes():
            raise InputError(f"{source.name} keeps its weights in {side.name}, and another model's {target} has "
                             "that name: rename one of them")
        shutil.copyfile(side, target)
        copied.append(target)
    shutil.copyfile(source, path)
    inputs, outputs = graph_io(path)
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    image_dims = inputs[0].shape[2:]
    graph = ExportedGraph(
        role=model.role, path=path, inputs=inputs, outputs=outputs, opset=opset, exporter="as given",
        external_data=bool(copied), dynamic_size=not all(isinstance(d, int) for d in image_dims),
        example_size=model.input_size or (0, 0), side_files=tuple(copied),
        seconds={"export": time.perf_counter() - started},
        notes=[f"bring-your-own ONNX file {source.name}, copied unchanged (no fp16 variant, no parity: there is no "
               "torch model to compare with)"],
    )
    _log(log, f"{model.role}: copied {source.name} unchanged to {path.name}")
    return graph


def export_models(
    segmenter: LoadedModel | None,
    denoiser: LoadedModel | None,
    out_dir: str | Path,
    *,
    image_size: Sequence[int],
    max_batch: int = 16,
    fp16: bool = True,
    tensorrt: bool | None = None,
    scale: float = 1.0,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter | str = Exporter.legacy,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    threads: int | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export the segmenter (and the denoiser) for a deployment serving ``image_size`` (H, W) images.

    Writes ``segmenter.onnx``, ``denoiser.onnx`` (+ ``.data`` above the threshold), their ``.fp16.onnx``
    variants, TensorRT plans when ``tensorrt`` (None: when TensorRT imports; True: required), and
    ``export.json``. The segmenter is traced at round(scale · image_size) (or the fixed input size it states),
    the denoiser at its native size. Each graph carries certseg's metadata props. An ONNX model (family "onnx")
    is copied unchanged instead. ``segmenter`` None exports the denoiser alone.
    """
    if max_batch < 1:
        raise InputError(f"max batch must be >= 1, got {max_batch}")
    height, width = as_pair(image_size)
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {height}x{width}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from certseg.engine.models import facts

    fixed = None if segmenter is None else segmenter.input_size
    segmenter_size = scaled_size(height, width, scale) if fixed is None else fixed
    common = dict(opset=opset, fp16=fp16, exporter=exporter, external_data_threshold=external_data_threshold,
                  parity_batches=parity_batches, threads=threads, log=log)
    seg_graph = None
    if segmenter is not None and segmenter.family == "onnx":
        seg_graph = copy_onnx_model(segmenter, out / "segmenter.onnx", log)
    elif segmenter is not None:
        seg_graph = export_segmenter(segmenter.module, out / "segmenter.onnx", example_size=segmenter_size,
                                     metadata=facts.segmenter_props(segmenter), **common)
    den_graph, denoiser_size = None, None
    if denoiser is not None:
        denoiser_size = denoiser.input_size
        if denoiser_size is None:
            raise InputError(f"denoiser {denoiser.name} does not say its input size")
        if denoiser.family == "onnx":
            den_graph = copy_onnx_model(denoiser, out / "denoiser.onnx", log)
        else:
            den_graph = export_denoiser(denoiser.module, out / "denoiser.onnx", image_size=denoiser_size,
                                        metadata=facts.denoiser_props(denoiser), **common)
    result = ExportResult(
        out_dir=out, image_size=(height, width), segmenter_size=segmenter_size, denoiser_size=denoiser_size,
        max_batch=max_batch, segmenter_graph=seg_graph, denoiser_graph=den_graph,
        models={"segmenter": None if segmenter is None else _model_record(segmenter),
                "denoiser": None if denoiser is None else _model_record(denoiser)},
        client_facts={key: None if segmenter is None else segmenter.extra.get(key) for key in ("classes", "palette")},
    )
    if tensorrt is not False:
        result.engines = _build_engines(result, required=bool(tensorrt), fp16=fp16, log=log)
    write_manifest(result, scale=scale)
    return result


def _build_engines(result: ExportResult, *, required: bool, fp16: bool, log: Log | None) -> dict[str, Any]:
    """One TensorRT plan per graph, or a clean skip (an error when ``required``)."""
    from certseg.export import tensorrt as trt_export

    builds: dict[str, Any] = {}
    for role, graph in result.graphs.items():
        shapes = {spec.name: _sample_shape(spec, result, role) for spec in graph.inputs}
        build = trt_export.build_engine(
            graph.path, graph.path.with_suffix(".plan"), input_shapes=shapes, max_batch=result.max_batch,
            fp16=fp16, fp32_sources=DENOISER_FP32_SOURCES if role == "denoiser" else (), fp16_onnx=graph.fp16_path,
            log=log,
        )
        if build.status != "built" and required:
            raise trt_export.TensorRTUnavailable(build.message)
        builds[role] = build
        if build.status == "skipped":
            _log(log, build.message)
            break
    return builds


def _sample_shape(spec: TensorSpec, result: ExportResult, role: str) -> tuple[int, ...]:
    """Per-sample shape (no batch) for an engine profile: dynamic h/w pinned to the deployment's size."""
    size = result.segmenter_size if role == "segmenter" else result.denoiser_size
    dims = list(spec.shape[1:])
    if len(dims) == 3:
        dims = [d if isinstance(d, int) else s for d, s in zip(dims, (3, *size), strict=True)]
    return tuple(int(d) for d in dims)


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(result: ExportResult, *, scale: float = 1.0) -> Path:
    """``export.json``: models and their hashes, graphs and their I/O, parity, timings, files, versions."""
    graphs = {role: graph.record() for role, graph in result.graphs.items()}
    files = [_file_record(p) for graph in result.graphs.values() for p in graph.files()]
    engines = {role: build.record() for role, build in result.engines.items()}
    files += [_file_record(Path(b.path)) for b in result.engines.values() if b.path is not None]
    record = {
        "format": "certseg-export/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image_size": list(result.image_size),
        "scale": scale,
        "segmenter_size": list(result.segmenter_size),
        "denoiser_size": None if result.denoiser_size is None else list(result.denoiser_size),
        "max_batch": result.max_batch,
        "models": result.models,
        "graphs": graphs,
        "tensorrt": engines or {"status": "off"},
        "files": files,
        "versions": versions(),
    }
    result.record = record
    result.manifest = result.out_dir / "export.json"
    result.manifest.write_text(json.dumps(record, indent=2) + "\n")
    return result.manifest
