"""Algorithm 1 end to end with segmenters whose agreement probability is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from certseg.engine.core.certify import CertificationError, certify, radius
from certseg.engine.core.pipeline import certify_image
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.errors import InputError

from segmenters import ThresholdSegmenter, constant_image, stripes_segmenter

SIGMA, TAU = 0.25, 0.75


class RecordingRuntime:
    """Wraps a runtime and records which sample ranges were asked for."""

    def __init__(self, inner: LocalRuntime) -> None:
        self.inner = inner
        self.requests: list[tuple[int, int, int]] = []

    def labels(self, image, *, sigma, seed, start, count):
        self.requests.append((seed, start, count))
        yield from self.inner.labels(image, sigma=sigma, seed=seed, start=start, count=count)


def test_null_boundary_pixels_are_certified_at_most_alpha_per_test() -> None:
    """Every pixel agrees with probability exactly tau: each single-pixel test must reject w.p. <= alpha.

    10^4 pixel-trials. The rate must also be near the test's exact size, which only holds when every sample
    gets its own noise (a batch sharing one draw inflates it many times).
    """
    alpha, n0, n = 0.05, 10, 100
    runtime = LocalRuntime(ThresholdSegmenter(SIGMA, TAU), batch_size=32)
    result = certify_image(
        runtime, constant_image(100, 100), num_classes=2, sigma=SIGMA, n0=n0, n=n, tau=TAU, alpha=alpha, seed=11
    )
    guess, agree = result.guess.ravel(), result.certificate.agree.ravel()
    per_pixel = np.array([certify(guess[i : i + 1], agree[i : i + 1], n, tau=TAU, alpha=alpha).certified[0]
                          for i in range(guess.size)])
    trials = per_pixel.size
    k_star = int(np.nonzero(binom.sf(np.arange(n + 1) - 1, n, TAU) <= alpha)[0][0])
    size = binom.sf(k_star - 1, n, TAU)  # exact rejection probability of a class-0 guess at p = tau
    p_guess0 = binom.sf(n0 // 2 - 1, n0, TAU)  # mode of n0 is class 0 (ties go to class 0)
    expected = size * p_guess0
    margin = 4 * np.sqrt(expected * (1 - expected) / trials)
    rate = per_pixel.mean()
    assert rate <= alpha + margin
    assert abs(rate - expected) <= margin, (rate, expected)
    # The whole-map certificate (Holm over all 10^4 pixels) certifies nothing here: FWER control.
    assert result.certificate.certified.sum() == 0


def test_family_wise_error_rate_over_many_images_is_at_most_alpha() -> None:
    alpha, trials = 0.2, 300
    runtime = LocalRuntime(ThresholdSegmenter(SIGMA, TAU), batch_size=64)
    events = 0
    for seed in range(trials):
        result = certify_image(
            runtime, constant_image(4, 4), num_classes=2, sigma=SIGMA, n0=5, n=60, tau=TAU, alpha=alpha, seed=seed
        )
        events += bool(result.certificate.certified.any())
    assert events / trials <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / trials)


def test_a_reliable_segmenter_is_certified_almost_everywhere() -> None:
    runtime = LocalRuntime(ThresholdSegmenter(SIGMA, 0.995), batch_size=55)
    result = certify_image(
        runtime, constant_image(100, 100), num_classes=2, sigma=SIGMA, n0=10, n=100, tau=TAU, alpha=1e-3, seed=3
    )
    assert result.certificate.certified.mean() > 0.97
    assert (result.labels[result.certificate.certified] == 0).all()
    assert set(np.unique(result.labels)) <= {0, 2}


def test_selection_and_estimation_samples_are_disjoint() -> None:
    runtime = RecordingRuntime(LocalRuntime(stripes_segmenter(4), batch_size=8))
    result = certify_image(runtime, constant_image(8, 8), num_classes=4, sigma=0.1, n0=7, n=40, alpha=0.01, seed=5)
    assert runtime.requests == [(5, 0, 7), (5, 7, 40)]
    assert result.seed == 5 and result.n0 == 7 and result.n == 40


def test_same_seed_reproduces_the_certificate_and_other_seeds_differ() -> None:
    # Brightness at class centres (robust pixels) and at class boundaries (coin flips).
    classes = np.random.default_rng(1).integers(0, 6, size=(24, 32))
    level = (classes + np.where(np.arange(32) % 4 == 0, 0.0, 0.5)) / 6
    image = np.repeat(level[None], 3, axis=0).astype(np.float32)

    def run(seed: int, batch_size: int):
        runtime = LocalRuntime(stripes_segmenter(6), batch_size=batch_size)
        return certify_image(runtime, image, num_classes=6, sigma=0.05, n0=10, n=100, alpha=1e-3, seed=seed)

    a, b, c = run(8, 16), run(8, 5), run(9, 16)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.certificate.agree, b.certificate.agree)
    assert not np.array_equal(a.certificate.agree, c.certificate.agree)
    assert a.radius == radius(0.05, TAU)
    assert 0 < a.certificate.certified.mean() < 1


def test_seed_is_drawn_and_recorded_when_not_given() -> None:
    runtime = LocalRuntime(stripes_segmenter(3), batch_size=16)
    first = certify_image(runtime, constant_image(4, 4), num_classes=3, sigma=0.1, n0=2, n=30, alpha=0.01)
    again = certify_image(runtime, constant_image(4, 4), num_classes=3, sigma=0.1, n0=2, n=30, alpha=0.01,
                          seed=first.seed)
    np.testing.assert_array_equal(first.certificate.agree, again.certificate.agree)


def test_bad_inputs_fail_before_sampling() -> None:
    runtime = RecordingRuntime(LocalRuntime(stripes_segmenter(3)))
    image = constant_image(64, 64)
    with pytest.raises(CertificationError, match="need n >="):
        certify_image(runtime, image, num_classes=3, sigma=0.25, n0=10, n=20, alpha=1e-3)
    with pytest.raises(CertificationError, match="sigma"):
        certify_image(runtime, image, num_classes=3, sigma=0.0)
    with pytest.raises(InputError, match=r"\(3, H, W\) RGB or \(1, H, W\) gray"):
        certify_image(runtime, image[0], num_classes=3, sigma=0.25)
    with pytest.raises(InputError, match=r"got shape \(2, 64, 64\)"):
        certify_image(runtime, image[:2], num_classes=3, sigma=0.25)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        certify_image(runtime, image * 255, num_classes=3, sigma=0.25)
    assert runtime.requests == []


class ChannelMeanThreshold:
    """Class 0 where the mean of the three channels is below ``level + sigma * Phi^-1(p)``, else class 1.

    For a grayscale image certified in its own space (one noise draw per pixel, replicated to RGB after), the
    channel mean carries the full noise sigma, so every pixel agrees with probability exactly p. Noise drawn per
    RGB channel would average down to sigma/sqrt(3) and make the boundary pixels look far more robust.
    """

    def __init__(self, sigma: float, p: float, level: float = 0.5) -> None:
        self.threshold = level + sigma * float(norm.ppf(p))

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        assert noisy.shape[1] == 3 and torch.equal(noisy[:, 0], noisy[:, 2])  # gray replicated after the noise
        return (noisy.mean(dim=1) > self.threshold).to(torch.uint8)


def test_grayscale_images_are_certified_in_their_own_pixel_space() -> None:
    """The null model in gray space: single-pixel tests reject at the exact test size, not far more often."""
    alpha, n0, n = 0.05, 10, 100
    runtime = LocalRuntime(ChannelMeanThreshold(SIGMA, TAU), batch_size=32)
    gray = np.full((1, 100, 100), 0.5, dtype=np.float32)
    result = certify_image(runtime, gray, num_classes=2, sigma=SIGMA, n0=n0, n=n, tau=TAU, alpha=alpha, seed=12)
    k_star = int(np.nonzero(binom.sf(np.arange(n + 1) - 1, n, TAU) <= alpha)[0][0])
    expected = binom.sf(k_star - 1, n, TAU) * binom.sf(n0 // 2 - 1, n0, TAU)
    rejected = (result.guess == 0) & (result.certificate.agree >= k_star)
    margin = 4 * np.sqrt(expected * (1 - expected) / rejected.size)
    assert abs(rejected.mean() - expected) <= margin, (rejected.mean(), expected)
    assert result.certificate.certified.sum() == 0


class TensorLabels:
    """A runtime that yields its label batches as torch tensors (as a device runtime keeping labels there does)."""

    def __init__(self, inner: LocalRuntime) -> None:
        self.inner = inner
        self.batches = 0

    def labels(self, image, *, sigma, seed, start, count):
        for batch in self.inner.labels(image, sigma=sigma, seed=seed, start=start, count=count):
            self.batches += 1
            yield torch.from_numpy(batch)


def flaky_stripes(num_classes: int):
    """``stripes_segmenter`` whose output is the invalid label K wherever channel 1 of the noise is extreme."""
    stripes = stripes_segmenter(num_classes)

    def segment(noisy: torch.Tensor) -> torch.Tensor:
        labels = stripes(noisy)
        return labels.masked_fill(noisy[:, 1] > 0.9, num_classes)

    return segment


@pytest.mark.parametrize("fwer", ["holm", "bonferroni"])
def test_tensor_label_batches_give_the_same_certificate_as_numpy(fwer: str) -> None:
    """Counting on the tensors' device is a different code path; the certificate bytes must not change."""
    classes = np.random.default_rng(2).integers(0, 5, size=(20, 28))
    level = (classes + np.where(np.arange(28) % 3 == 0, 0.02, 0.5)) / 5
    image = np.repeat(level[None], 3, axis=0).astype(np.float32)

    def run(runtime):
        return certify_image(runtime, image, num_classes=5, sigma=0.1, n0=10, n=100, alpha=1e-2, fwer=fwer, seed=4)

    host = run(LocalRuntime(flaky_stripes(5), batch_size=16))
    wrapped = TensorLabels(LocalRuntime(flaky_stripes(5), batch_size=16))
    recorded = RecordingRuntime(wrapped)
    device = run(recorded)
    assert recorded.requests == [(4, 0, 10), (4, 10, 100)]  # selection and estimation still disjoint
    assert wrapped.batches == 1 + 7
    np.testing.assert_array_equal(device.guess, host.guess)
    np.testing.assert_array_equal(device.certificate.agree, host.certificate.agree)
    np.testing.assert_array_equal(device.labels, host.labels)
    assert device.certificate.agree.dtype == host.certificate.agree.dtype
    assert device.non_finite == host.non_finite
    assert host.non_finite["estimation_pixel_samples"] > 0  # the invalid label K really occurred
    assert 0 < host.certificate.certified.mean() < 1


def test_fail_policy_stops_on_tensor_label_batches_too() -> None:
    from certseg.engine.core.pipeline import NonFiniteOutputError

    runtime = TensorLabels(LocalRuntime(flaky_stripes(5), batch_size=4))
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        certify_image(runtime, constant_image(20, 20, 0.8), num_classes=5, sigma=0.1, n0=8, n=100, alpha=1e-2,
                      seed=1, non_finite="fail")
    assert runtime.batches == 1  # stopped at the first batch holding K
