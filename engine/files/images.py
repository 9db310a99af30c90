"""Reading images and label maps, writing certified label maps, overlays and JSON reports.

Images become (C, H, W) float32 in [0, 1]: 8-bit and 16-bit PNG, JPEG; RGB and RGBA (alpha dropped) as C = 3,
grayscale (with or without alpha) as C = 1, so that a gray image is certified in its own pixel space (the runtimes
replicate it to RGB after the noise). Certified label maps are written as palette PNGs whose pixel values are
the class ids (abstain = K), so they are both machine-readable and visible.

Images and label maps are checked against a pixel limit from their header, before any pixel is decoded, and
are turned upright by their EXIF orientation tag, as image viewers show them: the pixels certified are the
ones a person looks at, and a label map drawn over the upright image stays aligned with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from certseg.engine.errors import InputError
from certseg.engine.files.png16 import read_png16
from certseg.engine.limits import DEFAULT_MAX_PIXELS, check_pixel_limit

ABSTAIN_COLOUR = (255, 255, 255)


def _to_channels(array: np.ndarray, max_value: float, path: Path) -> np.ndarray:
    """(H, W[, C]) integers -> (C, H, W) float32 in [0, 1]: (1, H, W) for gray, (3, H, W) for colour; alpha
    dropped. Gray is not replicated here: three copies would each get their own noise and certify a radius that is
    only R/sqrt(3) in the gray image's own space."""
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        array = array[:, :, :1]
    elif channels == 4:
        array = array[:, :, :3]
    elif channels != 3:
        raise InputError(f"{path}: unsupported number of channels ({channels}); expected gray, RGB or RGBA")
    return np.ascontiguousarray((array.astype(np.float32) / np.float32(max_value)).transpose(2, 0, 1))


_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90° clockwise to be upright
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, 1),  # rotated 90° counter-clockwise to be upright
}
"""EXIF orientation -> the (H, W, ...) array operation that ``ImageOps.exif_transpose`` performs (tested equal),
for 16-bit PNGs: OpenCV decodes them without turning them (``certseg.engine.files.png16``)."""


@contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
    """Pillow's own decompression-bomb check off while certseg's pixel limit, checked right after the header is
    read, applies instead: Pillow's would raise (a traceback) or warn, and refuse sizes a user allowed."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _existing_file(path: str | Path, kind: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give one {kind} file")
    if not path.is_file():
        raise InputError(f"{path}: no such {kind} file")
    return path


@contextmanager
def open_checked(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """A decoded Pillow image: size checked against ``max_pixels`` from the header before decoding, EXIF
    orientation applied."""
    with _pillow_bomb_check_off(), Image.open(path) as image:
        check_pixel_limit(*image.size, max_pixels, source=path)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        yield image


def _exif_orientation(path: Path) -> int:
    """The EXIF orientation tag (1 = upright) of a 16-bit PNG, from an eXIf chunk before the image data (where
    the PNG specification puts it). Read from ``info``: Pillow's ``getexif`` would decode the whole image to
    look for one after the data."""
    with _pillow_bomb_check_off(), Image.open(path) as image:
        raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    return int(orientation) if orientation in _ORIENT else 1


def image_pixels(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> int:
    """How many pixels an image file has, from its header alone (checked against ``max_pixels``): what a run of
    many images checks for all of them before the first sample, without holding any decoded."""
    path = _existing_file(path, "image")
    try:
        with _pillow_bomb_check_off(), Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: not a readable image ({error.__class__.__name__}: {error})") from None
    check_pixel_limit(width, height, max_pixels, source=path)
    return width * height


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as (3, H, W) RGB or (1, H, W) gray float32 in [0, 1], keeping 16-bit precision.

    Refused before decoding when it has more than ``max_pixels`` pixels (None: no limit); turned upright by
    its EXIF orientation.
    """
    path = _existing_file(path, "image")
    try:
        deep = read_png16(path, max_pixels=max_pixels)
        if deep is not None:
            orientation = _exif_orientation(path)
            return _to_channels(_ORIENT[orientation](deep) if orientation != 1 else deep, 65535.0, path)
        with open_checked(path, max_pixels) as image:
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                return _to_channels(np.asarray(image, dtype=np.uint16), 65535.0, path)
            if mode == "I":  # 16-bit gray decoded to 32-bit ints by some Pillow versions
                return _to_channels(np.asarray(image).astype(np.uint32), 65535.0, path)
            if mode == "1":  # bilevel: gray
                image = image.convert("L")
            elif mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
            return _to_channels(np.asarray(image), 255.0, path)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: not a readable image ({error.__class__.__name__}: {error})") from None


def read_labels(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a label PNG (class ids per pixel, 255 = ignore) as a 2-D integer array.

    The same pixel limit and EXIF orientation as ``read_image``, so labels stay aligned with their image.
    """
    path = _existing_file(path, "label")
    try:
        with open_checked(path, max_pixels) as image:
            if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise InputError(f"{path}: label maps must be single-channel (got mode {image.mode})")
            return np.asarray(image).astype(np.int64 if image.mode.startswith("I") else np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: not a readable label map ({error.__class__.__name__}: {error})") from None


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for K classes (K <= 255 for PNG palettes); deterministic, abstain not included."""
    cityscapes = np.array(
        [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
         [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
         [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]],
        dtype=np.uint8,
    )
    if num_classes <= len(cityscapes):
        return cityscapes[:num_classes]
    rng = np.random.default_rng(num_classes)
    extra = rng.integers(0, 256, size=(num_classes - len(cityscapes), 3), dtype=np.uint8)
    return np.concatenate([cityscapes, extra])


def write_label_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Palette PNG: pixel value = class id (abstain = K, drawn white); uint16 grayscale when K + 1 > 256."""
    num_entries = len(palette) + 1
    if num_entries > 256:
        Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")
        return
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = np.concatenate([palette, np.array([ABSTAIN_COLOUR], dtype=np.uint8)])
    image.putpalette(colours.ravel().tolist())
    image.save(path, format="PNG")


def abstain_look(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) float: how abstained pixels are drawn in every picture, the image greyed and hatched white."""
    gray = image.transpose(1, 2, 0).mean(axis=2, keepdims=True) * 255.0 * 0.5 + 64
    rows, cols = np.indices(image.shape[1:])
    hatch = ((rows + cols) // 4) % 2 == 0
    return np.where(hatch[:, :, None], gray, np.full_like(gray, 255.0))


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """RGB uint8 picture of the certificate: class colours over the image; abstained pixels greyed and hatched."""
    rgb = image.transpose(1, 2, 0) * 255.0
    abstain = labels >= len(palette)
    colours = palette[np.minimum(labels, len(palette) - 1)].astype(np.float32)
    blended = (1 - opacity) * rgb + opacity * colours
    out = np.where(abstain[:, :, None], abstain_look(image), blended)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG")


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays (their elements too), paths and tuples converted; non-finite floats
    become null, so the file stays strict JSON that every reader parses."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(report: dict[str, Any]) -> str:
    """The report as indented JSON: numpy values as numbers, paths as strings, non-finite floats as null."""
    return json.dumps(jsonable(report), indent=2) + "\n"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a report."""
    temporary = path.with_suffix(path.suffix + ".partial")
    temporary.write_text(json_text(report))
    temporary.replace(path)
