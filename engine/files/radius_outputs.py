"""The radius map's files: ``<stem>.radius.npz`` (the radii themselves) and ``<stem>.radius.png`` (a picture).

The npz is a contract other tools read: ``radius`` float32 (H, W) in the image's L2 pixel-space units, NaN where
the pixel abstains, and ``guess`` (H, W), the class each radius is for. The picture colours the radii on a
perceptual ramp in the image's size (so it lies over the image pixel for pixel), with the colour bar as an inset at
the right edge; abstained pixels are drawn as in the overlay
(grey hatching over the image), so the two pictures read the same way. Drawn with Pillow (as ``bench/plots.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from certseg.engine.files.images import abstain_look

VIRIDIS_ANCHORS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137], [53, 183, 121],
     [109, 205, 89], [180, 222, 44], [253, 231, 37]], dtype=np.float32,
)
"""Ten evenly spaced samples of matplotlib's viridis (perceptually uniform, readable in grey and by the
colour-blind), interpolated linearly."""
BAR_WIDTH = 64
"""The colour-bar panel's width in pixels (the ramp plus its tick labels)."""


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 along the viridis anchors."""
    position = np.clip(values, 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, len(VIRIDIS_ANCHORS) - 1)
    weight = (position - low)[..., None]
    colours = (1 - weight) * VIRIDIS_ANCHORS[low] + weight * VIRIDIS_ANCHORS[high]
    return np.round(colours).astype(np.uint8)


def radius_picture(image: np.ndarray, radius: np.ndarray, top: float) -> np.ndarray:
    """(H, W, 3) uint8 in the image's size, so it lies pixel for pixel over the image: radii coloured on
    [0, ``top``], abstentions hatched, and a colour bar drawn as a labelled inset at the right edge."""
    abstain = np.isnan(radius)
    scaled = np.where(abstain, 0.0, radius / top if top > 0 else 0.0)
    picture = colour_ramp(scaled).astype(np.float32)
    picture = np.where(abstain[:, :, None], abstain_look(image), picture)
    heat = Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8), mode="RGB")
    draw_colour_bar(heat, top)
    return np.asarray(heat)


def draw_colour_bar(picture: Image.Image, top: float) -> None:
    """A ramp from 0 (bottom) to ``top`` inside the right edge of ``picture``, on a white panel with tick labels
    (left out where the picture is too small to read them)."""
    width, height = picture.size
    bar_width = max(4, min(BAR_WIDTH // 6, width // 24))
    labelled = height >= 48 and width >= 96
    panel_width = bar_width + (BAR_WIDTH - 16 if labelled else 4)
    margin = max(1, min(6, height // 20))
    x0, y0, y1 = width - panel_width - margin, margin, height - margin
    if x0 < 0 or y1 - y0 < 4:
        return
    draw = ImageDraw.Draw(picture)
    draw.rectangle([x0, y0, x0 + panel_width, y1], fill=(255, 255, 255), outline=(60, 60, 60))
    inner = y1 - y0 - 4
    ramp = colour_ramp(np.linspace(1.0, 0.0, inner))[:, None, :].repeat(bar_width, axis=1)
    picture.paste(Image.fromarray(ramp, mode="RGB"), (x0 + 2, y0 + 2))
    if not labelled:
        return
    font = ImageFont.load_default()
    text_x = x0 + bar_width + 6
    for fraction in (0.0, 0.5, 1.0):
        y = y0 + 2 + int(round((1.0 - fraction) * (inner - 1)))
        draw.line([(x0 + 2 + bar_width, y), (x0 + 4 + bar_width, y)], fill=(20, 20, 20))
        draw.text((text_x, min(max(y - 5, y0 + 1), y1 - 11)), f"{fraction * top:.3g}", fill=(20, 20, 20), font=font)
    draw.text((text_x, y0 + 2 + inner // 4 - 5), "R", fill=(20, 20, 20), font=font)


def write_radius_npz(path: Path, radius: np.ndarray, guess: np.ndarray) -> None:
    """The radii (float32, NaN = abstain) and the class each is for, compressed; written through a file object
    so that numpy does not append ``.npz`` to a temporary name."""
    with open(path, "wb") as handle:
        np.savez_compressed(handle, radius=np.asarray(radius, dtype=np.float32), guess=np.asarray(guess))


def read_radius_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(radius, guess) from a ``<stem>.radius.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return data["radius"], data["guess"]
