"""``ExportResult``: what ``export_models`` wrote (graphs, TensorRT plans, ``export.json``) and what it serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certseg.export.exported_graph import ExportedGraph
from certseg.export.model_files import ModelFiles, RepositoryError


@dataclass
class ExportResult:
    """What ``export_models`` wrote: graphs, engines and the ``export.json`` record."""

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

    def plan(self, role: str) -> Path | None:
        """The TensorRT plan built for ``role``, or None (not asked for, skipped or failed)."""
        build = self.engines.get(role)
        return build.path if build is not None and build.status == "built" else None

    def client_metadata(self) -> dict[str, Any]:
        """JSON-ready facts for clients: class names and palette (when the checkpoint has them), model records,
        the served image size."""
        facts = {key: value for key, value in self.client_facts.items() if value is not None}
        return facts | {
            "segmenter": self.models.get("segmenter"),
            **({"denoiser": self.models["denoiser"]} if self.models.get("denoiser") else {}),
            "image_size": list(self.image_size),
            "segmenter_size": list(self.segmenter_size),
        }

    def model_files(self) -> ModelFiles:
        """The files a Triton repository serves from this export (a repository needs the segmenter)."""
        segmenter, denoiser = self.segmenter_graph, self.denoiser_graph
        if segmenter is None:
            raise RepositoryError(f"{self.out_dir} holds no segmenter graph, which a repository needs")
        return ModelFiles(
            segmenter=segmenter.path, segmenter_fp16=segmenter.fp16_path, segmenter_plan=self.plan("segmenter"),
            denoiser=None if denoiser is None else denoiser.path,
            denoiser_fp16=None if denoiser is None else denoiser.fp16_path, denoiser_plan=self.plan("denoiser"),
            metadata=self.client_metadata(),
        )
