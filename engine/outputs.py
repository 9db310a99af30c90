"""The files a certification leaves behind: certified label PNG, overlay PNG and a JSON report that re-makes it."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from certseg.engine.io import default_palette, overlay, write_json, write_label_png, write_rgb_png
from certseg.engine.pipeline import CertifiedSegmentation

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


def class_names(num_classes: int, names: list[str] | None = None) -> list[str]:
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("certseg", "torch", "numpy", "scipy", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def per_class_counts(result: CertifiedSegmentation, names: list[str]) -> dict[str, int]:
    """Certified pixels per class, plus the abstained ones."""
    counts = np.bincount(result.labels.ravel().astype(np.int64), minlength=result.num_classes + 1)
    out = {name: int(counts[i]) for i, name in enumerate(names)}
    out["abstain"] = int(counts[result.num_classes])
    return out


def certificate_summary(result: CertifiedSegmentation) -> dict[str, Any]:
    certificate = result.certificate
    return {
        "sigma": result.sigma,
        "n0": result.n0,
        "n": result.n,
        "alpha": certificate.alpha,
        "tau": certificate.tau,
        "fwer": certificate.fwer,
        "radius": result.radius,
        "seed": result.seed,
        "num_pixels": certificate.num_pixels,
        "abstain_percent": 100.0 * certificate.abstain_fraction,
        "min_agreements": certificate.min_agreements,
    }


@dataclass(frozen=True)
class OutputPaths:
    certified: Path
    overlay: Path
    report: Path


def output_paths(out_dir: Path, stem: str) -> OutputPaths:
    return OutputPaths(out_dir / f"{stem}.certified.png", out_dir / f"{stem}.overlay.png", out_dir / f"{stem}.json")


def write_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    result: CertifiedSegmentation,
    report: dict[str, Any],
    palette: np.ndarray | None = None,
) -> OutputPaths:
    """Write the three files; the JSON last, so its presence means the run completed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, stem)
    palette = default_palette(result.num_classes) if palette is None else palette
    write_label_png(paths.certified, result.labels, palette)
    write_rgb_png(paths.overlay, overlay(image, result.labels, palette))
    write_json(paths.report, report)
    return paths
