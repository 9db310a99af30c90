"""Label maps hold the K classes and one more value, K: the abstain label in certificates, the invalid label in
sample maps (a non-finite model output). Their dtype is chosen here, once, without importing torch."""

from __future__ import annotations

import numpy as np


def label_numpy_dtype(num_classes: int) -> np.dtype:
    """The smallest dtype holding the labels 0..K (uint8 for K <= 255, uint16 for K <= 65535, else int32)."""
    for dtype in (np.uint8, np.uint16):
        if num_classes <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int32)
