"""Datasets for certseg.bench: the procedural street scenes (the default) and local Cityscapes / Pascal-Context."""

from certseg.bench.datasets.common import BenchDataset, DatasetError, DatasetItem
from certseg.bench.datasets.loader import open_dataset
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
    "BenchDataset",
    "DatasetError",
    "DatasetItem",
    "Scene",
    "colorize",
    "generate_batch",
    "generate_scene",
    "held_out_seed",
    "is_train_seed",
    "open_dataset",
    "to_uint8",
    "write_cityscapes_layout",
]
