"""Bench dataset readers: the peers' selections, label mappings, and clear errors for missing or mislaid data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.bench.datasets import DatasetError, open_dataset
from certseg.bench.datasets.cityscapes import label_ids_to_train_ids, open_cityscapes, selected_relative_paths
from certseg.bench.datasets.pascal_context import CLASSES as CONTEXT_CLASSES
from certseg.bench.datasets.pascal_context import context_labels, open_pascal_context
from certseg.bench.datasets.procedural_set import open_procedural
from certseg.engine.files.images import read_image
from certseg.training import scenes

from conftest import needs_cityscapesscripts


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def fake_cityscapes_val(root: Path, selected: list[str]) -> None:
    """500 empty val images (+ label files) whose sorted order puts the 100 reference images at 0, 5, …, 495."""
    for line in selected:
        image = root / line
        stem = image.name[: -len("_leftImg8bit.png")]
        for suffix in ("", "a", "b", "c", "d"):  # "_" < "a": the reference image sorts first, its 4 fillers next
            name = f"{stem}{suffix}"
            _touch(image.parent / f"{name}_leftImg8bit.png")
            _touch(root / "gtFine" / "val" / image.parent.name / f"{name}_gtFine_labelTrainIds.png")


@needs_cityscapesscripts
def test_cityscapes_selection_reproduces_the_reference_list(tmp_path: Path, reference: Path) -> None:
    selected = (reference / "cityscapes-val-100.txt").read_text().split()
    fake_cityscapes_val(tmp_path, selected)
    assert len(list((tmp_path / "leftImg8bit" / "val").glob("*/*.png"))) == 500
    assert selected_relative_paths(tmp_path) == selected
    dataset = open_cityscapes(tmp_path)  # lists without opening a file
    assert [item.index for item in dataset.items] == list(range(100))
    assert dataset.items[0].id == Path(selected[0]).name[: -len("_leftImg8bit.png")]
    assert dataset.num_classes == 19 and "warning" not in dataset.description
    assert len(dataset.take(20)) == 20
    with pytest.raises(DatasetError, match="only 100 images"):
        dataset.take(101)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tiny_cityscapes(root: Path, label_kind: str) -> np.ndarray:
    image = (np.arange(4 * 7 * 3) % 256).astype(np.uint8).reshape(4, 7, 3)
    _write_png(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", image)
    ids = np.array([[0, 7, 8, 26, 33, 34, 255]] * 4, dtype=np.uint8)
    _write_png(root / f"gtFine/val/aachen/aachen_000000_000019_gtFine_{label_kind}.png", ids)
    return ids


@needs_cityscapesscripts
def test_cityscapes_raw_label_ids_become_train_ids(tmp_path: Path) -> None:
    ids = _tiny_cityscapes(tmp_path, "labelIds")
    image, labels = open_cityscapes(tmp_path).items[0].load()
    assert image.shape == (3, 4, 7) and image.dtype == np.float32
    np.testing.assert_array_equal(image, read_image(next((tmp_path / "leftImg8bit").rglob("*.png"))))
    np.testing.assert_array_equal(labels[0], [255, 0, 1, 13, 18, 255, 255])
    np.testing.assert_array_equal(label_ids_to_train_ids(ids), labels)
    # A labelTrainIds file next to it wins (it is used as is).
    train_ids = tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    _write_png(train_ids, np.full((4, 7), 3, np.uint8))
    assert (open_cityscapes(tmp_path).items[0].load()[1] == 3).all()


@needs_cityscapesscripts
def test_cityscapes_errors_name_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*leftImg8bit/val/<city>"):
        open_cityscapes(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no leftImg8bit/val folder"):
        open_cityscapes(tmp_path)
    _tiny_cityscapes(tmp_path, "labelIds")
    with pytest.raises(DatasetError, match=f"inside the dataset; pass --root {tmp_path}"):
        open_cityscapes(tmp_path / "leftImg8bit")
    for label in (tmp_path / "gtFine").rglob("*.png"):
        label.unlink()
    with pytest.raises(DatasetError, match="no label map for aachen_000000_000019_leftImg8bit.png"):
        open_cityscapes(tmp_path)


def fake_pascal_context(root: Path, names: list[str], size: tuple[int, int] = (6, 9)) -> None:
    for i, name in enumerate(names):
        _write_png(root / "JPEGImages" / f"{name}.jpg", np.full((*size, 3), i % 256, np.uint8))
        _write_png(root / "SegmentationClassContext" / f"{name}.png", np.full(size, i % 60, np.uint8))
    listing = root / "ImageSets" / "SegmentationContext" / "val.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(reversed(names)) + "\n")  # unsorted on purpose


def test_pascal_context_every_51st_sorted_val_image_and_mask_minus_one(tmp_path: Path) -> None:
    names = [f"2008_{i:06d}" for i in range(103)]
    fake_pascal_context(tmp_path / "VOCdevkit" / "VOC2010", names)
    dataset = open_pascal_context(tmp_path)  # finds VOCdevkit/VOC2010
    assert [item.id for item in dataset.items] == [names[0], names[51], names[102]]
    assert len(CONTEXT_CLASSES) == 59 and dataset.num_classes == 59
    image, labels = dataset.items[1].load()
    assert image.shape == (3, 6, 9) and (labels == 50).all()  # mask 51 → class 50
    assert (dataset.items[0].load()[1] == 255).all()  # mask 0 (background) → ignored
    np.testing.assert_array_equal(context_labels(np.array([0, 1, 59, 255])), [255, 0, 58, 255])
    squashed, squashed_labels = open_pascal_context(tmp_path, resize=480).items[1].load()
    assert squashed.shape == (3, 480, 480) and squashed_labels.shape == (480, 480) and (squashed_labels == 50).all()


def test_pascal_context_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*JPEGImages"):
        open_pascal_context(tmp_path / "nowhere")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match="no 59-class label folder.*SegmentationClassContext"):
        open_pascal_context(tmp_path)
    with pytest.raises(DatasetError, match="not a 59-class"):
        context_labels(np.array([0, 1, 300]))
    with pytest.raises(DatasetError, match="inside the dataset"):
        open_pascal_context(tmp_path / "JPEGImages")


def test_procedural_scenes_are_held_out_and_match_their_png(tmp_path: Path) -> None:
    dataset = open_procedural(2, data_seed=5, size=(24, 48), write_to=tmp_path)
    assert [item.index for item in dataset.items] == [5, 6]
    assert not any(scenes.is_train_seed(scenes.held_out_seed(item.index)) for item in dataset.items)
    image, labels = dataset.items[0].load()
    assert image.shape == (3, 24, 48) and labels.shape == (24, 48)
    np.testing.assert_array_equal(image, read_image(dataset.items[0].path))  # bit-identical to certify's input
    written = open_dataset("cityscapes", tmp_path, images=1)  # the written folder reads back, procedural classes
    assert written.classes == scenes.CLASSES
    np.testing.assert_array_equal(written.items[0].load()[1], labels)


@needs_cityscapesscripts
def test_open_dataset_defaults_detection_and_errors(tmp_path: Path) -> None:
    assert open_dataset(None, None, images=3, scene_size=(8, 16)).name == "procedural"
    _tiny_cityscapes(tmp_path / "cs", "labelIds")
    assert open_dataset(None, tmp_path / "cs", images=1).name == "cityscapes"
    fake_pascal_context(tmp_path / "pc", ["a"])
    assert open_dataset(None, tmp_path / "pc", images=1).name == "pascal-context"
    with pytest.raises(DatasetError, match="cannot tell which dataset"):
        open_dataset(None, tmp_path, images=1)
    with pytest.raises(DatasetError, match="needs --root"):
        open_dataset("cityscapes", None, images=1)
    with pytest.raises(DatasetError, match="takes no --root"):
        open_dataset("procedural", tmp_path, images=1)
    with pytest.raises(DatasetError, match="procedural dataset only"):
        open_dataset("cityscapes", tmp_path / "cs", images=1, write_data=tmp_path / "x")
