"""Pascal-Context (59 classes) val from a local folder, selected as the peers did: every 51st image.

Accepted layout (the one mmsegmentation's ``tools/convert_datasets/pascal_context.py`` writes; ROOT may also be
a folder holding ``VOCdevkit/VOC2010`` or ``VOC2010``)::

    ROOT/JPEGImages/<name>.jpg
    ROOT/SegmentationClassContext/<name>.png        (or SegmentationClassContext59/): 8-bit, 0 = background,
                                                    1..59 = the 59 classes
    ROOT/ImageSets/SegmentationContext/val.txt      (one <name> per line; without it every label map found is used)

Labels become ``label - 1`` with background → 255 (ignored), exactly the peers' ``mask - 1``. The val names are
sorted (the Detail API lists val images by ascending image id, i.e. by file name), then indices 0, 51, 102, … are
taken. The peers also squashed images and labels to 480 × 480: ``resize=480`` (``--resize 480``) does that
(image bilinear, labels nearest); by default images keep their own size.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from certseg.bench.datasets.common import BenchDataset, DatasetError, DatasetItem, every_kth, square_resize
from certseg.engine.files.images import open_checked, read_image
from certseg.engine.limits import DEFAULT_MAX_PIXELS

CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
IGNORE_INDEX = 255
STEP = 51
LABEL_DIRS = ("SegmentationClassContext", "SegmentationClassContext59")
VAL_LIST = Path("ImageSets") / "SegmentationContext" / "val.txt"


def layout_help(root: Path) -> str:
    return (
        f"expected {root}/JPEGImages/<name>.jpg and {root}/{LABEL_DIRS[0]}/<name>.png (59-class labels, "
        f"0 = background), optionally {root}/{VAL_LIST.as_posix()}"
    )


def find_root(root: Path) -> Path:
    """ROOT itself, or its ``VOCdevkit/VOC2010`` / ``VOC2010`` sub-folder, whichever holds ``JPEGImages``."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"Pascal-Context: {root} does not exist; {layout_help(root)}")
    for candidate in (root, root / "VOCdevkit" / "VOC2010", root / "VOC2010"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    if root.name in ("JPEGImages", *LABEL_DIRS) and (root.parent / "JPEGImages").is_dir():
        raise DatasetError(f"Pascal-Context: {root} is inside the dataset; pass --root {root.parent}")
    raise DatasetError(f"Pascal-Context: no JPEGImages folder under {root}; {layout_help(root)}")


def _label_dir(root: Path) -> Path:
    for name in LABEL_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"Pascal-Context: no 59-class label folder under {root}; {layout_help(root)}")


def val_names(root: Path) -> tuple[list[str], str]:
    """Sorted val image names and where they came from."""
    listing = root / VAL_LIST
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        source = str(listing)
    else:
        names = [p.stem for p in _label_dir(root).glob("*.png")]
        source = f"every label map in {_label_dir(root)} (no {VAL_LIST.as_posix()})"
    if not names:
        raise DatasetError(f"Pascal-Context: no val images listed; {layout_help(root)}")
    return sorted(names), source


def context_labels(mask: np.ndarray, path: Path | str = "label map") -> np.ndarray:
    """59-class mask (0 = background, 1..59) → train labels 0..58 with background → 255 (the peers' mask - 1)."""
    mask = np.asarray(mask)
    valid = mask != IGNORE_INDEX
    if valid.any() and int(mask[valid].max()) > len(CLASSES):
        raise DatasetError(
            f"{path}: label value {int(mask[valid].max())} > {len(CLASSES)}: this is not a 59-class Pascal-Context map "
            "(the full 459-class labels must be converted first, e.g. with mmsegmentation's pascal_context.py)"
        )
    out = mask.astype(np.int16) - 1
    out[(mask == 0) | ~valid] = IGNORE_INDEX
    return out.astype(np.uint8)


def _load(image: Path, labels: Path, resize: int | None, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    pixels = read_image(image, max_pixels)
    with open_checked(labels, max_pixels) as handle:
        if handle.mode not in ("L", "P"):
            raise DatasetError(f"{labels}: label maps must be 8-bit single-channel PNGs (got mode {handle.mode})")
        target = context_labels(np.asarray(handle), labels)
    if pixels.shape[1:] != target.shape:
        raise DatasetError(f"{labels}: label map is {target.shape}, image {image.name} is {pixels.shape[1:]}")
    return square_resize(pixels, target, resize) if resize else (pixels, target)


def open_pascal_context(
    root: Path, *, resize: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> BenchDataset:
    """The protocol selection (every 51st sorted val image) as lazily loaded items."""
    root = find_root(Path(root))
    label_dir = _label_dir(root)
    names, source = val_names(root)
    items = []
    for index, name in enumerate(every_kth(names, STEP)):
        image = root / "JPEGImages" / f"{name}.jpg"
        labels = label_dir / f"{name}.png"
        for path in (image, labels):
            if not path.is_file():
                raise DatasetError(f"Pascal-Context: {path} is missing; {layout_help(root)}")
        items.append(DatasetItem(index=index, id=name, load=partial(_load, image, labels, resize, max_pixels),
                                 path=image))
    description = {
        "root": str(root.resolve()),
        "val_list": source,
        "images_in_split": len(names),
        "selection": f"sorted val names, every {STEP}th (indices 0, {STEP}, ...)",
        "labels": "mask - 1, background -> 255",
        "resize": resize,
    }
    return BenchDataset("pascal-context", CLASSES, IGNORE_INDEX, tuple(items), description)
