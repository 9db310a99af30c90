"""The scenes' classes: ids 0..7 index ``CLASSES`` (this dataset's own train ids, not Cityscapes' 19).

Every pixel gets a real class; the ignore value 255 is never produced. Traffic signs and traffic lights are
labelled ``pole`` and tree trunks ``vegetation`` (as in Cityscapes); buses and vans are ``vehicle``.
"""

from __future__ import annotations

import numpy as np

CLASSES: tuple[str, ...] = ("road", "sidewalk", "building", "vegetation", "sky", "vehicle", "person", "pole")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, VEHICLE, PERSON, POLE = range(8)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255
"""Cityscapes' void value; documented for readers, never produced by this generator."""
PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [107, 142, 35],
        [70, 130, 180],
        [0, 0, 142],
        [220, 20, 60],
        [153, 153, 153],
    ],
    dtype=np.uint8,
)
"""Cityscapes colours of the matching classes (vehicle = car), for overlays."""


def colorize(labels: np.ndarray) -> np.ndarray:
    """Labels (H,W) -> palette colours (H,W,3) uint8; ignore (255) shows black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[labels]
