"""Image sizes of the pipeline's stages, as plain (H, W) pairs (no torch: pipeline specs are made without it)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The segmenter's input size for the paper's ``scale`` (Table 2): round(scale · dataset size)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An (H, W) size from one int (square) or a pair."""
    if isinstance(size, numbers.Integral):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width
