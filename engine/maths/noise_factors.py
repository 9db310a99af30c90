"""Resize noise factors kept on disk: t* for an image size seen before is chosen without importing torch.

``denoise.resize_noise_factor`` measures torch's own resize operator, and importing torch alone takes 1.3-1.7 s:
more than a client of Triton servers, which runs no torch otherwise, needs to start. The factor depends only on
the two sizes, the antialias flag and torch's version, so it is kept as JSON in the cache folder under that
version and measured once per image size. JSON keeps every bit of a float, so t* and the records are those of
the measured value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from certseg.engine.cache import cache_dir, write_json_file
from certseg.engine.maths.sizes import as_pair


def noise_factor(in_size: int | Sequence[int], out_size: int | Sequence[int], antialias: bool = False) -> float:
    """``denoise.resize_noise_factor(in_size, out_size, antialias=antialias)``, read from the cache when measured
    before with this torch."""
    return _noise_factor(as_pair(in_size), as_pair(out_size), bool(antialias))


@lru_cache(maxsize=64)
def _noise_factor(in_size: tuple[int, int], out_size: tuple[int, int], antialias: bool) -> float:
    path = factor_path(in_size, out_size, antialias)
    known = None if path is None else _read(path)
    if known is not None:
        return known
    from certseg.engine.maths.denoise import resize_noise_factor

    factor = resize_noise_factor(in_size, out_size, antialias=antialias)
    if path is not None:
        write_json_file(path, {"in_size": list(in_size), "out_size": list(out_size), "antialias": antialias,
                               "factor": factor})
    return factor


def factor_path(in_size: tuple[int, int], out_size: tuple[int, int], antialias: bool) -> Path | None:
    """Where the factor is kept: one file per sizes and antialias flag, in a folder per torch version (None
    without an installed torch, which could not measure it either)."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    name = f"{in_size[0]}x{in_size[1]}-{out_size[0]}x{out_size[1]}{'-antialias' if antialias else ''}.json"
    return cache_dir() / "noise-factors" / f"torch-{version}" / name


def _read(path: Path) -> float | None:
    """The kept factor, or None where there is none (or the file is not one: it is measured again)."""
    try:
        factor = json.loads(path.read_text())["factor"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return factor if isinstance(factor, float) and math.isfinite(factor) and factor > 0 else None
