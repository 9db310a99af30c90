"""Streaming per-pixel counts for Algorithm 1, without ever materialising one-hot maps.

Selection keeps one small counter per (class, pixel): (K + 1) x H x W bytes for n0 <= 255, the extra row for
the invalid label K. Estimation keeps only the agreements with the guess: one counter per pixel.

The invalid label K (a sample whose model output was non-finite at that pixel, see ``certseg.engine.maths.stages``)
fails closed: it never becomes a guess (the mode is taken over the K real classes) and never equals one, so
it can only count as a disagreement. Both counters tally it, for the record and for ``--non-finite fail``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certseg.engine.labels import label_numpy_dtype


def _counter_dtype(max_count: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _as_label_batch(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape[1:] != shape:
        raise ValueError(f"label maps have shape {labels.shape[1:]}, expected {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label maps must be integers, got dtype {labels.dtype}")
    return labels


@dataclass
class InvalidTally:
    """How many samples, and (sample, pixel) pairs, carried the invalid label K."""

    samples: int = 0
    pixel_samples: int = 0

    def add(self, label_map: np.ndarray, num_classes: int, largest: int) -> None:
        """Count one map's invalid pixels; ``largest`` is its maximum label (already computed by the caller)."""
        if largest > num_classes:
            raise ValueError(f"label {largest} > num_classes={num_classes} (the invalid label is {num_classes})")
        if largest == num_classes:
            self.samples += 1
            self.pixel_samples += int(np.count_nonzero(label_map == num_classes))


class ModeCounter:
    """Per-pixel class histogram over the n0 selection samples; ``mode()`` breaks ties toward the lowest class id."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], max_samples: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.num_pixels = int(np.prod(self.shape))
        self.max_samples = max_samples
        self.counts = np.zeros((num_classes + 1, self.num_pixels), dtype=_counter_dtype(max_samples))
        """Rows 0..K-1: votes per class; row K: invalid samples at that pixel."""
        self.num_samples = 0
        self.invalid = InvalidTally()
        self._pixel = np.arange(self.num_pixels, dtype=np.intp)

    def update(self, labels: np.ndarray) -> None:
        labels = _as_label_batch(labels, self.shape)
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} selection samples")
        flat_counts = self.counts.reshape(-1)
        for label_map in labels.reshape(len(labels), -1):
            if label_map.size:
                self.invalid.add(label_map, self.num_classes, int(label_map.max()))
            # Each pixel appears once per map, so the fancy-indexed increment has no duplicate indices.
            flat_counts[label_map.astype(np.intp) * self.num_pixels + self._pixel] += 1
        self.num_samples += len(labels)

    def mode(self) -> np.ndarray:
        """Most frequent real class per pixel (argmax returns the first maximum, i.e. the lowest class id).

        Invalid votes are left out, so the guess is always a class; a pixel whose every selection sample was
        invalid gets class 0, which the estimation samples then have to confirm on their own.
        """
        if self.num_samples == 0:
            raise ValueError("no selection samples were counted")
        guess = self.counts[: self.num_classes].argmax(axis=0)
        return guess.astype(label_numpy_dtype(self.num_classes)).reshape(self.shape)


class AgreementCounter:
    """Per-pixel number of estimation samples whose label equals the guess (the invalid label K never does)."""

    def __init__(self, guess: np.ndarray, max_samples: int, num_classes: int) -> None:
        self.guess = np.asarray(guess)
        if self.guess.size and int(self.guess.max()) >= num_classes:
            raise ValueError(f"guess holds {int(self.guess.max())}, not a class of {num_classes}")
        self.num_classes = num_classes
        self.shape = self.guess.shape
        self.max_samples = max_samples
        self.agree = np.zeros(self.shape, dtype=_counter_dtype(max_samples))
        self.num_samples = 0
        self.invalid = InvalidTally()

    def update(self, labels: np.ndarray) -> None:
        labels = _as_label_batch(labels, self.shape)
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} estimation samples")
        for label_map in labels:
            if label_map.size:
                self.invalid.add(label_map, self.num_classes, int(label_map.max()))
            self.agree += label_map == self.guess
        self.num_samples += len(labels)
