"""``export.json``: the record of one export folder (models and hashes, graphs and I/O, parity, files, versions).

``certseg.engine.runtimes.onnx_runtime.export_paths`` reads it back to find the graphs of a role and precision.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from certseg.engine.digest import file_sha256
from certseg.engine.versions import package_versions
from certseg.export.result import ExportResult


def versions() -> dict[str, str | None]:
    """Versions of everything that shapes the exported files (None where a package is not installed)."""
    return package_versions(("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "certseg"))


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(result: ExportResult, *, scale: float = 1.0) -> Path:
    """Write ``export.json`` into the export folder and keep its record (and path) in ``result``."""
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
