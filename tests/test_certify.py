"""Algorithm 1's test step against independent references: scipy's exact binomial test and statsmodels' FWER."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.multitest import multipletests

from certseg.engine.core.certify import (
    CertificationError,
    certify,
    min_samples_to_certify,
    pvalues,
    radius,
    validate_parameters,
)


def random_agreements(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Agreement counts spread over the whole range, with a heavy top so many tests are near the thresholds."""
    p = rng.choice([0.5, 0.8, 0.95, 0.99, 1.0], size=shape)
    return rng.binomial(n, p).astype(np.int32)


@pytest.mark.parametrize("n, tau", [(100, 0.75), (37, 0.5), (500, 0.9), (10, 0.51)])
def test_pvalues_equal_scipy_exact_binomial_test(n: int, tau: float) -> None:
    agree = np.arange(n + 1)
    ours = pvalues(agree, n, tau)
    assert ours.dtype == np.float64
    np.testing.assert_array_equal(ours, binom.sf(agree - 1, n, tau))
    for k in agree:
        assert ours[k] == pytest.approx(binomtest(int(k), n, tau, alternative="greater").pvalue, rel=1e-12, abs=0)


@pytest.mark.parametrize("fwer, method", [("holm", "holm"), ("bonferroni", "bonferroni")])
@pytest.mark.parametrize("seed", range(6))
def test_decisions_equal_statsmodels_multipletests(fwer: str, method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while True:  # draw settings until they can certify something (the others are the validation tests' job)
        n = int(rng.choice([20, 50, 100, 150]))
        tau = float(rng.choice([0.5, 0.6, 0.75, 0.9]))
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        alpha = float(rng.choice([0.2, 0.05, 1e-3]))
        if tau**n <= alpha / np.prod(shape):
            break
    agree = random_agreements(rng, shape, n)
    guess = rng.integers(0, 19, size=shape)
    result = certify(guess, agree, n, tau=tau, alpha=alpha, fwer=fwer)
    reference_p = binom.sf(agree.ravel() - 1, n, tau)
    reject, *_ = multipletests(reference_p, alpha=alpha, method=method)
    np.testing.assert_array_equal(result.pvalues.ravel(), reference_p)
    np.testing.assert_array_equal(result.certified.ravel(), reject)
    assert result.certified.shape == shape


def test_holm_with_a_single_pixel_near_its_threshold_on_a_large_map() -> None:
    """Holm's step-down lets the last pixel pass at alpha itself once all others are rejected."""
    n, tau, alpha = 100, 0.75, 1e-3
    agree = np.full(50_000, n)
    k_last = int(np.nonzero(binom.sf(np.arange(n + 1) - 1, n, tau) <= alpha)[0][0])
    agree[123] = k_last
    result = certify(np.zeros_like(agree), agree, n, tau=tau, alpha=alpha)
    reject, *_ = multipletests(binom.sf(agree - 1, n, tau), alpha=alpha, method="holm")
    np.testing.assert_array_equal(result.certified, reject)
    assert result.certified.all()
    agree[123] = k_last - 1
    assert not certify(np.zeros_like(agree), agree, n, tau=tau, alpha=alpha).certified[123]


def test_holm_is_never_less_powerful_than_bonferroni() -> None:
    rng = np.random.default_rng(7)
    agree = random_agreements(rng, (200, 200), 100)
    holm = certify(np.zeros_like(agree), agree, 100, tau=0.75, alpha=1e-3, fwer="holm")
    bonf = certify(np.zeros_like(agree), agree, 100, tau=0.75, alpha=1e-3, fwer="bonferroni")
    assert np.all(holm.certified >= bonf.certified)


def test_floor_matches_the_published_numbers_for_cityscapes() -> None:
    """The published numbers: 2.1 Mpx, n=100, tau=0.75 needs k >= 98 under Bonferroni at 1e-3 (99 at 1e-4)."""
    num_pixels = 1024 * 2048
    agree = np.full(num_pixels, 100, dtype=np.int32)
    agree[:10] = np.arange(90, 100)
    for alpha, expected in ((1e-3, 98), (1e-4, 99)):
        result = certify(np.zeros_like(agree), agree, 100, tau=0.75, alpha=alpha, fwer="bonferroni")
        assert result.min_agreements == expected
    # Holm's best case: everything else at k = n lets lower k through.
    holm = certify(np.zeros_like(agree), agree, 100, tau=0.75, alpha=1e-3)
    assert holm.min_agreements is not None and holm.min_agreements < 98


def test_abstain_labels_and_shape_are_preserved() -> None:
    guess = np.array([[0, 3], [5, 18]])
    agree = np.array([[100, 10], [99, 100]])
    result = certify(guess, agree, 100, tau=0.75, alpha=0.01)
    labels = result.labels(abstain_label=19)
    np.testing.assert_array_equal(labels, [[0, 19], [5, 18]])
    assert labels.dtype == np.uint8
    assert result.labels(abstain_label=256).dtype == np.uint16


def test_radius_is_sigma_times_normal_quantile() -> None:
    assert radius(0.25, 0.75) == pytest.approx(0.25 * norm.ppf(0.75), rel=1e-15)
    assert radius(0.25, 0.75) == pytest.approx(0.1686, abs=1e-4)
    assert radius(1.0, 0.5) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-0.1), "sigma"),
        (dict(tau=1.0), "tau"),
        (dict(tau=0.4), "tau"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(n0=0), "n0"),
        (dict(n=0), "n must"),
        (dict(fwer="bh"), "fwer"),
    ],
)
def test_invalid_parameters_are_refused_with_a_clear_message(kwargs: dict, message: str) -> None:
    params = dict(sigma=0.25, n0=10, n=100, tau=0.75, alpha=1e-3, num_pixels=100, fwer="holm") | kwargs
    with pytest.raises(CertificationError, match=message):
        validate_parameters(**params)


def test_n_too_small_to_ever_certify_names_the_minimum() -> None:
    num_pixels = 1024 * 2048
    need = min_samples_to_certify(0.75, 1e-3, num_pixels)
    # Independent check: the smallest n with tau**n <= alpha / N.
    assert 0.75**need <= 1e-3 / num_pixels < 0.75 ** (need - 1)
    with pytest.raises(CertificationError, match=f"need n >= {need}"):
        validate_parameters(n0=10, n=50, tau=0.75, alpha=1e-3, num_pixels=num_pixels)
    with pytest.raises(CertificationError, match="never certify"):
        certify(np.zeros(num_pixels, int), np.full(num_pixels, need - 1), need - 1, tau=0.75, alpha=1e-3)
    validate_parameters(n0=10, n=need, tau=0.75, alpha=1e-3, num_pixels=num_pixels)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(CertificationError, match="shapes differ"):
        certify(np.zeros((2, 3), int), np.zeros((3, 2), int), 100, tau=0.75, alpha=0.01)
    with pytest.raises(CertificationError, match="integer"):
        certify(np.zeros(4), np.zeros(4, int), 100, tau=0.75, alpha=0.01)
    with pytest.raises(CertificationError, match=r"agree must lie in \[0, n=100\]"):
        certify(np.zeros(4, int), np.array([0, 1, 2, 101]), 100, tau=0.75, alpha=0.01)
