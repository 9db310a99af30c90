"""Streaming per-pixel counts for Algorithm 1, without ever materialising one-hot maps.

Selection keeps one small counter per (class, pixel): K x H x W bytes for n0 <= 255. Estimation keeps only
the agreements with the guess: one counter per pixel.
"""

from __future__ import annotations

import numpy as np


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


class ModeCounter:
    """Per-pixel class histogram over the n0 selection samples; ``mode()`` breaks ties toward the lowest class id."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], max_samples: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.num_pixels = int(np.prod(self.shape))
        self.max_samples = max_samples
        self.counts = np.zeros((num_classes, self.num_pixels), dtype=_counter_dtype(max_samples))
        self.num_samples = 0
        self._pixel = np.arange(self.num_pixels, dtype=np.intp)

    def update(self, labels: np.ndarray) -> None:
        labels = _as_label_batch(labels, self.shape)
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} selection samples")
        flat_counts = self.counts.reshape(-1)
        for label_map in labels.reshape(len(labels), -1):
            if label_map.size and int(label_map.max()) >= self.num_classes:
                raise ValueError(f"label {int(label_map.max())} >= num_classes={self.num_classes}")
            # Each pixel appears once per map, so the fancy-indexed increment has no duplicate indices.
            flat_counts[label_map.astype(np.intp) * self.num_pixels + self._pixel] += 1
        self.num_samples += len(labels)

    def mode(self) -> np.ndarray:
        """Most frequent class per pixel (argmax returns the first maximum, i.e. the lowest class id)."""
        if self.num_samples == 0:
            raise ValueError("no selection samples were counted")
        guess = self.counts.argmax(axis=0)
        return guess.astype(np.uint8 if self.num_classes <= 256 else np.uint16).reshape(self.shape)


class AgreementCounter:
    """Per-pixel number of estimation samples whose label equals the guess."""

    def __init__(self, guess: np.ndarray, max_samples: int) -> None:
        self.guess = np.asarray(guess)
        self.shape = self.guess.shape
        self.max_samples = max_samples
        self.agree = np.zeros(self.shape, dtype=_counter_dtype(max_samples))
        self.num_samples = 0

    def update(self, labels: np.ndarray) -> None:
        labels = _as_label_batch(labels, self.shape)
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} estimation samples")
        for label_map in labels:
            self.agree += label_map == self.guess
        self.num_samples += len(labels)
