"""FP16 variants (``*.fp16.onnx``) of exported graphs, with float32 I/O and float32 islands where fp16 hurts.

onnxruntime's converter with ``keep_io_types``. The sinusoidal timestep embedding (t·f, sin, cos: the
weight-free nodes computed from ``timesteps``) stays float32: in fp16, t·f near t = 999 is rounded by up to
0.25 rad before the sin/cos.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from certseg.export.exported_graph import ExportedGraph
from certseg.export.graph_surgery import drop_cast_round_trips, fp32_island, name_nodes
from certseg.export.onnx_files import EXTERNAL_DATA_THRESHOLD, require_onnx, save_model
from certseg.export.progress import Log, note

DENOISER_FP32_SOURCES: tuple[str, ...] = ("timesteps",)
"""FP16 denoiser: the weight-free nodes computed from ``timesteps`` stay fp32. Measured on the golden ADM
(fp16 vs fp32 ε, mean |Δ| ×1e4 for t = 1…999): flat ~1.0 with it, growing 1.0 → 12.3 without it."""
SEGMENTER_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
"""FP16 segmenters keep these ops fp32 (HRNet has none). On the small ViT-Adapter it halves the mean error
and lifts argmax agreement from 0.9938 to 0.9995 on one input set. Keeping the denoiser's GroupNorm
(InstanceNormalization) fp32 made it worse (max |Δ| 1.2e-3 vs 7e-4): the extra casts cost more than they save."""


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
    onnx = require_onnx()
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    dst = dst or fp16_path_for(src)
    model = onnx.load(str(src), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    load_external_data_for_model(model, str(src.parent))
    name_nodes(model)
    island = fp32_island(model, fp32_sources) if fp32_sources else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=True, node_block_list=island,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list),
        )
    drop_cast_round_trips(converted)
    save_model(converted, dst, external_data_threshold=external_data_threshold)
    return dst


def add_fp16_variant(
    graph: ExportedGraph, fp32_sources: Sequence[str], fp32_ops: Sequence[str], threshold: int, log: Log | None,
) -> None:
    """Write ``graph``'s fp16 file beside it and record it (path, what stayed fp32, seconds) in ``graph``."""
    started = time.perf_counter()
    graph.fp16_path = convert_to_fp16(graph.path, fp32_sources=fp32_sources, op_block_list=fp32_ops,
                                      external_data_threshold=threshold)
    graph.fp32_in_fp16 = {"sources": list(fp32_sources), "ops": list(fp32_ops)}
    graph.seconds["fp16"] = time.perf_counter() - started
    note(log, f"{graph.role}: wrote {graph.fp16_path.name} in {graph.seconds['fp16']:.1f} s")
