"""Certified metrics: closed-form cases and a pixel-by-pixel recount of the published definitions."""

from __future__ import annotations

import numpy as np
import pytest

from certseg.engine.core.metrics import CertifiedMetrics
from certseg.engine.errors import InputError


def test_closed_form_case() -> None:
    # K = 3, abstain = 3, ignore = 255.
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = np.array([[0, 3, 1, 0], [3, 3, 1, 3]])
    metrics = CertifiedMetrics(3)
    metrics.update(prediction, target)
    # Non-ignored: 6 pixels, correct: (0,0) and (0,2) -> 2/6.
    assert metrics.certified_accuracy == pytest.approx(2 / 6)
    # IoU class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 1, gt 2, pred 1 -> 1/2; class 2: tp 0 -> 0.
    np.testing.assert_allclose(metrics.per_class_iou, [1 / 3, 1 / 2, 0.0])
    assert metrics.mean_iou == pytest.approx((1 / 3 + 1 / 2) / 3)
    # Abstain % counts void pixels too: 4 of 8.
    assert metrics.abstain_percent == pytest.approx(50.0)


def test_absent_classes_count_zero_and_abstain_is_not_a_class() -> None:
    metrics = CertifiedMetrics(4)
    metrics.update(np.array([0, 0, 4]), np.array([0, 0, 0]))
    # Only class 0 is present: IoU 2/3; classes 1..3 absent count 0; mean over K = 4 (not K + 1 = 5).
    assert metrics.mean_iou == pytest.approx((2 / 3) / 4)


def test_matches_a_pixel_by_pixel_recount_over_several_images() -> None:
    rng = np.random.default_rng(0)
    num_classes = 5
    metrics = CertifiedMetrics(num_classes)
    pairs = []
    for _ in range(4):
        target = rng.integers(0, num_classes, size=(7, 9))
        target[rng.random(target.shape) < 0.1] = 255
        prediction = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, num_classes + 1, target.shape))
        prediction[target == 255] = rng.integers(0, num_classes + 1, (target == 255).sum())
        metrics.update(prediction, target)
        pairs.append((prediction.ravel(), target.ravel()))
    tp = np.zeros(num_classes)
    gt = np.zeros(num_classes)
    pred = np.zeros(num_classes)
    correct = valid = 0
    for prediction, target in pairs:
        for p, t in zip(prediction, target, strict=True):
            if t == 255:
                continue
            valid += 1
            gt[t] += 1
            if p < num_classes:
                pred[p] += 1
            if p == t:
                tp[t] += 1
                correct += 1
    assert metrics.certified_accuracy == pytest.approx(correct / valid)
    assert metrics.mean_iou == pytest.approx(np.mean(tp / (gt + pred - tp)))
    expected_abstain = np.mean([np.mean(p == num_classes) for p, _ in pairs]) * 100
    assert metrics.abstain_percent == pytest.approx(expected_abstain)


def test_bad_inputs_are_refused() -> None:
    metrics = CertifiedMetrics(3)
    with pytest.raises(InputError, match="shapes differ"):
        metrics.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(InputError, match="predictions"):
        metrics.update(np.full((2, 2), 4), np.zeros((2, 2), int))
    with pytest.raises(InputError, match="label values"):
        metrics.update(np.zeros((2, 2), int), np.full((2, 2), 7))


def test_one_image_miou_averages_the_classes_present_in_labels_or_prediction() -> None:
    """8 classes, an image showing 2: a perfect map scores 1 (the dataset convention would say 2/8 = 0.25)."""
    target = np.array([[0, 0, 1, 1], [0, 1, 255, 255]])
    metrics = CertifiedMetrics(8)
    metrics.update(np.where(target == 255, 2, target), target)  # whatever is predicted on ignored pixels
    assert metrics.mean_iou_present == 1.0 and metrics.mean_iou == pytest.approx(0.25)
    # A wrong class 3 on one pixel of class 0, an abstention (8) on one of class 1: present are 0, 1 and 3.
    prediction = np.array([[0, 3, 1, 1], [0, 8, 5, 5]])  # class 5 only on ignored pixels: not present
    metrics = CertifiedMetrics(8)
    metrics.update(prediction, target)
    assert metrics.present_classes.tolist() == [0, 1, 3]
    iou_0, iou_1, iou_3 = 2 / 3, 2 / 3, 0.0  # class 0: tp 2, gt 3, pred 2; class 1: tp 2, gt 3, pred 2
    assert metrics.mean_iou_present == pytest.approx((iou_0 + iou_1 + iou_3) / 3)
    assert metrics.mean_iou == pytest.approx((iou_0 + iou_1) / 8)


def test_certify_reports_the_per_image_convention_and_keeps_the_dataset_one() -> None:
    from certseg.engine.commands.certify_command import image_metrics

    target = np.array([[0, 0], [1, 1]])
    report = image_metrics(target.astype(np.uint8), target, num_classes=8, ignore_index=255)
    assert report["mean_iou"] == 1.0 and report["mean_iou_convention"] == "classes present in labels or prediction"
    assert report["mean_iou_all_classes"] == pytest.approx(0.25)
    assert report["classes_present"] == [0, 1] and len(report["per_class_iou"]) == 8
