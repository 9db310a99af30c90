"""A bring-your-own ONNX model into an export folder: copied byte for byte, never re-exported.

Its sha256 stays the model's, and its external-data files travel under the names its graph refers to. No fp16
variant and no parity: there is no torch model to compare with.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from certseg.engine.errors import InputError
from certseg.export.exported_graph import ExportedGraph
from certseg.export.onnx_files import external_data_files, graph_io, graph_opset
from certseg.export.progress import Log, note

if TYPE_CHECKING:
    from certseg.engine.models.registry import LoadedModel


def copy_onnx_model(model: LoadedModel, path: Path, log: Log | None = None) -> ExportedGraph:
    """Copy ``model``'s ONNX file to ``path`` (and its side files beside it); the graph record of the copy."""
    source = Path(model.source)
    started = time.perf_counter()
    copied = []
    for side in external_data_files(source):
        target = path.parent / side.name
        if target.exists() and target.read_bytes() != side.read_bytes():
            raise InputError(f"{source.name} keeps its weights in {side.name}, and another model's {target} has "
                             "that name: rename one of them")
        shutil.copyfile(side, target)
        copied.append(target)
    shutil.copyfile(source, path)
    inputs, outputs = graph_io(path)
    image_dims = inputs[0].shape[2:]
    graph = ExportedGraph(
        role=model.role, path=path, inputs=inputs, outputs=outputs, opset=graph_opset(path), exporter="as given",
        external_data=bool(copied), dynamic_size=not all(isinstance(d, int) for d in image_dims),
        example_size=model.input_size or (0, 0), side_files=tuple(copied),
        seconds={"export": time.perf_counter() - started},
        notes=[f"bring-your-own ONNX file {source.name}, copied unchanged (no fp16 variant, no parity: there is no "
               "torch model to compare with)"],
    )
    note(log, f"{model.role}: copied {source.name} unchanged to {path.name}")
    return graph
