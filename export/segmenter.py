"""The segmenter graph: ``images`` float32 (B, 3, h, w), normalised as the model states → ``logits`` float32
(B, K, h', w'). For ViT-Adapter these are class scores, not logits; only the argmax is used.

The batch is always dynamic. HRNet keeps h/w dynamic too when a probe at a second size matches torch; models
with a fixed crop (ViT-Adapter: a slide over windows whose count depends on the size) are exported at the
deployment size.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from certseg.engine.choices import Exporter
from certseg.engine.maths.stages import as_pair
from certseg.export.exported_graph import ExportedGraph
from certseg.export.fp16 import SEGMENTER_FP32_OPS, add_fp16_variant
from certseg.export.onnx_files import EXTERNAL_DATA_THRESHOLD, graph_io
from certseg.export.parity import PARITY_BATCHES, measure_parity, segmenter_parity_inputs, size_probe_failure
from certseg.export.progress import Log, note
from certseg.export.trace import DEFAULT_OPSET, export_graph

SEGMENTER_INPUTS = ("images",)
SEGMENTER_OUTPUTS = ("logits",)


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
        problem = size_probe_failure(module, path, size, threads)
        if problem is not None:
            notes.append(f"fixed size: the dynamic-size graph failed at another size ({problem})")
            note(log, f"segmenter: {notes[-1]}; re-exporting at {size[0]}x{size[1]}")
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
    note(log, f"segmenter: wrote {path.name} ({shape} input) with the {exporter} exporter "
              f"in {graph.seconds['export']:.1f} s")
    if fp16:
        add_fp16_variant(graph, (), SEGMENTER_FP32_OPS, external_data_threshold, log)
    if parity_batches:
        measure_parity(graph, module, [(segmenter_parity_inputs(size, b),) for b in parity_batches],
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
