"""Certified segmentation metrics exactly as the published evaluations compute them.

One confusion matrix accumulated over the whole image set, rows = ground-truth class (K), columns = predicted
class plus one abstain column (K + 1); ignore pixels are dropped. Certified accuracy = correct non-abstained /
non-ignored pixels; mIoU = mean over the K real classes of tp / (gt + pred - tp) where classes absent from
both count 0 (the abstain column is not a class: averaging K + 1 entries is a known trap); abstain % is the
per-image fraction of abstained pixels over *all* pixels (void included), averaged over images.

That mIoU is the peers' dataset-level convention (``certseg-bench``): over a whole set every class occurs. For
one image (``certseg certify --labels``) it would count every class the image does not show as 0, so a perfect
map of an image with 2 of 8 classes would score 0.25; there ``mean_iou_present`` averages over the classes
present in the labels or the prediction (``PER_IMAGE_MIOU`` names that convention in results).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from certseg.engine.errors import InputError

PER_IMAGE_MIOU = "classes present in labels or prediction"
DATASET_MIOU = "all classes, absent ones count 0"


def check_target(target: np.ndarray, num_classes: int, ignore_index: int, source: object = "labels") -> None:
    """Raise (one line) unless every label is a class 0..K-1 or ``ignore_index``."""
    target = np.asarray(target)
    values = target[target != ignore_index]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise InputError(
            f"{source}: label values must be classes 0..{num_classes - 1} or ignore={ignore_index}, "
            f"got {int(values.min())}..{int(values.max())}"
        )


@dataclass
class CertifiedMetrics:
    num_classes: int
    ignore_index: int = 255
    confusion: np.ndarray = field(init=False)
    abstain_fractions: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    @property
    def abstain_label(self) -> int:
        return self.num_classes

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Add one image: ``prediction`` holds classes 0..K-1 or the abstain label K; ``target`` classes or ignore."""
        prediction = np.asarray(prediction)
        target = np.asarray(target)
        if prediction.shape != target.shape:
            raise InputError(f"prediction and label shapes differ: {prediction.shape} vs {target.shape}")
        if prediction.size and (prediction.min() < 0 or prediction.max() > self.abstain_label):
            raise InputError(f"predictions must lie in [0, {self.abstain_label}] (K classes + abstain)")
        self.abstain_fractions.append(float(np.mean(prediction == self.abstain_label)) if prediction.size else 0.0)
        check_target(target, self.num_classes, self.ignore_index, "label map")
        keep = target != self.ignore_index
        gt = target[keep].astype(np.int64)
        pred = prediction[keep].astype(np.int64)
        width = self.num_classes + 1
        self.confusion += np.bincount(gt * width + pred, minlength=self.num_classes * width).reshape(
            self.num_classes, width
        )

    @property
    def certified_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion[:, : self.num_classes]) / total) if total else 0.0

    @property
    def per_class_iou(self) -> np.ndarray:
        tp = np.diag(self.confusion[:, : self.num_classes]).astype(np.float64)
        gt = self.confusion.sum(axis=1).astype(np.float64)
        pred = self.confusion[:, : self.num_classes].sum(axis=0).astype(np.float64)
        union = gt + pred - tp
        return np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)

    @property
    def present_classes(self) -> np.ndarray:
        """Classes that occur in the labels or the (non-abstained) prediction on the evaluated pixels."""
        gt = self.confusion.sum(axis=1)
        pred = self.confusion[:, : self.num_classes].sum(axis=0)
        return np.flatnonzero((gt + pred) > 0)

    @property
    def mean_iou(self) -> float:
        """The dataset convention: mean over all K classes, absent ones counting 0."""
        return float(self.per_class_iou.mean())

    @property
    def mean_iou_present(self) -> float:
        """The per-image convention: mean over ``present_classes`` (NaN when no evaluated pixel has a class)."""
        present = self.present_classes
        return float(self.per_class_iou[present].mean()) if present.size else float("nan")

    @property
    def abstain_percent(self) -> float:
        return 100.0 * float(np.mean(self.abstain_fractions)) if self.abstain_fractions else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "certified_accuracy": self.certified_accuracy,
            "mean_iou": self.mean_iou,
            "abstain_percent": self.abstain_percent,
            "num_images": len(self.abstain_fractions),
        }
