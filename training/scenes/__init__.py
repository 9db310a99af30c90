"""Procedural street scenes with per-pixel labels: certseg's stand-in for Cityscapes.

Why: Cityscapes images and the published checkpoints are not available on our machines, so certseg trains its
own small models on synthetic street scenes and ships them as the default; the scenes are also the bench's
default dataset and the shipped sample (``examples/street.png``). How a scene is made: ``render``; what its
labels mean: ``labels``; which seeds train and which evaluate: ``seeds``.

Its public names are importable from the package itself (``from certseg.training import scenes``).
"""

from certseg.training.scenes.cityscapes_layout import CITY, scene_name, write_cityscapes_layout
from certseg.training.scenes.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize
from certseg.training.scenes.render import GENERATOR_VERSION, Scene, generate_batch, generate_scene, to_uint8
from certseg.training.scenes.seeds import HELD_OUT_SEED_OFFSET, TRAIN_SEEDS, held_out_seed, is_train_seed

__all__ = [
    "CITY",
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
    "scene_name",
    "to_uint8",
    "write_cityscapes_layout",
]
