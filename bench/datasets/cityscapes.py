"""Cityscapes val from a local folder, selected exactly as the peers did: sorted, every 5th image.

Accepted layout (the official archives unpacked into one ROOT)::

    ROOT/leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (preferred: 19 train ids, 255 ignore)
    ROOT/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png        (raw ids, mapped to train ids here)

Folders written by ``certseg-bench --write-data`` (procedural scenes in this layout, with a ``procedural.json``
beside them) are read the same way, with the procedural classes that file names.

Selection: all val images sorted by their path relative to ROOT, then indices 0, 5, …, 495: the 100 images of
``cityscapes-val-100.txt``. Images are read with ``certseg.engine.files.images.read_image``, the reader
``certseg certify`` uses, so a bench entry and ``certseg certify`` on the same file see the same pixels.

Class names and the id → trainId map come from the dataset's own label table (``cityscapesscripts``, in the
``bench`` extra), not a copy of it; only real Cityscapes needs it, not the procedural scenes written in its layout.
"""

from __future__ import annotations

import json
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from certseg.bench.datasets.common import BenchDataset, DatasetError, DatasetItem, every_kth, square_resize
from certseg.engine.files.images import open_checked, read_image
from certseg.engine.limits import DEFAULT_MAX_PIXELS

IGNORE_INDEX = 255
STEP = 5
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def label_table() -> list[Any]:
    """cityscapesscripts' ``labels``: name, id, trainId, ignoreInEval, colour of every Cityscapes label."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        raise DatasetError(
            "Cityscapes: the label table comes from cityscapesscripts: pip install 'certseg[bench]'"
        ) from None
    return list(labels)


@cache
def train_classes() -> tuple[str, ...]:
    """The evaluated classes in trainId order (19: road … bicycle)."""
    evaluated = {label.trainId: label.name for label in reversed(label_table()) if not label.ignoreInEval}
    return tuple(evaluated[train_id] for train_id in sorted(evaluated))


@cache
def id_lut() -> np.ndarray:
    """256 entries: raw label id → trainId; void classes, ids outside the table and license plate (-1) → 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in label_table():
        if 0 <= label.id < 256 and not label.ignoreInEval:
            lut[label.id] = label.trainId
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Raw ``*_labelIds.png`` values (0..33) → the 19 train ids, everything else → 255."""
    return id_lut()[np.asarray(label_ids).astype(np.uint8)]


def layout_help(root: Path, split: str = "val") -> str:
    return (
        f"expected {root}/leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX} and "
        f"{root}/gtFine/{split}/<city>/*{TRAIN_IDS_SUFFIX} (or *{LABEL_IDS_SUFFIX})"
    )


def _check_root(root: Path, split: str) -> Path:
    if not root.exists():
        raise DatasetError(f"Cityscapes: {root} does not exist; {layout_help(root, split)}")
    images = root / "leftImg8bit" / split
    if images.is_dir():
        return root
    # Common mislaying: ROOT points at leftImg8bit/, leftImg8bit/val or gtFine/ instead of their parent.
    for parent in (root.parent, root.parent.parent):
        if (parent / "leftImg8bit" / split).is_dir():
            raise DatasetError(
                f"Cityscapes: {root} is inside the dataset; pass --root {parent} ({layout_help(parent, split)})"
            )
    raise DatasetError(f"Cityscapes: no leftImg8bit/{split} folder under {root}; {layout_help(root, split)}")


def list_images(root: Path, split: str = "val") -> list[Path]:
    """All ``*_leftImg8bit.png`` of the split, sorted by their path relative to ROOT."""
    root = _check_root(Path(root), split)
    found = (root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")
    images = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    if not images:
        raise DatasetError(f"Cityscapes: no images found; {layout_help(root, split)}")
    return images


def label_path(root: Path, image: Path, split: str = "val") -> tuple[Path, bool]:
    """The label file of ``image`` and whether it holds raw ids (to be mapped) rather than train ids."""
    city = image.parent.name
    stem = image.name[: -len(IMAGE_SUFFIX)]
    folder = root / "gtFine" / split / city
    train_ids = folder / f"{stem}{TRAIN_IDS_SUFFIX}"
    if train_ids.is_file():
        return train_ids, False
    raw = folder / f"{stem}{LABEL_IDS_SUFFIX}"
    if raw.is_file():
        return raw, True
    raise DatasetError(f"Cityscapes: no label map for {image.name}: expected {train_ids} or {raw}")


def read_label_map(path: Path, raw_ids: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    with open_checked(path, max_pixels) as handle:
        if handle.mode not in ("L", "P", "I", "I;16"):
            raise DatasetError(f"{path}: label maps must be single-channel PNGs (got mode {handle.mode})")
        labels = np.asarray(handle)
    if raw_ids:
        return label_ids_to_train_ids(labels)
    return labels.astype(np.uint8)


def _load(
    image: Path, labels: Path, raw_ids: bool, resize: int | None, max_pixels: int | None
) -> tuple[np.ndarray, np.ndarray]:
    pixels, target = read_image(image, max_pixels), read_label_map(labels, raw_ids, max_pixels)
    if pixels.shape[1:] != target.shape:
        raise DatasetError(f"{labels}: label map is {target.shape}, image {image.name} is {pixels.shape[1:]}")
    return square_resize(pixels, target, resize) if resize else (pixels, target)


def open_cityscapes(
    root: Path, *, split: str = "val", resize: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> BenchDataset:
    """The protocol selection (every 5th sorted val image) as lazily loaded items."""
    root = Path(root)
    images = list_images(root, split)
    items = []
    for index, image in enumerate(every_kth(images, STEP)):
        labels, raw_ids = label_path(root, image, split)
        stem = image.name[: -len(IMAGE_SUFFIX)]
        items.append(DatasetItem(index=index, id=stem, load=partial(_load, image, labels, raw_ids, resize, max_pixels),
                                 path=image))
    description = {
        "root": str(root.resolve()),
        "split": split,
        "images_in_split": len(images),
        "selection": f"sorted {split} images, every {STEP}th (indices 0, {STEP}, ...)",
        "resize": resize,
    }
    manifest = root / "procedural.json"
    if manifest.is_file():  # procedural scenes written in this layout: their own classes
        name, classes = "cityscapes-layout-procedural", tuple(json.loads(manifest.read_text())["classes"])
        description["classes_from"] = str(manifest)
    else:
        name, classes = "cityscapes", train_classes()
        if split == "val" and len(images) != 500:
            description["warning"] = (
                f"Cityscapes val has 500 images; found {len(images)}, so the selection differs from the peers'"
            )
    return BenchDataset(name, classes, IGNORE_INDEX, tuple(items), description)


def selected_relative_paths(root: Path, split: str = "val") -> list[str]:
    """The selection as ``leftImg8bit/val/<city>/<file>`` strings (the form of ``cityscapes-val-100.txt``)."""
    root = Path(root)
    return [p.relative_to(root).as_posix() for p in every_kth(list_images(root, split), STEP)]
