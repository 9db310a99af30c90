"""The radius map's files: ``<stem>.radius.npz`` (the radii themselves) and ``<stem>.radius.png`` (a picture).

The npz is a contract other tools read: ``radius`` float32 (H, W) in the image's L2 pixel-space units, NaN where
the pixel abstains, and ``guess`` (H, W), the class each radius is for. The picture colours the radii on a
perceptual ramp in the image's size, with a colour bar beside it; abstained pixels are drawn as in the overlay
(grey hatching over the image), so the two pictures read the same way. Drawn with Pillow (as ``bench/plots.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from certseg.engine.io import abstain_look

VIRIDIS_ANCHORS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137], [53, 183, 121],
     [109, 205, 89], [180, 222, 44], [253, 231, 37]], dtype=np.float32,
)
"""Ten evenly spaced samples of matplotlib's viridis (perceptually uniform, readable in grey and by the
colour-blind), interpolated linearly."""
BAR_WIDTH = 96


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 along the viridis anchors."""
    position = np.clip(values, 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, len(VIRIDIS_ANCHORS) - 1)
    weight = (position - low)[..., None]
    colours = (1 - weight) * VIRIDIS_ANCHORS[low] + weight * VIRIDIS_ANCHORS[high]
    return np.round(colours).astype(np.uint8)


def radius_picture(image: np.ndarray, radius: np.ndarray, top: float) -> np.ndarray:
    """(H, W + bar, 3) uint8: radii coloured on [0, ``top``], abstentions hatched, and a labelled colour bar."""
    abstain = np.isnan(radius)
    scaled = np.where(abstain, 0.0, radius / top if top > 0 else 0.0)
    picture = colour_ramp(scaled).astype(np.float32)
    picture = np.where(abstain[:, :, None], abstain_look(image), picture)
    heat = np.clip(np.round(picture), 0, 255).astype(np.uint8)
    return np.concatenate([heat, colour_bar(radius.shape[0], top)], axis=1)


def colour_bar(height: int, top: float) -> np.ndarray:
    """A vertical ramp from 0 (bottom) to ``top`` with tick labels, as an (height, BAR_WIDTH, 3) picture."""
    bar = Image.new("RGB", (BAR_WIDTH, height), (255, 255, 255))
    ramp = colour_ramp(np.linspace(1.0, 0.0, height))[:, None, :].repeat(18, axis=1)
    bar.paste(Image.fromarray(ramp, mode="RGB"), (8, 0))
    draw = ImageDraw.Draw(bar)
    font = ImageFont.load_default()
    for fraction in (0.0, 0.5, 1.0):
        y = int(round((1.0 - fraction) * (height - 1)))
        draw.line([(26, y), (31, y)], fill=(20, 20, 20))
        label = f"{fraction * top:.3g}"
        draw.text((34, min(max(y - 5, 0), max(height - 11, 0))), label, fill=(20, 20, 20), font=font)
    draw.text((34, height // 4), "R", fill=(20, 20, 20), font=font)
    return np.asarray(bar)


def write_radius_npz(path: Path, radius: np.ndarray, guess: np.ndarray) -> None:
    """The radii (float32, NaN = abstain) and the class each is for, compressed; written through a file object
    so that numpy does not append ``.npz`` to a temporary name."""
    with open(path, "wb") as handle:
        np.savez_compressed(handle, radius=np.asarray(radius, dtype=np.float32), guess=np.asarray(guess))


def read_radius_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(radius, guess) from a ``<stem>.radius.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return data["radius"], data["guess"]
