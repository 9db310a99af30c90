"""ONNX Runtime: the exported graphs as drop-in torch modules, so ``LabelPipeline`` runs unchanged on ORT.

Only the two models move to ONNX Runtime; the stage maths around them (scale, x̂0, resizes, argmax) stays
the torch code of ``certseg.engine.maths.stages`` / ``denoise``, so the ORT runtime cannot drift from the torch one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.errors import InputError
from certseg.engine.maths.label_pipeline import LabelPipeline, PipelineSpec
from certseg.engine.models.ort_module import OrtModule


def ort_label_pipeline(
    spec: PipelineSpec,
    segmenter_onnx: str | os.PathLike,
    denoiser_onnx: str | os.PathLike | None = None,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> LabelPipeline:
    """The torch ``LabelPipeline`` of ``spec`` with both models replaced by ONNX Runtime sessions."""
    denoiser = None
    if spec.method == "denoisecertify":
        if denoiser_onnx is None:
            raise InputError("denoisecertify needs the denoiser's ONNX file")
        denoiser = OrtModule(denoiser_onnx, providers, threads)
    return LabelPipeline(spec, OrtModule(segmenter_onnx, providers, threads), denoiser).eval()


def onnx_runtime(
    pipeline_spec: PipelineSpec,
    segmenter_onnx: str | os.PathLike,
    denoiser_onnx: str | os.PathLike | None = None,
    *,
    batch_size: int = 16,
    noise_backend: str = "numpy-philox",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> LocalRuntime:
    """The sampling contract on ONNX Runtime: noise and stage maths in torch (CPU), models in ORT."""
    pipeline = ort_label_pipeline(pipeline_spec, segmenter_onnx, denoiser_onnx, providers=providers, threads=threads)
    return LocalRuntime(pipeline, batch_size=batch_size, device="cpu", noise_backend=noise_backend)


def onnx_runtime_from_export(
    pipeline_spec: PipelineSpec,
    export_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    expected_sha256: Mapping[str, str] | None = None,
    batch_size: int = 16,
    noise_backend: str = "numpy-philox",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> LocalRuntime:
    """``onnx_runtime`` on the files of a ``certseg-export`` folder (its ``export.json`` names them).

    ``precision`` "fp16" picks the ``*.fp16.onnx`` graphs. ``expected_sha256`` (role → checkpoint sha256, e.g.
    from ``LoadedModel.sha256``) refuses graphs exported from other weights.
    """
    paths = export_paths(export_dir, precision=precision, expected_sha256=expected_sha256)
    if paths["segmenter"] is None:
        raise InputError(f"{Path(export_dir) / 'export.json'} has no segmenter graph")
    return onnx_runtime(pipeline_spec, paths["segmenter"], paths["denoiser"], batch_size=batch_size,
                        noise_backend=noise_backend, providers=providers, threads=threads)


def export_paths(
    export_dir: str | os.PathLike, *, precision: str = "fp32", expected_sha256: Mapping[str, str] | None = None
) -> dict[str, Path | None]:
    """role → the ``precision`` graph of a ``certseg-export`` folder (None where it has none), after checking
    that each role in ``expected_sha256`` was exported from those weights."""
    folder = Path(export_dir)
    manifest = folder / "export.json"
    record = _read_manifest(manifest, "run certseg-export first")
    if precision not in ("fp32", "fp16"):
        raise InputError(f"ONNX precision must be fp32 or fp16, got {precision!r}")
    _check_made_from(manifest, record, "exported", expected_sha256)
    paths: dict[str, Path | None] = {}
    for role in ("segmenter", "denoiser"):
        graph = record.get("graphs", {}).get(role)
        name = None if graph is None else graph["fp16_file" if precision == "fp16" else "file"]
        if graph is not None and name is None:
            raise InputError(f"{manifest} has no {precision} {role} graph (export without --no-fp16)")
        paths[role] = None if name is None else folder / name
    return paths


def _read_manifest(manifest: Path, missing: str) -> dict:
    """An export folder's manifest (``export.json`` / ``int8.json``); ``missing`` says what its absence means."""
    if not manifest.is_file():
        raise InputError(f"{manifest.parent} has no {manifest.name}: {missing}")
    return json.loads(manifest.read_text())


def _check_made_from(manifest: Path, record: dict, made: str, expected_sha256: Mapping[str, str] | None) -> None:
    """Refuses a manifest whose roles were not ``made`` (exported, quantised) from ``expected_sha256``'s weights."""
    for role, digest in (expected_sha256 or {}).items():
        found = (record.get("models", {}).get(role) or {}).get("sha256")
        if found != digest:
            raise InputError(f"{manifest} holds a {role} {made} from other weights (sha256 {found})")


def int8_paths(
    int8_dir: str | os.PathLike, *, expected_sha256: Mapping[str, str] | None = None
) -> tuple[dict[str, Path | None], dict]:
    """role → the graph an int8 run uses (the int8 graph, or the fp32 graph of a role kept fp32), and the folder's
    ``int8.json`` record (recipe, calibration set, versions), after checking that each role in ``expected_sha256``
    was quantised from those weights."""
    folder = Path(int8_dir)
    manifest = folder / "int8.json"
    record = _read_manifest(manifest, "not an int8 export")
    _check_made_from(manifest, record, "quantised", expected_sha256)
    paths: dict[str, Path | None] = {}
    for role in ("segmenter", "denoiser"):
        graph = record.get("graphs", {}).get(role)
        paths[role] = None if graph is None else (
            folder / graph["file"] if graph.get("file") else Path(graph["fp32_file"]))
    return paths, record
