"""The procedural street scenes as a bench dataset: held-out scenes only, rendered in memory.

Why quantised: a scene is stored (``--write-data``) as an 8-bit PNG, and ``certseg certify`` reads that PNG. The
in-memory image is rounded to 8 bits and divided by 255 exactly as ``certseg.engine.files.images.read_image`` does, so a
bench entry and ``certseg certify`` on the written file certify bit-identical pixels.

``data_seed`` is the first held-out index: item ``j`` is scene ``held_out_seed(data_seed + j)``, a seed range
disjoint from every training seed. Its protocol index (from which the noise seeds derive) is ``data_seed + j``, so
a scene keeps its noise whichever window of scenes a run takes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from certseg.bench.datasets.common import BenchDataset, DatasetError, DatasetItem
from certseg.training import scenes
from certseg.training.architectures import SCENE_SIZE


def quantised(image: np.ndarray) -> np.ndarray:
    """What reading the scene's 8-bit PNG back gives: round to 8 bits, then float32 / 255 as ``read_image``."""
    return np.ascontiguousarray((scenes.to_uint8(image).astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1))


def _render(j: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    scene = scenes.generate_scene(scenes.held_out_seed(j), *size)
    return quantised(scene.image), scene.labels


def image_path(root: Path, j: int, split: str = "val") -> Path:
    """Where ``write_cityscapes_layout`` puts held-out scene ``j``."""
    name = scenes.scene_name(j)
    return Path(root) / "leftImg8bit" / split / scenes.CITY / f"{name}_leftImg8bit.png"


def open_procedural(
    count: int, *, data_seed: int = 0, size: tuple[int, int] = SCENE_SIZE, write_to: Path | None = None
) -> BenchDataset:
    """``count`` held-out scenes from index ``data_seed``; with ``write_to``, also written in Cityscapes layout."""
    if data_seed < 0:
        raise DatasetError(f"--data-seed must be >= 0, got {data_seed}")
    if count < 1:
        raise DatasetError(f"--images must be >= 1, got {count}")
    height, width = size
    if write_to is not None:
        scenes.write_cityscapes_layout(
            Path(write_to), num_images=count, height=height, width=width, first_held_out=data_seed
        )
    items = tuple(
        DatasetItem(
            index=j,
            id=scenes.scene_name(j),
            load=partial(_render, j, (height, width)),
            path=None if write_to is None else image_path(write_to, j),
        )
        for j in range(data_seed, data_seed + count)
    )
    description = {
        "generator_version": scenes.GENERATOR_VERSION,
        "scene_size": [height, width],
        "data_seed": data_seed,
        "selection": f"held-out scenes {data_seed}..{data_seed + count - 1} (seeds "
                     f"{scenes.held_out_seed(data_seed)}..; never used in training)",
        "written_to": None if write_to is None else str(Path(write_to).resolve()),
    }
    return BenchDataset("procedural", scenes.CLASSES, scenes.IGNORE_INDEX, items, description)
