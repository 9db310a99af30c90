"""Training data: scenes rendered once into an in-memory pool, then random flipped batches drawn from it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from certseg.training import scenes
from certseg.training.progress import progress_bar

ScenePool = tuple[torch.Tensor, torch.Tensor]
"""Images (N, 3, H, W) uint8 and labels (N, H, W) uint8."""


def scene_pool(seeds: Sequence[int], size: tuple[int, int]) -> ScenePool:
    """Images and labels of the scenes ``seeds`` rendered once, 8-bit as the PNG files store them."""
    images = np.empty((len(seeds), 3, *size), dtype=np.uint8)
    labels = np.empty((len(seeds), *size), dtype=np.uint8)
    with progress_bar() as bar:
        task = bar.add_task("rendering scenes", total=len(seeds), status="")
        for i, seed in enumerate(seeds):
            scene = scenes.generate_scene(int(seed), *size)
            images[i] = np.round(scene.image * 255)
            labels[i] = scene.labels
            bar.advance(task)
    return torch.from_numpy(images), torch.from_numpy(labels)


def random_batch(pool: ScenePool, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch with horizontal flips: images float [0, 1], labels int64."""
    index = torch.randint(len(pool[0]), (size,), generator=generator)
    images = pool[0][index].float() / 255
    labels = pool[1][index].long()
    flip = torch.rand(size, generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    labels[flip] = labels[flip].flip(-1)
    return images, labels

