"""``export_models``: a deployment's segmenter (and denoiser) into one folder, ready to serve.

Graphs (their names are the contract the runtimes and the Triton repository rely on) come from
``certseg.export.segmenter`` / ``denoiser``; each carries certseg's metadata props
(``certseg.engine.models.facts.KEYS``: the segmenter's normalisation, classes and palette, the denoiser's
schedule), so the file alone says how to run it. A bring-your-own ONNX model (``LoadedModel`` of family "onnx")
is copied unchanged. Then TensorRT plans where TensorRT is installed, and ``export.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certseg.engine.choices import Exporter
from certseg.engine.errors import InputError
from certseg.engine.maths.stages import as_pair, scaled_size
from certseg.engine.models import facts
from certseg.export.denoiser import export_denoiser
from certseg.export.fp16 import DENOISER_FP32_SOURCES
from certseg.export.manifest import write_manifest
from certseg.export.onnx_copy import copy_onnx_model
from certseg.export.onnx_files import EXTERNAL_DATA_THRESHOLD, TensorSpec
from certseg.export.parity import PARITY_BATCHES
from certseg.export.progress import Log, note
from certseg.export.result import ExportResult
from certseg.export.segmenter import export_segmenter
from certseg.export.tensorrt import TensorRTUnavailable, build_engine
from certseg.export.trace import DEFAULT_OPSET

if TYPE_CHECKING:
    from certseg.engine.models.registry import LoadedModel

EXPORT_FORMAT_VERSION = 2
"""Bump when exported graphs change for the same weights (cached exports are keyed by it). 2: metadata props."""


def default_image_size(segmenter_name: str, fixed: tuple[int, int] | None = None) -> tuple[int, int]:
    """The scene size a shipped segmenter was trained at, or the ``fixed`` input size a segmenter states; other
    models need an explicit image size (``certseg-export --image-size``)."""
    from certseg.engine.models.registry import shipped_models

    if fixed is not None:
        return fixed
    size = shipped_models().get(segmenter_name, {}).get("training", {}).get("scene_size")
    if not size:
        raise InputError(f"pass --image-size H W: the image size that {segmenter_name} will serve is not known")
    return int(size[0]), int(size[1])


def model_record(model: LoadedModel) -> dict[str, Any]:
    """What clients record about an exported model, including how the pipeline must run it (the repository
    writer renders the segmenter's normalisation and the denoiser's schedule from here)."""
    record = model.record() | {"num_classes": model.num_classes, "input_size": model.input_size}
    if model.role == "segmenter":
        record["normalization"] = facts.normalization_record(facts.normalization(model))
    else:
        record["schedule"] = facts.schedule(model).record()
    return record


def export_models(
    segmenter: LoadedModel | None,
    denoiser: LoadedModel | None,
    out_dir: str | Path,
    *,
    image_size: Sequence[int],
    max_batch: int = 16,
    fp16: bool = True,
    tensorrt: bool | None = None,
    scale: float = 1.0,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter | str = Exporter.legacy,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    threads: int | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export the segmenter (and the denoiser) for a deployment serving ``image_size`` (H, W) images.

    Writes ``segmenter.onnx``, ``denoiser.onnx`` (+ ``.data`` above the threshold), their ``.fp16.onnx``
    variants, TensorRT plans when ``tensorrt`` (None: when TensorRT imports; True: required), and
    ``export.json``. The segmenter is traced at round(scale · image_size) (or the fixed input size it states),
    the denoiser at its native size. Each graph carries certseg's metadata props. An ONNX model (family "onnx")
    is copied unchanged instead. ``segmenter`` None exports the denoiser alone.
    """
    if max_batch < 1:
        raise InputError(f"max batch must be >= 1, got {max_batch}")
    height, width = as_pair(image_size)
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {height}x{width}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = None if segmenter is None else segmenter.input_size
    segmenter_size = scaled_size(height, width, scale) if fixed is None else fixed
    common = dict(opset=opset, fp16=fp16, exporter=exporter, external_data_threshold=external_data_threshold,
                  parity_batches=parity_batches, threads=threads, log=log)
    seg_graph = None
    if segmenter is not None and segmenter.family == "onnx":
        seg_graph = copy_onnx_model(segmenter, out / "segmenter.onnx", log)
    elif segmenter is not None:
        seg_graph = export_segmenter(segmenter.module, out / "segmenter.onnx", example_size=segmenter_size,
                                     metadata=facts.segmenter_props(segmenter), **common)
    den_graph, denoiser_size = None, None
    if denoiser is not None:
        denoiser_size = denoiser.input_size
        if denoiser_size is None:
            raise InputError(f"denoiser {denoiser.name} does not say its input size")
        if denoiser.family == "onnx":
            den_graph = copy_onnx_model(denoiser, out / "denoiser.onnx", log)
        else:
            den_graph = export_denoiser(denoiser.module, out / "denoiser.onnx", image_size=denoiser_size,
                                        metadata=facts.denoiser_props(denoiser), **common)
    result = ExportResult(
        out_dir=out, image_size=(height, width), segmenter_size=segmenter_size, denoiser_size=denoiser_size,
        max_batch=max_batch, segmenter_graph=seg_graph, denoiser_graph=den_graph,
        models={"segmenter": None if segmenter is None else model_record(segmenter),
                "denoiser": None if denoiser is None else model_record(denoiser)},
        client_facts={key: None if segmenter is None else segmenter.extra.get(key) for key in ("classes", "palette")},
    )
    if tensorrt is not False:
        result.engines = _build_engines(result, required=bool(tensorrt), fp16=fp16, log=log)
    write_manifest(result, scale=scale)
    return result


def _build_engines(result: ExportResult, *, required: bool, fp16: bool, log: Log | None) -> dict[str, Any]:
    """One TensorRT plan per graph, or a clean skip (an error when ``required``)."""
    builds: dict[str, Any] = {}
    for role, graph in result.graphs.items():
        shapes = {spec.name: _sample_shape(spec, result, role) for spec in graph.inputs}
        build = build_engine(
            graph.path, graph.path.with_suffix(".plan"), input_shapes=shapes, max_batch=result.max_batch,
            fp16=fp16, fp32_sources=DENOISER_FP32_SOURCES if role == "denoiser" else (), fp16_onnx=graph.fp16_path,
            log=log,
        )
        if build.status != "built" and required:
            raise TensorRTUnavailable(build.message)
        builds[role] = build
        if build.status == "skipped":
            note(log, build.message)
            break
    return builds


def _sample_shape(spec: TensorSpec, result: ExportResult, role: str) -> tuple[int, ...]:
    """Per-sample shape (no batch) for an engine profile: dynamic h/w pinned to the deployment's size."""
    size = result.segmenter_size if role == "segmenter" else result.denoiser_size
    dims = list(spec.shape[1:])
    if len(dims) == 3:
        dims = [d if isinstance(d, int) else s for d, s in zip(dims, (3, *size), strict=True)]
    return tuple(int(d) for d in dims)
