"""Streaming counts against brute force (scipy's mode breaks ties toward the smallest value, like ours)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


# ---------------------------------------------------------------- label batches as torch tensors (device counts)
def _random_labels(num_classes: int, samples: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Few distinct values (frequent ties), the invalid label K at random (sample, pixel) pairs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, min(num_classes, 3), size=(samples, *shape)) * (num_classes // 3 or 1)
    labels[rng.random(labels.shape) < 0.15] = num_classes
    return labels.astype(np.uint8 if num_classes < 256 else np.uint16)


@pytest.mark.parametrize("num_classes, n0", [(3, 10), (19, 10), (255, 7)])
def test_mode_counter_on_tensors_equals_the_numpy_counts(num_classes: int, n0: int) -> None:
    labels = _random_labels(num_classes, n0, (9, 11), seed=num_classes)
    host, device = ModeCounter(num_classes, (9, 11), n0), ModeCounter(num_classes, (9, 11), n0)
    for chunk in np.array_split(labels, 3):
        host.update(chunk)
        device.update(torch.from_numpy(chunk.astype(np.int64 if num_classes == 255 else chunk.dtype)))
    assert device.device == torch.device("cpu") and host.device is None
    np.testing.assert_array_equal(device.counts, host.counts)
    assert device.counts.dtype == host.counts.dtype
    np.testing.assert_array_equal(device.mode(), host.mode())
    assert device.mode().dtype == host.mode().dtype
    # Independent reference: the mode over the real classes (K left out), ties toward the lowest class.
    votes = np.stack([(labels == c).sum(axis=0) for c in range(num_classes)])
    np.testing.assert_array_equal(device.mode(), votes.argmax(axis=0))
    assert (device.invalid.samples, device.invalid.pixel_samples) == (host.invalid.samples, host.invalid.pixel_samples)
    assert device.invalid.pixel_samples == int((labels == num_classes).sum()) > 0
    torch.testing.assert_close(device.guess_tensor, torch.from_numpy(host.mode().astype(np.int64)))


def test_agreement_counter_on_tensors_equals_the_numpy_counts() -> None:
    num_classes, n = 5, 300
    labels = _random_labels(num_classes, n, (13, 17), seed=4)
    guess = np.random.default_rng(5).integers(0, num_classes, size=(13, 17))
    host = AgreementCounter(guess, max_samples=n, num_classes=num_classes)
    device = AgreementCounter(guess, max_samples=n, num_classes=num_classes)
    on_device_guess = AgreementCounter(guess, max_samples=n, num_classes=num_classes,
                                       device_guess=torch.from_numpy(guess))
    for chunk in np.array_split(labels, 7):
        host.update(chunk)
        device.update(torch.from_numpy(chunk))
        on_device_guess.update(torch.from_numpy(chunk))
    np.testing.assert_array_equal(device.agree, (labels == guess).sum(axis=0))
    np.testing.assert_array_equal(device.agree, host.agree)
    np.testing.assert_array_equal(on_device_guess.agree, host.agree)
    assert device.agree.dtype == host.agree.dtype == np.uint16
    assert (device.invalid.samples, device.invalid.pixel_samples) == (host.invalid.samples, host.invalid.pixel_samples)


def test_invalid_label_on_tensors_never_becomes_the_guess_nor_agrees() -> None:
    num_classes = 4
    counter = ModeCounter(num_classes, (1, 2), max_samples=4)
    counter.update(torch.tensor([[[4, 2]], [[4, 2]], [[4, 4]], [[1, 4]]], dtype=torch.uint8))
    np.testing.assert_array_equal(counter.mode(), [[1, 2]])
    assert (counter.invalid.samples, counter.invalid.pixel_samples) == (4, 5)
    agreement = AgreementCounter(np.array([[0, 1, 2]]), max_samples=3, num_classes=3)
    agreement.update(torch.tensor([[[0, 3, 3]], [[3, 1, 2]], [[0, 1, 2]]], dtype=torch.uint8))
    np.testing.assert_array_equal(agreement.agree, [[2, 2, 2]])
    assert (agreement.invalid.samples, agreement.invalid.pixel_samples) == (2, 3)


def test_out_of_range_labels_on_tensors_raise_when_the_counts_are_read() -> None:
    """A device batch is not read back per batch, so the range check fires at the read, before any use."""
    counter = ModeCounter(3, (2, 2), max_samples=2)
    counter.update(torch.full((1, 2, 2), 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_classes"):
        counter.mode()
    with pytest.raises(ValueError, match="num_classes"):
        _ = counter.invalid.samples
    negative = AgreementCounter(np.zeros((2, 2), dtype=np.uint8), max_samples=1, num_classes=3)
    negative.update(torch.full((1, 2, 2), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match="< 0"):
        _ = negative.agree
    with pytest.raises(ValueError, match="more than"):
        negative.update(torch.zeros((1, 2, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="integers"):
        ModeCounter(3, (2, 2), 1).update(torch.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        ModeCounter(3, (2, 2), 1).update(torch.zeros((1, 3, 2), dtype=torch.uint8))


def test_tensor_batches_are_counted_without_reading_them_back() -> None:
    """On the meta device nothing can be read: updates pass, so they never bring a value back per batch."""
    counter = ModeCounter(19, (8, 16), max_samples=10)
    agreement = AgreementCounter(np.zeros((8, 16), dtype=np.uint8), max_samples=100, num_classes=19)
    for _ in range(2):
        counter.update(torch.empty((5, 8, 16), dtype=torch.uint8, device="meta"))
    for _ in range(4):
        agreement.update(torch.empty((25, 8, 16), dtype=torch.uint8, device="meta"))
    assert counter.num_samples == 10 and agreement.num_samples == 100
    assert counter.device == agreement.device == torch.device("meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        counter.mode()  # reading is where the one transfer happens


def test_a_counter_keeps_the_kind_of_its_first_batch() -> None:
    """Mixed batches are moved to where the counts are; the counts are identical either way."""
    labels = _random_labels(6, 6, (4, 5), seed=9)
    reference = ModeCounter(6, (4, 5), 6)
    reference.update(labels)
    host_first, tensor_first = ModeCounter(6, (4, 5), 6), ModeCounter(6, (4, 5), 6)
    host_first.update(labels[:3])
    host_first.update(torch.from_numpy(labels[3:]))
    tensor_first.update(torch.from_numpy(labels[:3]))
    tensor_first.update(labels[3:])
    assert host_first.device is None and tensor_first.device == torch.device("cpu")
    np.testing.assert_array_equal(host_first.counts, reference.counts)
    np.testing.assert_array_equal(tensor_first.counts, reference.counts)
