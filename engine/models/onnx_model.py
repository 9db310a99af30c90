"""Bring-your-own ONNX models: the contract a segmenter or denoiser graph must meet, and the loaded model.

The contract is checked from the file's declared inputs and outputs (its weights are not read), so a graph
that cannot work is refused before any sample with one line naming the input or output and what was expected:

- segmenter: one input (B, 3, H, W) float32 with a dynamic batch B (H, W fixed or dynamic), one output
  (B, K, h, w) float32 class scores with a fixed K >= 2 (any h, w: the scores are resized to the image, as
  the shipped models' are). certseg resizes the [0, 1] image to (H, W) and normalises it by the file's
  ``certseg.mean`` / ``certseg.std`` / ``certseg.input_range`` (``facts.KEYS``; ImageNet on [0, 1] if absent).
- denoiser: an ε-prediction UNet with inputs x_t (B, 3, S, S) float32 and timesteps (B,) int64 (told apart
  by rank, any names, any order), output ε (B, C >= 3, S, S) float32 (channels 0-2 are ε); S fixed in the
  graph or given by ``certseg.input_size``; the schedule is ``certseg.schedule`` (linear unless it says cosine).

The file is run as given in ONNX Runtime (``OrtModule``), in-process and in the Triton repository alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certseg.engine.errors import InputError
from certseg.engine.models import facts
from certseg.engine.models.info import ONNX_FAMILY, LoadedModel, Role

Dim = int | str
"""A declared dim: a fixed size, or the name of a dynamic one ("?" when unnamed)."""


@dataclass(frozen=True)
class Port:
    """One graph input or output as the file declares it."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def shown(self) -> str:
        return "(" + ", ".join(str(d) for d in self.dims) + ")"


