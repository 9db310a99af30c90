"""sha256 of files and folders: how results, caches and served repositories name the exact bytes they used."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import numpy as np

BLOCK = 1 << 22


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(partial(handle.read, BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: Path) -> str:
    """Hex sha256 over every file of ``folder``: relative paths and contents, in sorted order (caches skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def certificate_sha256(labels: np.ndarray, agree: np.ndarray) -> str:
    """Hex sha256 of a certificate: its map's shape, the certified map and the agreement counts (both as uint16).
    What tests pin and benchmarks compare across batches, runtimes and precisions."""
    labels = np.ascontiguousarray(labels, dtype=np.uint16)
    agree = np.ascontiguousarray(agree, dtype=np.uint16)
    return hashlib.sha256(f"{labels.shape}".encode() + labels.tobytes() + agree.tobytes()).hexdigest()
