"""Streaming counts against brute force (scipy's mode breaks ties toward the smallest value, like ours)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from certseg.engine.core.counting import AgreementCounter, ModeCounter


@pytest.mark.parametrize("num_classes, n0", [(3, 10), (19, 10), (256, 7), (4, 300)])
def test_mode_matches_scipy_including_ties(num_classes: int, n0: int) -> None:
    rng = np.random.default_rng(num_classes)
    # Few distinct values per pixel so ties are frequent.
    labels = rng.integers(0, min(num_classes, 4), size=(n0, 9, 11)) * (num_classes // 4 or 1)
    labels = labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
    counter = ModeCounter(num_classes, (9, 11), max_samples=n0)
    for chunk in np.array_split(labels, 3):
        counter.update(chunk)
    expected = stats.mode(labels, axis=0, keepdims=False).mode
    np.testing.assert_array_equal(counter.mode(), expected)
    assert counter.num_samples == n0


def test_mode_counter_memory_is_one_byte_per_class_and_pixel() -> None:
    counter = ModeCounter(19, (1024, 2048), max_samples=10)
    assert counter.counts.nbytes == (19 + 1) * 1024 * 2048  # the K classes and the invalid label K


def test_mode_counter_refuses_out_of_range_labels_and_extra_samples() -> None:
    counter = ModeCounter(3, (2, 2), max_samples=2)
    with pytest.raises(ValueError, match="num_classes"):
        counter.update(np.full((1, 2, 2), 4, dtype=np.uint8))  # K = 3 is the invalid label, 4 is nothing
    counter.update(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="more than"):
        counter.update(np.zeros((1, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        ModeCounter(3, (2, 2), 5).update(np.zeros((1, 3, 2), dtype=np.uint8))


def test_agreements_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    guess = rng.integers(0, 5, size=(13, 17))
    labels = rng.integers(0, 5, size=(300, 13, 17)).astype(np.uint8)
    counter = AgreementCounter(guess, max_samples=300, num_classes=5)
    for chunk in np.array_split(labels, 7):
        counter.update(chunk)
    np.testing.assert_array_equal(counter.agree, (labels == guess).sum(axis=0))
    assert counter.agree.dtype == np.uint16


def test_invalid_label_never_becomes_the_guess_and_is_tallied() -> None:
    """K marks a non-finite output: the mode is over the real classes only, however many K votes there are."""
    num_classes = 4
    labels = np.array([[[4, 2]], [[4, 2]], [[4, 4]], [[1, 4]]], dtype=np.uint8)  # (n0=4, 1, 2)
    counter = ModeCounter(num_classes, (1, 2), max_samples=4)
    counter.update(labels)
    np.testing.assert_array_equal(counter.mode(), [[1, 2]])  # pixel 0: 3 invalid votes, 1 vote for class 1
    assert (counter.invalid.samples, counter.invalid.pixel_samples) == (4, 5)
    all_invalid = ModeCounter(num_classes, (1, 1), max_samples=2)
    all_invalid.update(np.full((2, 1, 1), num_classes, dtype=np.uint8))
    assert all_invalid.mode()[0, 0] < num_classes


def test_invalid_label_never_agrees_and_is_tallied() -> None:
    num_classes = 3
    guess = np.array([[0, 1, 2]])
    labels = np.array([[[0, 3, 3]], [[3, 1, 2]], [[0, 1, 2]]], dtype=np.uint8)
    counter = AgreementCounter(guess, max_samples=4, num_classes=num_classes)
    counter.update(labels)
    np.testing.assert_array_equal(counter.agree, [[2, 2, 2]])
    assert (counter.invalid.samples, counter.invalid.pixel_samples) == (2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        counter.update(np.full((1, 1, 3), 4, dtype=np.uint8))
    with pytest.raises(ValueError, match="not a class"):
        AgreementCounter(np.array([[3]]), max_samples=1, num_classes=num_classes)
