"""What ``certseg certify IMAGE`` does: read, validate, certify with a progress bar, write the three outputs.

``certify_loaded`` is the part after the models are open, shared with ``certify_many`` (several images, one
session).

In-process or against Triton servers (``servers``): the same session interface, the same outputs, and in
both cases nothing is written unless certification finished. Everything that can be checked before sampling
is: the image and label sizes (from their headers), the output folder, the label values against the model's
classes, and whether the run fits in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certseg.engine.choices import SharedMemory
from certseg.engine.core.metrics import DATASET_MIOU, PER_IMAGE_MIOU, CertifiedMetrics, check_target
from certseg.engine.errors import InputError
from certseg.engine.files.images import default_palette, read_image, read_labels, write_rgb_png
from certseg.engine.files.outputs import (
    certificate_summary,
    check_output_folder,
    class_names,
    per_class_counts,
    versions,
    write_outputs,
)
from certseg.engine.files.radius_outputs import radius_picture, write_radius_npz
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.runtimes.process import check_threads, process_record, set_threads
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings

if TYPE_CHECKING:
    from certseg.engine.core.radius import RadiusMap


@dataclass(frozen=True)
class CertifyRequest:
    """One ``certseg certify`` run: the image, the engine ``settings``, and what to read and write around them."""

    image: Path
    settings: Settings = field(default_factory=Settings)
    seed: int | None = None
    out: Path = Path("certseg-out")
    labels: Path | None = None
    radius_map: bool = False
    """Also write the per-pixel radius map (``<stem>.radius.png`` / ``.radius.npz``, ``radius_map`` in the JSON)."""
    ignore_index: int = 255
    progress: bool = True
    servers: tuple[str, ...] = ()
    """Triton gRPC endpoints (HOST:PORT): when given, they run the label pipeline instead of this process."""
    in_flight: int = 2
    shared_memory: SharedMemory = SharedMemory.auto
    retries: int = 3
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images and label maps with more pixels are refused from their header, before decoding."""
    threads: int | None = None
    """torch's (and ONNX Runtime's) CPU threads, set before any model runs; None: their defaults."""


