"""Cityscapes against its own tools (cityscapesscripts, the ``bench`` extra): the label table certseg reads and the
copies the engine keeps, and the bench's confusion-matrix metrics against the official pixel-level evaluator on
certified label maps of scenes written in Cityscapes layout by ``certseg-bench --write-data``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from certseg.bench import cli
from certseg.bench.datasets import DatasetError
from certseg.bench.datasets import cityscapes as reader
from certseg.bench.results import load_entries
from certseg.bench.tables import aggregate
from certseg.engine.core.metrics import CertifiedMetrics
from certseg.engine.files.images import default_palette
from certseg.engine.files.outputs import CITYSCAPES_CLASSES
from certseg.training import scenes

from conftest import needs_cityscapesscripts

PROCEDURAL_AS_CITYSCAPES = {"vehicle": "car"}
"""Procedural classes are Cityscapes classes by name, except ``vehicle``, scored as Cityscapes' car."""


@pytest.fixture()
def fresh_table():
    """The label table is cached per process: recompute it inside the test and again after it."""
    reader.train_classes.cache_clear()
    reader.id_lut.cache_clear()
    yield
    reader.train_classes.cache_clear()
    reader.id_lut.cache_clear()


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_without_cityscapesscripts_real_cityscapes_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_table: None
) -> None:
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)  # as if not installed
    _write_png(tmp_path / "leftImg8bit/val/x/x_0_0_leftImg8bit.png", np.zeros((4, 8, 3), np.uint8))
    _write_png(tmp_path / "gtFine/val/x/x_0_0_gtFine_labelIds.png", np.zeros((4, 8), np.uint8))
    with pytest.raises(DatasetError) as error:
        reader.open_cityscapes(tmp_path)
    assert "\n" not in str(error.value) and "pip install 'certseg[bench]'" in str(error.value)
    written = reader.open_cityscapes(_procedural_layout(tmp_path / "procedural", 1, (8, 16)))  # needs no table
    assert written.classes == scenes.CLASSES


@needs_cityscapesscripts
def test_the_engine_copies_match_the_official_table(fresh_table: None) -> None:
    from cityscapesscripts.helpers.labels import labels, trainId2label

    assert reader.train_classes() == CITYSCAPES_CLASSES
    official_colours = [trainId2label[train_id].color for train_id in range(19)]
    np.testing.assert_array_equal(default_palette(19), official_colours)
    for label in labels:  # every raw id the label files can hold
        if label.id >= 0:
            assert reader.label_ids_to_train_ids(np.array([label.id]))[0] == (
                255 if label.ignoreInEval else label.trainId), label.name


def _procedural_layout(root: Path, count: int, size: tuple[int, int]) -> Path:
    scenes.write_cityscapes_layout(root, num_images=count, height=size[0], width=size[1])
    return root


@needs_cityscapesscripts
def test_bench_metrics_equal_the_official_pixel_level_evaluator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Certified maps of scenes written by --write-data, scored by certseg-bench and by cityscapesscripts'
    evalPixelLevelSemanticLabeling. For the official tool, classes become Cityscapes label ids, ignore becomes
    ``unlabeled`` (id 0) in the ground truth, and an abstention becomes ``unlabeled`` in the prediction: a miss for
    the true class and a hit for none, the convention of ``certseg.engine.core.metrics``."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import name2label

    data, out = tmp_path / "data", tmp_path / "bench"
    result = CliRunner().invoke(cli.app, cli.expand_multi_values([
        "--images", "4", "--scene-size", "64x128", "--write-data", str(data), "--method", "segcertify",
        "--sigma", "0.25", "--n0", "4", "--n", "60", "--alpha", "0.05", "--seed", "11", "--save-labels",
        "--out", str(out), "--quiet"]))
    assert result.exit_code == 0, result.output
    _, entries = load_entries(out / "results.jsonl")
    num_classes = len(scenes.CLASSES)
    to_id = np.full(256, 0, dtype=np.uint8)  # ignore (255) and abstain (K) -> unlabeled
    for train_id, name in enumerate(scenes.CLASSES):
        to_id[train_id] = name2label[PROCEDURAL_AS_CITYSCAPES.get(name, name)].id

    predictions, truths = [], []
    for entry in entries:
        stem = entry["image"]
        certified = np.asarray(Image.open(out / "labels" / f"{stem}__segcertify_sigma0.25_scale1_engine.png"))
        target = np.asarray(Image.open(data / "gtFine/val" / scenes.CITY / f"{stem}_gtFine_labelTrainIds.png"))
        predictions.append(tmp_path / "official" / f"{stem}_pred.png")
        truths.append(tmp_path / "official" / f"{stem}_gtFine_labelIds.png")
        _write_png(predictions[-1], to_id[certified])
        _write_png(truths[-1], to_id[target])
    for name, value in {"evalInstLevelScore": False, "JSONOutput": False, "quiet": True}.items():
        monkeypatch.setattr(official.args, name, value)
    scores = official.evaluateImgLists([str(p) for p in predictions], [str(p) for p in truths], official.args)

    [row] = aggregate(entries)
    bench = CertifiedMetrics(num_classes)
    bench.confusion = np.sum([np.asarray(e["confusion"]) for e in entries], axis=0)
    assert bench.confusion[:, num_classes].sum() > 0 and row.accuracy < 1  # abstentions and errors: a real check
    assert len(bench.present_classes) == num_classes  # so the official mean (over scored classes) is over all K
    for train_id, name in enumerate(scenes.CLASSES):
        official_iou = scores["classScores"][PROCEDURAL_AS_CITYSCAPES.get(name, name)]
        assert official_iou == pytest.approx(bench.per_class_iou[train_id], abs=1e-12), name
    assert scores["averageScoreClasses"] == pytest.approx(row.mean_iou, abs=1e-12)
    matrix = np.asarray(scores["confMatrix"])
    scored = [to_id[train_id] for train_id in range(num_classes)]
    correct, total = matrix[scored, scored].sum(), matrix[scored].sum()
    assert correct / total == pytest.approx(row.accuracy, abs=1e-12)
    print(f"official vs bench: mIoU {scores['averageScoreClasses']:.6f} / {row.mean_iou:.6f}, accuracy "
          f"{correct / total:.6f} / {row.accuracy:.6f}, per class "
          + ", ".join(f"{n} {bench.per_class_iou[i]:.4f}" for i, n in enumerate(scenes.CLASSES)))
