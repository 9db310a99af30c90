"""``ExportedGraph``: what one exported (or copied) ONNX model is, which files hold it, and how it was made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certseg.export.onnx_files import TensorSpec


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
