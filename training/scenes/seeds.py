"""Which seeds train and which evaluate: two disjoint ranges, so no evaluated scene was ever seen in training."""

from __future__ import annotations

TRAIN_SEEDS = range(0, 1_000_000)
"""Training draws seeds only from here."""
HELD_OUT_SEED_OFFSET = 10_000_000
"""Evaluation uses only ``held_out_seed(j) = HELD_OUT_SEED_OFFSET + j``, beyond every training seed."""


def held_out_seed(j: int) -> int:
    """Seed of held-out (evaluation) scene ``j``; disjoint from ``TRAIN_SEEDS`` by construction."""
    if j < 0 or j >= HELD_OUT_SEED_OFFSET:
        raise ValueError(f"held-out index must be in [0, {HELD_OUT_SEED_OFFSET}), got {j}")
    return HELD_OUT_SEED_OFFSET + j


def is_train_seed(seed: int) -> bool:
    return seed in TRAIN_SEEDS
