"""The sampling contract every runtime answers (in-process torch, ONNX Runtime, a Triton server), without torch.

A runtime yields the label maps of samples ``start .. start+count`` of root seed ``s`` at noise level σ, in index
order, in batches it chooses (``batch_ranges``). Algorithm 1 uses indices ``[0, n0)`` for selection and
``[n0, n0 + n)`` for estimation: disjoint by construction, hence independent. Which noise a sample index gets is
``certseg.engine.core.streams``'. The orchestration (``certseg.engine.core.pipeline``) and the Triton client need
only this module, so they import no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np


class Runtime(Protocol):
    """Anything that answers the sampling contract (in-process torch, ONNX Runtime, a Triton server)."""

    def labels(
        self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int
    ) -> Iterator[np.ndarray]:
        """Yield label maps (b, H, W) for samples ``start .. start+count`` in index order."""
        ...


def batch_ranges(start: int, count: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, start+count)`` into (start, count) chunks of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    end = start + count
    for first in range(start, end, batch_size):
        yield first, min(batch_size, end - first)
