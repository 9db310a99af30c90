"""Datasets for certseg.bench: the procedural street scenes (and, where available, real Cityscapes)."""

from certseg.bench.datasets.procedural import (
    CLASSES,
    GENERATOR_VERSION,
    HELD_OUT_SEED_OFFSET,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    TRAIN_SEEDS,
    Scene,
    colorize,
    generate_batch,
    generate_scene,
    held_out_seed,
    is_train_seed,
    to_uint8,
    write_cityscapes_layout,
)

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "HELD_OUT_SEED_OFFSET",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "PALETTE",
    "TRAIN_SEEDS",
    "Scene",
    "colorize",
    "generate_batch",
    "generate_scene",
    "held_out_seed",
    "is_train_seed",
    "to_uint8",
    "write_cityscapes_layout",
]
