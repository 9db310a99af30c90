"""``export_int8``: int8 graphs of an fp32 export folder for one run's pipeline, and ``int8.json``, their record.

The record says, per role, which file runs (an int8 graph, or the fp32 graph where that role is kept fp32), the
quantisation recipe, the calibration set and the onnxruntime that quantised it; the ONNX backend reads it back
(``certseg.engine.runtimes.onnx_runtime.int8_paths``) and every int8 certificate's JSON carries it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certseg.engine.digest import file_sha256
from certseg.engine.maths.label_pipeline import PipelineSpec
from certseg.engine.runtimes.onnx_runtime import export_paths
from certseg.engine.versions import package_versions
from certseg.export.calibration import CalibrationRecipe, calibration_feeds
from certseg.export.denoiser import DENOISER_INPUTS
from certseg.export.int8 import DENOISER_RECIPE, SEGMENTER_RECIPE, quantize_graph
from certseg.export.segmenter import SEGMENTER_INPUTS

if TYPE_CHECKING:
    from certseg.engine.models.registry import LoadedModel

INT8_MANIFEST = "int8.json"
QUANTIZED_ROLES: frozenset[str] = frozenset({"segmenter", "denoiser"})
"""The roles quantised: both. Measured (DenoiseCertify, 4 held-out scenes, σ = 0.25): the segmenter alone agrees
with fp32 on 99.6% of pixels at no speed-up (the denoiser is most of the time), both on 99.4% at 2.5x."""
RECIPES = {"segmenter": SEGMENTER_RECIPE, "denoiser": DENOISER_RECIPE}


def export_int8(
    fp32_folder: Path, out: Path, spec: PipelineSpec, segmenter: LoadedModel, denoiser: LoadedModel | None,
    *, calibration: CalibrationRecipe, roles: Collection[str] = QUANTIZED_ROLES,
) -> dict[str, Any]:
    """Quantise the ``roles`` graphs of ``fp32_folder`` (exported from exactly ``segmenter`` / ``denoiser``) into
    ``out``, calibrated on what those models see in ``spec``'s pipeline; writes and returns ``int8.json``."""
    models = {"segmenter": segmenter, "denoiser": denoiser}
    expected = {role: m.sha256 for role, m in models.items() if m is not None}
    fp32 = export_paths(fp32_folder, expected_sha256=expected)
    feeds = calibration_feeds(spec, segmenter.module, None if denoiser is None else denoiser.module, calibration,
                              input_names={"segmenter": SEGMENTER_INPUTS, "denoiser": DENOISER_INPUTS})
    out.mkdir(parents=True, exist_ok=True)
    graphs: dict[str, Any] = {}
    for role, source in fp32.items():
        if source is None or role not in feeds:
            continue
        if role in roles:
            graphs[role] = quantize_graph(source, out / f"{role}.int8.onnx", feeds[role], RECIPES[role])
        else:
            graphs[role] = {"file": None, "fp32_file": str(source), "recipe": None}
        graphs[role]["source_sha256"] = file_sha256(source)
    record = {
        "format": "certseg-int8/1",
        "precision": "int8",
        "models": {role: {"name": m.name, "sha256": m.sha256} for role, m in models.items() if m is not None},
        "graphs": graphs,
        "calibration": calibration.record() | {"sigma": spec.sigma,
                                               "timestep": None if spec.timestep is None else spec.timestep.t,
                                               "image_size": list(spec.image_size)},
        "versions": package_versions(("onnxruntime", "onnx", "torch")),
    }
    (out / INT8_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record
