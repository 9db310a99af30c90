"""Int8 variants of exported graphs: ONNX Runtime static quantisation (QDQ, per-channel int8 weights, uint8
activations calibrated on the run's own kind of inputs), for ``--precision int8`` on the in-process ONNX runtime.

Why static QDQ: ORT fuses QuantizeLinear → Conv → DequantizeLinear into integer kernels (VNNI on AVX-512 CPUs),
and the scales are fixed in the file, so the graph is a deterministic classifier the certificate is about. Only
the listed compute ops are quantised; the rest (resizes, norms, the timestep embedding's sin/cos) stays fp32,
and the graph's inputs and outputs stay float32, so the pipeline around it (and its non-finite checks) is
unchanged. The certificate maths only ever sees the labels the scores' argmax gives.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certseg.export.calibration import Feeds
from certseg.export.onnx_files import require_onnx

INTEGER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger",
                         "QLinearMatMul"})
"""Op types that show a graph computes in integers (QDQ graphs hold the first two around each quantised op)."""


@dataclass(frozen=True)
class QuantRecipe:
    """How a graph is quantised; recorded with every int8 certificate and part of the cache key."""

    format: str = "QDQ"
    per_channel: bool = True
    activations: str = "QUInt8"
    weights: str = "QInt8"
    calibration: str = "MinMax"
    op_types: tuple[str, ...] = ("Conv",)
    """Only these ops are quantised (measured: see the README's int8 table)."""
    fp32_first: int = 0
    fp32_last: int = 0
    """The first / last this many of those ops (in graph order) stay fp32: the input's and the output's layers,
    where rounding costs the most agreement."""
    extra_options: tuple[tuple[str, Any], ...] = field(default=())

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"op_types": list(self.op_types), "extra_options": dict(self.extra_options)}


SEGMENTER_RECIPE = QuantRecipe(calibration="Percentile", fp32_first=1, fp32_last=1)
"""Measured on the shipped HRNet (argmax agreement with the fp32 graph, noisy held-out inputs, σ = 0.25):
all Conv MinMax 99.41%, first/last Conv fp32 99.60%, + Percentile 99.66%; quantising Add/Relu/Resize/Concat
too changed little (99.66%)."""
DENOISER_RECIPE = QuantRecipe(fp32_first=1, fp32_last=1)
"""Measured on the shipped ADM (mean |Δε| against the fp32 graph): all Conv 0.027, Percentile 0.024, first/last
Conv fp32 0.020."""


def _reader(feeds: Feeds) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds, one batch per ``get_next``
    (onnxruntime is imported only here, on the int8 path)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return FeedReader()


def quantize_graph(src: Path, dst: Path, feeds: Feeds, recipe: QuantRecipe) -> dict[str, Any]:
    """Write the int8 graph of ``src`` to ``dst``, calibrated on ``feeds``; returns what to record of it
    (recipe, seconds, how many ops became integer)."""
    require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise ValueError(f"no calibration inputs for {src.name}")

    started = time.perf_counter()
    kept = kept_fp32(src, recipe)
    with _quiet():
        quantize_static(
            str(src), str(dst), _reader(feeds), quant_format=QuantFormat[recipe.format], nodes_to_exclude=kept,
            op_types_to_quantize=list(recipe.op_types), per_channel=recipe.per_channel,
            activation_type=QuantType[recipe.activations], weight_type=QuantType[recipe.weights],
            calibrate_method=CalibrationMethod[recipe.calibration], extra_options=dict(recipe.extra_options),
        )
    return {"file": dst.name, "recipe": recipe.record(), "kept_fp32": kept, "calibration_batches": len(feeds),
            "integer_ops": integer_op_counts(dst), "seconds": time.perf_counter() - started}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantiser prints its histogram progress and logs a pre-processing hint on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def kept_fp32(path: Path, recipe: QuantRecipe) -> list[str]:
    """The names of the nodes ``recipe`` keeps fp32: the first ``fp32_first`` and last ``fp32_last`` of its op
    types, in graph order (the exporter writes nodes in execution order)."""
    onnx = require_onnx()
    nodes = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in recipe.op_types]
    last = nodes[len(nodes) - recipe.fp32_last:] if recipe.fp32_last else []
    return nodes[:recipe.fp32_first] + [name for name in last if name not in nodes[:recipe.fp32_first]]


def integer_op_counts(path: Path, *, ops: Sequence[str] = tuple(sorted(INTEGER_OPS))) -> dict[str, int]:
    """How many nodes of each integer op type the graph at ``path`` holds (0 for all: not quantised)."""
    onnx = require_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = [node.op_type for node in graph.node]
    return {op: kinds.count(op) for op in ops if op in kinds}
