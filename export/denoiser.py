"""The denoiser graph: ``x_t`` float32 (B, 3, S, S), ``timesteps`` int64 (B,) → ``eps`` float32 (B, 3, S, S).

Only ε (channels 0-2) leaves the graph: the certifier uses nothing else, and it halves the transfer. The batch
is dynamic; S is the UNet's native size.
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
from certseg.export.fp16 import DENOISER_FP32_SOURCES, add_fp16_variant
from certseg.export.onnx_files import EXTERNAL_DATA_THRESHOLD, graph_io
from certseg.export.parity import PARITY_BATCHES, denoiser_parity_inputs, measure_parity
from certseg.export.progress import Log, note
from certseg.export.trace import DEFAULT_OPSET, export_graph

DENOISER_INPUTS = ("x_t", "timesteps")
DENOISER_OUTPUTS = ("eps",)


class EpsOnly(nn.Module):
    """The UNet with ε (output channels 0-2) only; a learn_sigma model's variance channels are dropped."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, timesteps)[:, :3]


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
    note(log, f"denoiser: wrote {path.name}{' (+ .data)' if external else ''} with the {exporter} exporter "
              f"in {graph.seconds['export']:.1f} s")
    if fp16:
        add_fp16_variant(graph, DENOISER_FP32_SOURCES, (), external_data_threshold, log)
    if parity_batches:
        measure_parity(graph, wrapped, [denoiser_parity_inputs(size, b) for b in parity_batches], threads=threads,
                       log=log)
    return graph
