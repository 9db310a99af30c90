"""What every bench dataset hands the runner: an ordered, lazily loaded list of (image, label map) items.

Why one shape for all: the runner, the seeds and the resume keys only need an item's protocol ``index``
(seeds derive from it, so a scene keeps its noise whatever ``--images`` window it falls in) and a stable ``id``
(the resume key); how pixels are read is each reader's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from certseg.engine.errors import InputError

Loader = Callable[[], tuple[np.ndarray, np.ndarray]]
"""Returns the image (3, H, W) float32 in [0, 1] and the label map (H, W) uint8 (ignore = the dataset's value)."""


class DatasetError(InputError):
    """A dataset is missing, mislaid or malformed; the message names the layout that was expected."""


@dataclass(frozen=True)
class DatasetItem:
    index: int
    """Position in the dataset's protocol order (e.g. 0..99 for the 100 Cityscapes images); seeds derive from it."""
    id: str
    """Stable name (file stem or scene name): the resume key."""
    load: Loader = field(repr=False, compare=False)
    path: Path | None = None
    """The image file when there is one (so ``certseg certify`` can be run on exactly the same input)."""


@dataclass(frozen=True)
class BenchDataset:
    name: str
    classes: tuple[str, ...]
    ignore_index: int
    items: tuple[DatasetItem, ...]
    """The whole protocol selection in order; the runner takes the first ``--images``."""
    description: dict[str, Any] = field(default_factory=dict)
    """JSON-ready: root, layout, selection rule, resize; stored in the run header."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, count: int) -> tuple[DatasetItem, ...]:
        if count < 1:
            raise DatasetError(f"--images must be >= 1, got {count}")
        if count > len(self.items):
            raise DatasetError(
                f"{self.name}: --images {count} asked for, but the protocol selection has only {len(self.items)} "
                f"images ({self.description.get('selection', '')})"
            )
        return self.items[:count]


def every_kth(paths: list[Any], step: int) -> list[Any]:
    """The peers' selection: items 0, step, 2·step, … of an already sorted list."""
    return paths[::step]


def square_resize(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size × size, aspect ignored: image bilinear (align_corners=False, no antialias, as OpenCV's
    INTER_LINEAR), labels nearest (torch's legacy ``nearest`` picks floor(i·scale) exactly as INTER_NEAREST)."""
    if image.shape[1:] == (size, size):
        return image, labels
    x = F.interpolate(torch.from_numpy(image)[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=False)
    y = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=(size, size), mode="nearest")
    return (x[0].clamp_(0, 1).numpy().astype(np.float32), y[0, 0].numpy().astype(labels.dtype))
