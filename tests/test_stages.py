"""Stage maths that was rewritten for memory: the same values as the plain batched expressions it replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from certseg.engine.maths.stages import Normalization, argmax_or_invalid, labels_from_logits, normalize


def batched_reference(logits: torch.Tensor, size: tuple[int, int], valid: torch.Tensor | None) -> torch.Tensor:
    """The whole batch at once: upsample all scores, argmax, K where an upsampled score sum is non-finite."""
    num_classes = logits.shape[1]
    up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    labels = up.argmax(dim=1).to(torch.uint8 if num_classes <= 255 else torch.int32)
    total = F.interpolate(logits.float().sum(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False)
    invalid = ~torch.isfinite(total[:, 0])
    if valid is not None:
        invalid |= ~valid.reshape(-1, 1, 1)
    return labels.masked_fill(invalid, num_classes)


@pytest.mark.parametrize("num_classes", [5, 300])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_labels_equal_the_batched_ones(num_classes: int, channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, num_classes, 6, 9, generator=generator)
    logits[1, 2, 3, 4] = float("nan")
    logits[2, 0, 0, 0] = float("inf")
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    valid = torch.tensor([True, True, True, False])
    for mask in (None, valid):
        labels = labels_from_logits(logits, (13, 20), mask)
        expected = batched_reference(logits, (13, 20), mask)
        assert labels.dtype == expected.dtype and labels.shape == (4, 13, 20)
        torch.testing.assert_close(labels, expected, rtol=0, atol=0)
    assert (labels_from_logits(logits, (13, 20), valid)[3] == num_classes).all()
    assert (labels_from_logits(logits, (13, 20))[1] == num_classes).any()


@pytest.mark.parametrize("num_classes", [2, 8, 300])
def test_the_running_maximum_argmax_is_numpys_argmax_and_abstains_on_non_finite_scores(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    scores = rng.standard_normal((3, num_classes, 7, 11)).astype(np.float32)
    scores[0, :, 0, 0] = 2.5  # an all-class tie: the lowest class, as numpy's first maximum
    scores[1, -1, 1, 1] = scores[1, 0, 1, 1] = 9.0  # a tie of the first and last class
    scores[2, num_classes // 2, 2, 2] = np.nan
    scores[2, 0, 3, 3] = np.inf  # the largest score, but not a finite one: abstain
    scores[0, 1, 4, 4] = -np.inf
    scores[1, :2, 5, 5] = np.finfo(np.float32).max  # finite scores whose sum overflows: abstain (fail closed)
    expected = scores.argmax(axis=1)
    invalid = ~np.isfinite(scores).all(axis=1)
    invalid[1, 5, 5] = True
    expected[invalid] = num_classes
    labels = argmax_or_invalid(torch.from_numpy(scores))
    assert labels.dtype == (torch.uint8 if num_classes <= 255 else torch.int32)
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert labels[0, 0, 0] == 0 and labels[1, 1, 1] == 0 and labels[2, 3, 3] == num_classes


def test_labels_from_logits_with_the_fused_argmax_equal_its_own() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 6, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    logits[0, 2, 3, 4] = float("nan")
    logits[1, 0, 0, 0] = -float("inf")
    valid = torch.tensor([True, False, True])
    for mask in (None, valid):
        torch.testing.assert_close(labels_from_logits(logits, (13, 20), mask, argmax=argmax_or_invalid),
                                   labels_from_logits(logits, (13, 20), mask), rtol=0, atol=0)


def test_fp16_scores_are_upsampled_in_fp32() -> None:
    logits = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)).half()
    torch.testing.assert_close(labels_from_logits(logits, (11, 7)), batched_reference(logits, (11, 7), None),
                               rtol=0, atol=0)


@pytest.mark.parametrize("normalization", [
    Normalization(),
    Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), (0, 255)),
])
def test_normalize_equals_the_expression_and_leaves_its_input_alone(normalization: Normalization) -> None:
    images = torch.rand(3, 3, 7, 8, generator=torch.Generator().manual_seed(2))
    before = images.clone()
    low, high = normalization.input_range
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)
    x = images if (low, high) == (0.0, 1.0) else images * (high - low) + low
    torch.testing.assert_close(normalize(images, normalization), (x - mean) / std, rtol=0, atol=0)
    torch.testing.assert_close(images, before, rtol=0, atol=0)