def progress_bar() -> Progress:
    """The one rich progress bar of a run: samples drawn, over one image or all of them, and the image at hand."""
    return Progress(
        TextColumn("[bold]certifying"), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("samples"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    )


def open_session(request: CertifyRequest) -> Session:
    """The models of a run, loaded once (in this process, or the ``servers``' connections)."""
    if request.servers:
        set_threads(request.threads)  # this process still counts and tests
        return Session.connect(request.settings, request.servers, in_flight=request.in_flight,
                               shared_memory=request.shared_memory, retries=request.retries)
    return Session.open(request.settings, threads=request.threads)


def read_target(request: CertifyRequest, image: np.ndarray) -> np.ndarray | None:
    """The request's label map (None without ``labels``), checked to be the image's size."""
    if request.labels is None:
        return None
    target = read_labels(request.labels, max_pixels=request.max_pixels)
    if target.shape != image.shape[1:]:
        raise InputError(f"{request.labels}: label map is {target.shape}, image is {image.shape[1:]}")
    return target


@dataclass(frozen=True)
class Certified:
    """One image certified and written: the line printed for it and the JSON report it wrote."""

    summary: str
    report: dict[str, Any]


def run_certify(request: CertifyRequest) -> str:
    """Certify one image; returns a one-line summary. Outputs are written only after success."""
    check_threads(request.threads)
    image = read_image(request.image, max_pixels=request.max_pixels)
    request.settings.validate(image.shape[1] * image.shape[2])
    target = read_target(request, image)
    check_output_folder(request.out)
    session = open_session(request)
    try:
        if not request.progress:
            return certify_loaded(request, session, image, target).summary
        with progress_bar() as bar:
            task = bar.add_task(request.image.name, total=request.settings.n0 + request.settings.n)
            return certify_loaded(request, session, image, target, lambda k: bar.advance(task, k)).summary
    finally:
        session.close()


def certify_loaded(
    request: CertifyRequest,
    session: Session,
    image: np.ndarray,
    target: np.ndarray | None,
    progress: Callable[[int], object] | None = None,
    seeding: Mapping[str, int] | None = None,
) -> Certified:
    """Certify ``image`` (read from ``request.image``) on an open ``session`` and write its outputs.

    ``seeding``: what the JSON records beside ``seed`` about where it came from (a run of several images:
    ``root_seed`` and ``image_index``).
    """
    settings = request.settings
    if target is not None:
        check_target(target, session.num_classes, request.ignore_index, request.labels)
    result, record = session.certify(image, seed=request.seed, progress=progress)
    segmenter = record.segmenter
    names = class_names(result.num_classes, None if segmenter.classes is None else list(segmenter.classes))
    made = record.to_json()
    report = {
        "image": str(request.image),
        "image_size": list(image.shape[1:]),
        "method": settings.method.value,
        **certificate_summary(result),
        **(seeding or {}),
        "timestep": made["pipeline"]["timestep"],
        "classes": names,
        "per_class_certified_pixels": per_class_counts(result, names),
        **made,
        **process_record(request.threads),
        "versions": versions(),
    }
    if target is not None:
        report["metrics"] = image_metrics(result.labels, target, result.num_classes, request.ignore_index)
    extras = {}
    if request.radius_map:
        from certseg.engine.core.radius import radius_map

        radii = radius_map(result.certificate.agree, result.n, sigma=result.sigma, alpha=settings.alpha)
        report["radius_map"] = radii.summary()
        if target is not None:
            report["radius_map"]["certified_accuracy_at"] = radius_accuracy(radii, result.guess, target,
                                                                            request.ignore_index)
        top = radii.top
        extras = {"radius_png": lambda p: write_rgb_png(p, radius_picture(image, radii.radius, top)),
                  "radius_npz": lambda p: write_radius_npz(p, radii.radius, result.guess)}
    palette = segmenter.palette
    stem = request.image.stem
    paths = write_outputs(
        request.out, stem, image, result, report, None if palette is None else _palette(palette, result.num_classes),
        extras=extras,
    )
    written = ", ".join(str(p) for p in (paths.certified, paths.overlay, *paths.extras.values(), paths.report))
    summary = (
        f"certified {100 - report['abstain_percent']:.1f}% of {result.certificate.num_pixels} pixels at "
        f"R = {result.radius:.4f} (σ = {result.sigma}, {settings.method}); wrote {written}"
    )
    if request.radius_map:
        median = report["radius_map"]["radius_quantiles"].get("q50")
        summary += (f"; radius map: {report['radius_map']['certified_percent']:.1f}% with a radius"
                    + (f", median {median:.3f}" if median is not None else ""))
    invalid = result.non_finite
    if invalid.get("selection_samples") or invalid.get("estimation_samples"):
        summary += (f"; WARNING: non-finite model outputs in {invalid['selection_samples']} selection and "
                    f"{invalid['estimation_samples']} estimation samples made their pixels abstain")
    if "metrics" in report:
        mean_iou = report["metrics"]["mean_iou"]
        summary += (f"; certified accuracy {report['metrics']['certified_accuracy']:.3f}, "
                    f"mIoU {'n/a' if mean_iou != mean_iou else f'{mean_iou:.3f}'}")
    return Certified(summary, report)


def radius_accuracy(radii: RadiusMap, guess: np.ndarray, target: np.ndarray, ignore_index: int) -> dict[str, float]:
    """Certified accuracy of the radius map at the README's radii: correct pixels whose radius reaches each."""
    from certseg.engine.core.radius import ACCURACY_RADII, certified_accuracy_at

    valid = target != ignore_index
    curve = certified_accuracy_at(radii.radius, guess == target, valid, np.asarray(ACCURACY_RADII))
    return {f"{level:g}": float(value) for level, value in zip(ACCURACY_RADII, curve, strict=True)}


def image_metrics(labels: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int) -> dict[str, Any]:
    """One image's certified accuracy and mIoU; the mIoU averages the classes present in the labels or the
    prediction (``mean_iou_all_classes``: the dataset convention of ``certseg-bench``, absent classes as 0)."""
    metrics = CertifiedMetrics(num_classes, ignore_index=ignore_index)
    metrics.update(labels, target)
    return metrics.summary() | {
        "mean_iou": metrics.mean_iou_present,
        "mean_iou_convention": PER_IMAGE_MIOU,
        "mean_iou_all_classes": metrics.mean_iou,
        "mean_iou_all_classes_convention": DATASET_MIOU,
        "classes_present": metrics.present_classes.tolist(),
        "per_class_iou": metrics.per_class_iou.tolist(),
    }


def _palette(colours: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    array = np.asarray(colours, dtype=np.uint8)
    return array if len(array) == num_classes else default_palette(num_classes)

