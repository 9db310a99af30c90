"""The files a certification leaves behind: certified label PNG, overlay PNG and a JSON report that re-makes it.

All or nothing: the three files are written to temporary files in the output folder and renamed into place only
when all are complete, the JSON last. Its presence means the run completed, and it names the sha256 of the two
PNGs it vouches for. The folder is checked before certification starts, so a bad ``--out`` fails in seconds.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certseg.engine.core.pipeline import CertifiedSegmentation
from certseg.engine.digest import file_sha256
from certseg.engine.errors import InputError
from certseg.engine.files.images import default_palette, json_text, overlay, write_label_png, write_rgb_png
from certseg.engine.versions import package_versions

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
    """The versions a certificate records (packages that are not installed are left out)."""
    found = package_versions(("certseg", "torch", "numpy", "scipy", "onnxruntime"))
    return {name: version for name, version in found.items() if version is not None}


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
    extras: dict[str, Path] = field(default_factory=dict)
    """Optional outputs by role (``radius_png``, ``radius_npz``), present when that run wrote them."""


EXTRA_SUFFIXES: dict[str, str] = {"radius_png": ".radius.png", "radius_npz": ".radius.npz"}
"""The optional outputs a run may add, by role: ``<stem><suffix>`` beside the three files."""

Writer = Callable[[Path], None]


def output_paths(out_dir: Path, stem: str) -> OutputPaths:
    return OutputPaths(out_dir / f"{stem}.certified.png", out_dir / f"{stem}.overlay.png", out_dir / f"{stem}.json")


def check_output_folder(out_dir: Path) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written (nothing is created).

    The folder itself, or the nearest folder above it that exists (``write_outputs`` creates the rest), gets a
    temporary file that disappears at once: the only sure test of "writable" (permissions, read-only mounts).
    """
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"--out {out_dir}" if existing == out_dir else f"--out {out_dir}: {existing}"
        raise InputError(f"{what} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"--out {out_dir}: cannot write in {existing} ({error.strerror or error})") from None


def _staged(out_dir: Path, final: Path, write: Callable[[Path], None]) -> Path:
    """``write`` to a new temporary file beside ``final`` (hidden, same folder so renaming is atomic), synced."""
    temporary = out_dir / f".{final.name}.{uuid.uuid4().hex[:12]}.partial"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the usual mode (umask), not 0600
    try:
        write(temporary)
        with temporary.open("rb+") as file:
            os.fsync(file.fileno())  # a full disk must fail here, not after the rename
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    result: CertifiedSegmentation,
    report: dict[str, Any],
    palette: np.ndarray | None = None,
    extras: Mapping[str, Writer] | None = None,
) -> OutputPaths:
    """Write the files all or nothing; the JSON last, so its presence means the run completed.

    ``extras`` maps optional roles of ``EXTRA_SUFFIXES`` to the function that writes that file. Every file is
    first written to a temporary file in ``out_dir``. A failure there (a full disk) removes the temporary files
    and leaves an earlier run's outputs as they were. Then the earlier JSON is removed before any other file is
    replaced (and an earlier run's optional files that this run does not write are removed with it), and the new
    JSON, which records the sha256 of every file it vouches for, is renamed in last: a crash between renames
    leaves no JSON rather than one that vouches for another run's maps.
    """
    extras = dict(extras or {})
    unknown = set(extras) - set(EXTRA_SUFFIXES)
    if unknown:
        raise ValueError(f"unknown optional outputs {sorted(unknown)}; known: {sorted(EXTRA_SUFFIXES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = output_paths(out_dir, stem)
    paths = OutputPaths(base.certified, base.overlay, base.report,
                        {role: out_dir / f"{stem}{EXTRA_SUFFIXES[role]}" for role in extras})
    palette = default_palette(result.num_classes) if palette is None else palette
    picture = overlay(image, result.labels, palette)
    writers: dict[str, tuple[Path, Writer]] = {
        "certified": (paths.certified, lambda p: write_label_png(p, result.labels, palette)),
        "overlay": (paths.overlay, lambda p: write_rgb_png(p, picture)),
        **{role: (paths.extras[role], write) for role, write in extras.items()},
    }
    staged: list[tuple[Path, Path]] = []
    try:
        files = {}
        for role, (final, write) in writers.items():
            temporary = _staged(out_dir, final, write)
            staged.append((temporary, final))
            files[role] = {"file": final.name, "sha256": file_sha256(temporary)}
        text = json_text({**report, "outputs": files})
        staged.append((_staged(out_dir, paths.report, lambda p: p.write_text(text)), paths.report))
        paths.report.unlink(missing_ok=True)
        for role, suffix in EXTRA_SUFFIXES.items():
            if role not in extras:
                (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)  # an earlier run's, vouched for by no JSON
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)  # only those not renamed are still there
    return paths
