"""Reading and writing ONNX files: declared inputs and outputs, external weight data, the onnx extra itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certseg.engine.errors import CertsegError

if TYPE_CHECKING:
    import onnx

EXTERNAL_DATA_THRESHOLD = 2_000_000_000
"""Weights above this many bytes go to ``<file>.data``: protobuf cannot serialise a model of 2 GiB or more."""


def require_onnx():
    """The ``onnx`` package, or a one-line error naming the extra that provides it."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise CertsegError(f"ONNX export needs the onnx extra (pip install 'certseg[onnx]'): {error}") from None
    return onnx


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the file declares it (dynamic dims are named strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


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
    onnx = require_onnx()
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


def declare_shape(value: Any, shape: Sequence[int | str]) -> None:
    """Overwrite the declared shape of a graph input or output (ints fixed, strings named dynamic dims)."""
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
    onnx = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorSpec(value.name, dtype, tuple(_dim(d) for d in tensor.shape.dim))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    return inputs, tuple(spec(v) for v in model.graph.output)


def graph_opset(path: Path) -> int:
    """The default-domain opset a file imports (0 when it names none)."""
    onnx = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def external_data_files(path: Path) -> list[Path]:
    """The side files an ONNX file keeps its weights in (relative to its folder), by the names it uses."""
    onnx = require_onnx()
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return [path.parent / name for name in sorted(names)]
