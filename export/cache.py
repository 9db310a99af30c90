"""Exports of exact weights for the in-process ONNX runtime, made once and kept in certseg's cache.

``certseg certify --runtime onnx`` with a torch checkpoint runs graphs exported from exactly its weights;
the ONNX backend (``certseg.engine.runtimes.backends``) asks for them here (the one place the engine reaches into
``certseg.export``, lazily, only on that path)
and reads them with ``certseg.engine.runtimes.onnx_runtime.export_paths``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from certseg.engine.cache import cached_folder
from certseg.engine.models import facts
from certseg.engine.versions import package_versions
from certseg.export.models import EXPORT_FORMAT_VERSION, export_models

if TYPE_CHECKING:
    from certseg.engine.maths.label_pipeline import PipelineSpec
    from certseg.engine.models.registry import LoadedModel

INT8_FORMAT_VERSION = 1
"""Bump when int8 graphs change for the same fp32 graphs, recipe and onnxruntime (cached int8 exports are keyed
by it)."""


def cached_export(
    segmenter: LoadedModel | None, denoiser: LoadedModel | None, image_size: tuple[int, int], *, scale: float,
    fp16: bool,
) -> Path:
    """An ONNX export of these exact weights for this deployment size, made once and kept in the cache
    (``segmenter`` None: the denoiser alone, beside a segmenter that is an ONNX file already).

    Keyed by the checkpoints' sha256s, the sizes, what the graphs state (``facts``) and the export code's
    version, so different weights never share graphs (``onnx_runtime_from_export`` checks the hashes again
    when it loads them). Staging folders left by killed exports are removed before a new export starts.
    """
    parts = [EXPORT_FORMAT_VERSION, None if segmenter is None else segmenter.sha256,
             None if denoiser is None else denoiser.sha256, list(image_size), scale, fp16,
             None if segmenter is None else facts.segmenter_props(segmenter),  # input size, what the graph states
             None if denoiser is None else facts.denoiser_props(denoiser)]

    def build(staging: Path) -> None:
        export_models(segmenter, denoiser, staging, image_size=image_size, scale=scale, fp16=fp16, tensorrt=False)

    return cached_folder("onnx", parts, build, complete="export.json")


def cached_int8_export(segmenter: LoadedModel, denoiser: LoadedModel | None, spec: PipelineSpec) -> Path:
    """Int8 graphs for the run ``spec`` describes (``certseg.export.int8_export``), made once and kept in the cache.

    Keyed by the fp32 export's key (the checkpoints' sha256s, sizes, what the graphs state), the pipeline spec
    (σ, t*, sizes, normalisation: what the calibration inputs are), the quantisation and calibration recipes, the
    roles quantised and onnxruntime's version (its quantiser decides the graph).
    """
    from certseg.export.calibration import CalibrationRecipe
    from certseg.export.int8_export import INT8_MANIFEST, QUANTIZED_ROLES, RECIPES, export_int8

    fp32 = cached_export(segmenter, denoiser, spec.image_size, scale=spec.scale, fp16=False)
    calibration = CalibrationRecipe()
    parts = [INT8_FORMAT_VERSION, fp32.name, spec.record(), calibration.record(),
             {role: recipe.record() for role, recipe in RECIPES.items()}, sorted(QUANTIZED_ROLES),
             package_versions(("onnxruntime",))["onnxruntime"]]

    def build(staging: Path) -> None:
        export_int8(fp32, staging, spec, segmenter, denoiser, calibration=calibration)

    return cached_folder("onnx-int8", parts, build, complete=INT8_MANIFEST)
