"""The learning-rate schedule both trainers use."""

from __future__ import annotations

import math


def cosine_learning_rate(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
