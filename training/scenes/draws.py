"""Random draws of a scene: uniform ones only, as Python scalars, from one PCG64 stream.

Only uniform draws are used because numpy's normal sampler calls libm in its tails, whose last bits may differ
between platforms; every scene must be bit-identical everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
RGB = tuple[float, float, float]


class UniformDraws:
    """A PCG64 ``Generator`` that only makes uniform draws and returns Python scalars."""

    def __init__(self, generator: np.random.Generator):
        self.generator = generator

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(self.generator.random())

    def integer(self, low: int, high: int) -> int:
        """Integer in [low, high)."""
        return int(self.generator.integers(low, high))

    def chance(self, probability: float) -> bool:
        return float(self.generator.random()) < probability

    def pick(self, choices: Sequence[T]) -> T:
        return choices[self.integer(0, len(choices))]

    def colour(self, base: RGB, jitter: float = 0.06, brightness: float = 0.12) -> RGB:
        """``base`` with per-channel jitter and a common brightness change, clipped to [0,1]."""
        scale = self.uniform(1 - brightness, 1 + brightness)
        return tuple(min(1.0, max(0.0, (c + self.uniform(-jitter, jitter)) * scale)) for c in base)
