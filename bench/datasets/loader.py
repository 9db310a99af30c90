"""Pick the bench dataset from ``--dataset`` / ``--root``: the procedural scenes unless a real dataset is given."""

from __future__ import annotations

from pathlib import Path

from certseg.bench.datasets.common import BenchDataset, DatasetError
from certseg.engine.choices import Dataset, choice
from certseg.engine.limits import DEFAULT_MAX_PIXELS, check_pixel_limit


def detect(root: Path) -> Dataset:
    """Which real dataset a ``--root`` folder holds, from its layout."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"--root {root} does not exist")
    if (root / "leftImg8bit").is_dir() or root.name in ("leftImg8bit", "gtFine"):
        return Dataset.cityscapes
    if any((root / sub / "JPEGImages").is_dir() for sub in (".", "VOCdevkit/VOC2010", "VOC2010")):
        return Dataset.pascal_context
    raise DatasetError(
        f"cannot tell which dataset {root} holds: expected Cityscapes (ROOT/leftImg8bit/val, ROOT/gtFine/val) or "
        "Pascal-Context (ROOT/JPEGImages, ROOT/SegmentationClassContext); name it with --dataset"
    )


def open_dataset(
    name: Dataset | str | None,
    root: Path | None,
    *,
    images: int,
    data_seed: int = 0,
    scene_size: tuple[int, int] | None = None,
    write_data: Path | None = None,
    resize: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> BenchDataset:
    """The dataset's protocol selection; procedural when neither ``name`` nor ``root`` is given.

    Images and label maps with more than ``max_pixels`` pixels are refused from their header (procedural
    scenes: from ``scene_size``) before they are decoded or rendered.
    """
    if name is None:
        name = Dataset.procedural if root is None else detect(root)
    name = choice(Dataset, name, "dataset", DatasetError)
    if name != Dataset.procedural and (write_data is not None or scene_size is not None):
        raise DatasetError("--write-data and --scene-size apply to the procedural dataset only")
    if name == Dataset.procedural:
        from certseg.bench.datasets.procedural_set import open_procedural
        from certseg.training.architectures import SCENE_SIZE

        if root is not None:
            raise DatasetError(
                "the procedural dataset is rendered in memory and takes no --root (use --write-data DIR to save it, "
                "then --dataset cityscapes --root DIR to read it back)"
            )
        if resize is not None:
            raise DatasetError("--resize applies to real datasets (Pascal-Context: --resize 480); use --scene-size")
        size = scene_size or SCENE_SIZE
        check_pixel_limit(size[1], size[0], max_pixels, source="--scene-size")
        return open_procedural(images, data_seed=data_seed, size=size, write_to=write_data)
    if root is None:
        raise DatasetError(f"--dataset {name} needs --root (the folder holding the dataset)")
    if name == Dataset.cityscapes:
        from certseg.bench.datasets.cityscapes import open_cityscapes

        return open_cityscapes(root, resize=resize, max_pixels=max_pixels)
    from certseg.bench.datasets.pascal_context import open_pascal_context

    return open_pascal_context(root, resize=resize, max_pixels=max_pixels)