@dataclass(frozen=True)
class Contract:
    """A graph that meets the contract of its role: its ports in the order the pipeline feeds them, and what
    its metadata props state (``facts.props_facts``)."""

    path: Path
    role: str
    inputs: tuple[Port, ...]
    """segmenter: (images,); denoiser: (x_t, timesteps)."""
    output: Port
    facts: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.output.dims[1])

    @property
    def channels(self) -> int:
        """The denoiser's output channels C (ε is the first 3)."""
        return int(self.output.dims[1])

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) the graph must be fed: its fixed dims or ``certseg.input_size``; None if it takes any."""
        stated = self.facts.get("input_size")
        if stated is not None:
            return stated
        height, width = self.inputs[0].dims[2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def check_size(self, size: tuple[int, int], source: str) -> None:
        """Refuse feeding the graph (H, W) = ``size`` where its declared dims say it cannot take that: a fixed
        dim of another size, or H and W declared as one dynamic dim (square inputs only) with H != W."""
        port, (height, width) = self.inputs[0], size
        declared = port.dims[2:]
        if any(isinstance(d, int) and d != s for d, s in zip(declared, size, strict=True)):
            raise InputError(f"{self.path.name}: {self.role} input {port.name!r} is fixed at "
                             f"{declared[0]}x{declared[1]}, but {source} makes it {height}x{width}")
        if isinstance(declared[0], str) and declared[0] == declared[1] != "?" and height != width:
            raise InputError(
                f"{self.path.name}: {self.role} input {port.name!r} declares H and W as one dynamic dim "
                f"{declared[0]!r} (square inputs only), but {source} makes it {height}x{width}: set --seg-input-size "
                f"S S (or {facts.INPUT_SIZE})")


def read_graph(path: Path) -> tuple[list[Port], list[Port], dict[str, str]]:
    """The inputs (initializers left out), outputs and metadata props of an ONNX file, weights not loaded."""
    try:
        import onnx
    except ImportError:
        raise InputError(f"{path.name}: ONNX models need the onnx extra (pip install 'certseg[onnx]')") from None
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf decode errors have many types
        raise InputError(f"{path}: not a readable ONNX file ({type(error).__name__})") from None
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def port(value: Any) -> Port:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "not a tensor"
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        return Port(value.name, dtype, dims)

    inputs = [port(v) for v in graph.input if v.name not in initializers]
    return inputs, [port(v) for v in graph.output], {p.key: p.value for p in model.metadata_props}


def _names(ports: list[Port]) -> str:
    return ", ".join(repr(p.name) for p in ports) or "none"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _batched(where: str, kind: str, port: Port) -> None:
    _require(not isinstance(port.dims[0], int), f"{where}: {kind} {port.name!r} has a fixed batch dim "
             f"{port.dims[0]} {port.shown()}; expected a dynamic one (export with dynamic_axes={{{port.name!r}: "
             "{0: 'batch'}})")


def segmenter_contract(path: str | os.PathLike) -> Contract:
    """The segmenter contract of ``path``, or one ``InputError`` line naming what breaks it."""
    path = Path(path)
    inputs, outputs, props = read_graph(path)
    where = path.name
    _require(len(inputs) == 1, f"{where}: a segmenter takes one input (B, 3, H, W) float32; this graph takes "
             f"{len(inputs)} ({_names(inputs)})")
    _require(len(outputs) == 1, f"{where}: a segmenter has one output, class scores (B, K, h, w) float32; this "
             f"graph has {len(outputs)} ({_names(outputs)})")
    image, scores = inputs[0], outputs[0]
    _require(len(image.dims) == 4, f"{where}: segmenter input {image.name!r} has rank {len(image.dims)} "
             f"{image.shown()}; expected (B, 3, H, W)")
    _require(image.dtype == "float32", f"{where}: segmenter input {image.name!r} is {image.dtype}; expected "
             "float32 (B, 3, H, W)")
    _batched(where, "segmenter input", image)
    _require(not isinstance(image.dims[1], int) or image.dims[1] == 3, f"{where}: segmenter input {image.name!r} "
             f"has {image.dims[1]} channels (dim 1 of {image.shown()}); expected 3: (B, 3, H, W) RGB")
    _require(len(scores.dims) == 4, f"{where}: segmenter output {scores.name!r} has rank {len(scores.dims)} "
             f"{scores.shown()}; expected class scores (B, K, h, w)")
    _require(scores.dtype == "float32", f"{where}: segmenter output {scores.name!r} is {scores.dtype}; expected "
             "float32 class scores (B, K, h, w), not labels (certseg takes the argmax itself)")
    _batched(where, "segmenter output", scores)
    classes = scores.dims[1]
    _require(isinstance(classes, int), f"{where}: segmenter output {scores.name!r} has a dynamic class dim "
             f"{classes!r} {scores.shown()}; expected a fixed K (dim 1)")
    _require(classes >= 2, f"{where}: segmenter output {scores.name!r} has K = {classes} {scores.shown()}; expected "
             "K >= 2 class scores (a two-class model needs 2 channels, not one logit)")  # type: ignore[operator]
    stated = facts.props_facts(props, "segmenter", where)
    contract = Contract(path, "segmenter", (image,), scores, stated)
    if "input_size" in stated:
        contract.check_size(stated["input_size"], f"{facts.INPUT_SIZE} {list(stated['input_size'])}")
    facts.check_classes(stated.get("classes"), stated.get("palette"), contract.num_classes,
                        f"{where}: {facts.CLASSES}/{facts.PALETTE}")
    return contract


def denoiser_contract(path: str | os.PathLike) -> Contract:
    """The denoiser contract of ``path``, or one ``InputError`` line naming what breaks it."""
    path = Path(path)
    inputs, outputs, props = read_graph(path)
    where = path.name
    expected = "x_t (B, 3, S, S) float32 and timesteps (B,) int64"
    _require(len(inputs) == 2, f"{where}: a denoiser takes two inputs, {expected}; this graph takes {len(inputs)} "
             f"({_names(inputs)})")
    by_rank = {len(p.dims): p for p in inputs}
    _require(set(by_rank) == {4, 1}, f"{where}: denoiser inputs {_names(inputs)} have shapes "
             f"{' and '.join(p.shown() for p in inputs)}; expected {expected}")
    x_t, timesteps = by_rank[4], by_rank[1]
    _require(x_t.dtype == "float32", f"{where}: denoiser input {x_t.name!r} is {x_t.dtype}; expected float32 x_t "
             "(B, 3, S, S)")
    _require(timesteps.dtype == "int64", f"{where}: denoiser input {timesteps.name!r} is {timesteps.dtype}; "
             "expected int64 timesteps (B,)")
    _batched(where, "denoiser input", x_t)
    _batched(where, "denoiser input", timesteps)
    _require(not isinstance(x_t.dims[1], int) or x_t.dims[1] == 3, f"{where}: denoiser input {x_t.name!r} has "
             f"{x_t.dims[1]} channels {x_t.shown()}; expected x_t (B, 3, S, S)")
    _require(len(outputs) == 1, f"{where}: a denoiser has one output, eps (B, C >= 3, S, S) float32; this graph has "
             f"{len(outputs)} ({_names(outputs)})")
    eps = outputs[0]
    _require(len(eps.dims) == 4 and eps.dtype == "float32", f"{where}: denoiser output {eps.name!r} is "
             f"{eps.dtype} {eps.shown()}; expected float32 eps (B, C >= 3, S, S)")
    _batched(where, "denoiser output", eps)
    _require(isinstance(eps.dims[1], int) and eps.dims[1] >= 3, f"{where}: denoiser output {eps.name!r} has "
             f"{eps.dims[1]} channels {eps.shown()}; expected a fixed C >= 3 (channels 0-2 are eps)")
    stated = facts.props_facts(props, "denoiser", where)
    contract = Contract(path, "denoiser", (x_t, timesteps), eps, stated)
    size = contract.input_size
    if size is None:
        raise InputError(f"{where}: denoiser input {x_t.name!r} {x_t.shown()} has dynamic spatial dims; expected "
                         f"a fixed S x S, or the metadata prop {facts.INPUT_SIZE}")
    _require(size[0] == size[1], f"{where}: denoiser input {x_t.name!r} {x_t.shown()} is not square; expected "
             "x_t (B, 3, S, S)")
    contract.check_size(size, f"{facts.INPUT_SIZE} {size[0]}")
    fixed = [d for d in eps.dims[2:] if isinstance(d, int)]
    _require(all(d == size[0] for d in fixed), f"{where}: denoiser output {eps.name!r} {eps.shown()} is not S x S "
             f"= {size[0]}x{size[0]} like its input")
    return contract


def contract(path: str | os.PathLike, role: str) -> Contract:
    return segmenter_contract(path) if role == "segmenter" else denoiser_contract(path)


def load_onnx_model(path: Path, name: str, role: Role) -> LoadedModel:
    """A ``LoadedModel`` (family "onnx") running ``path`` as given in ONNX Runtime, after its contract holds.

    Its identity is the file's sha256; K, the input size and what it states (classes, palette, normalisation,
    schedule) come from the graph and its metadata props. The contract travels as ``module.contract``.
    """
    from certseg.engine.digest import file_sha256
    from certseg.engine.models.ort_module import OrtModule

    checked = contract(path, role)
    stated = checked.facts
    module = OrtModule(path, input_order=[p.name for p in checked.inputs])
    module.contract = checked
    segmenter = role == "segmenter"
    return LoadedModel(
        module=module.eval(), name=stated.get("name") or name, family=ONNX_FAMILY, role=role, source=str(path),
        sha256=file_sha256(path), num_classes=checked.num_classes if segmenter else None,
        input_size=checked.input_size, classes=stated.get("classes"), palette=stated.get("palette"),
        normalization=stated.get("normalization") if segmenter else None,
        schedule=None if segmenter else stated.get("schedule"),
    )
