"""SegCertify, Algorithm 1: exact per-pixel binomial tests with family-wise error control over all pixels.

Every pixel i has a guessed class c_i (the mode of the n0 selection samples) and k_i, the number of the n
independent estimation samples that agree with c_i. The pixel is certified when the one-sided exact test of
H0: P(f(x + eps)_i = c_i) <= tau is rejected; rejections are controlled at family-wise level alpha over *all*
pixels of the map (Holm by default, Bonferroni optionally), exactly as ``statsmodels`` ``multipletests`` decides.

Why this is fast without being approximate: k takes only n + 1 values, so the p-values are a lookup table of
``scipy.stats.binom.sf`` and Holm's step-down over N sorted p-values reduces to one threshold on k computed
from the histogram of k. The decisions are identical to sorting all N p-values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from certseg.engine.choices import Fwer, choice
from certseg.engine.core.tails import binom, norm
from certseg.engine.errors import CertificationError
from certseg.engine.labels import label_numpy_dtype


def validate_tau_alpha(tau: float, alpha: float) -> None:
    if not (isinstance(tau, (int, float)) and 0.5 <= tau < 1.0):
        raise CertificationError(f"tau must lie in [0.5, 1), got {tau!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise CertificationError(f"alpha must lie in (0, 1), got {alpha!r}")


def validate_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise CertificationError(f"sigma must be a finite number > 0, got {sigma!r}")


def best_case_pvalue(n: int, tau: float) -> float:
    """p-value of a pixel whose n estimation samples all agree: P(Bin(n, tau) >= n) = tau**n."""
    return float(binom.sf(n - 1, n, tau))


def min_samples_to_certify(tau: float, alpha: float, num_pixels: int, fwer: Fwer | str = Fwer.holm) -> int:
    """Smallest n for which a pixel with k = n agreements can be certified among ``num_pixels`` tests.

    Holm's first step and Bonferroni share the threshold alpha / N, and if every pixel has k = n all N
    p-values equal tau**n, so this bound is tight for both methods.
    """
    validate_tau_alpha(tau, alpha)
    _check_fwer(fwer)
    threshold = alpha / num_pixels
    n = max(1, math.floor(math.log(threshold) / math.log(tau)) - 1)
    while best_case_pvalue(n, tau) > threshold:
        n += 1
    return n


def validate_parameters(
    *, n0: int, n: int, tau: float, alpha: float, num_pixels: int, fwer: Fwer | str = Fwer.holm,
    sigma: float | None = None,
) -> None:
    """Reject settings that are invalid or can never certify a pixel, before any sample is drawn."""
    if sigma is not None:
        validate_sigma(sigma)
    validate_tau_alpha(tau, alpha)
    fwer = _check_fwer(fwer)
    if not isinstance(n0, (int, np.integer)) or n0 < 1:
        raise CertificationError(f"n0 must be an integer >= 1, got {n0!r}")
    _check_n_can_certify(n, tau, alpha, num_pixels, fwer)


def _check_fwer(fwer: Fwer | str) -> Fwer:
    return choice(Fwer, fwer, "fwer", CertificationError)


def _check_n_can_certify(n: int, tau: float, alpha: float, num_pixels: int, fwer: Fwer) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise CertificationError(f"n must be an integer >= 1, got {n!r}")
    if num_pixels < 1:
        raise CertificationError("cannot certify an empty label map")
    best = best_case_pvalue(int(n), tau)
    if best > alpha / num_pixels:
        need = min_samples_to_certify(tau, alpha, num_pixels, fwer)
        raise CertificationError(
            f"n={n} can never certify a pixel: even k=n agreements give p={best:.3g} > alpha/N="
            f"{alpha / num_pixels:.3g} for N={num_pixels} pixels at tau={tau}, alpha={alpha}; need n >= {need}"
        )


def pvalue_table(n: int, tau: float) -> np.ndarray:
    """Exact one-sided p-values P(Bin(n, tau) >= k) for k = 0..n (float64, non-increasing in k)."""
    k = np.arange(n + 1)
    return binom.sf(k - 1, n, tau)


def pvalues(agree: np.ndarray, n: int, tau: float) -> np.ndarray:
    """Per-pixel exact p-values, ``binom.sf(k - 1, n, tau)``, by table lookup (identical values)."""
    return pvalue_table(n, tau)[np.asarray(agree)]


def min_agreements(agree_histogram: np.ndarray, table: np.ndarray, alpha: float, fwer: Fwer) -> int | None:
    """Smallest k that is rejected (certified), or None if no pixel is.

    ``agree_histogram[k]`` counts pixels with k agreements. Rejections are monotone in the p-value and
    p is non-increasing in k, so both procedures reject exactly the pixels with k >= the returned value.

    Holm (as statsmodels): sort p ascending, reject ranks before the first i (0-based) with
    p_(i) > alpha / (N - i). Pixels with equal p form one block; if the block's first rank passes, all its
    ranks pass (thresholds grow with i), so the walk goes block by block over distinct p-values.
    """
    num_pixels = int(agree_histogram.sum())
    if fwer == Fwer.bonferroni:
        passing = np.nonzero(table <= alpha / float(num_pixels))[0]
        return int(passing[0]) if passing.size else None
    rank = 0
    k_min: int | None = None
    k = len(table) - 1
    while k >= 0:
        # Block of equal p-values: k down to k_low (p is non-increasing in k, so equal values are adjacent).
        k_low = k
        while k_low - 1 >= 0 and table[k_low - 1] == table[k]:
            k_low -= 1
        block = int(agree_histogram[k_low : k + 1].sum())
        if block:
            if table[k] > alpha / float(num_pixels - rank):
                break
            rank += block
            k_min = k_low
        k = k_low - 1
    return k_min


@dataclass(frozen=True)
class Certificate:
    """Per-pixel outcome of Algorithm 1 for one label map.

    ``certified[i]`` is True where the pixel's guess is certified at radius ``radius(sigma, tau)``;
    ``pvalues`` are the raw exact p-values; ``min_agreements`` is the smallest k that was certified
    (None when nothing was).
    """

    guess: np.ndarray
    agree: np.ndarray
    certified: np.ndarray
    pvalues: np.ndarray
    n: int
    tau: float
    alpha: float
    fwer: Fwer
    min_agreements: int | None

    @property
    def num_pixels(self) -> int:
        return int(self.certified.size)

    @property
    def abstain_fraction(self) -> float:
        return float(1.0 - self.certified.mean())

    def labels(self, abstain_label: int) -> np.ndarray:
        """Certified label map: the guess where certified, ``abstain_label`` elsewhere."""
        out = self.guess.astype(label_numpy_dtype(abstain_label), copy=True)
        out[~self.certified] = abstain_label
        return out


def certify(
    guess: np.ndarray, agree: np.ndarray, n: int, *, tau: float, alpha: float, fwer: Fwer | str = Fwer.holm
) -> Certificate:
    """Certify every pixel of a label map (Algorithm 1's test step), FWER-controlled over all its pixels.

    ``guess``: integer array of the per-pixel selected class (any shape); ``agree``: integer array of the
    same shape, agreements with ``guess`` among the n estimation samples (disjoint from the selection ones).
    """
    guess = np.asarray(guess)
    agree = np.asarray(agree)
    if guess.shape != agree.shape:
        raise CertificationError(f"guess and agree shapes differ: {guess.shape} vs {agree.shape}")
    for name, arr in (("guess", guess), ("agree", agree)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise CertificationError(f"{name} must be an integer array, got dtype {arr.dtype}")
    validate_tau_alpha(tau, alpha)
    fwer = _check_fwer(fwer)
    _check_n_can_certify(n, tau, alpha, agree.size, fwer)
    n = int(n)
    if agree.size and (int(agree.min()) < 0 or int(agree.max()) > n):
        raise CertificationError(f"agree must lie in [0, n={n}], got values in [{agree.min()}, {agree.max()}]")
    if guess.size and int(guess.min()) < 0:
        raise CertificationError(f"guess must hold class ids >= 0, got {guess.min()}")
    table = pvalue_table(n, tau)
    index = agree.astype(np.intp, copy=False)
    histogram = np.bincount(index.ravel(), minlength=n + 1)
    k_min = min_agreements(histogram, table, alpha, fwer)
    certified = index >= k_min if k_min is not None else np.zeros(agree.shape, dtype=bool)
    return Certificate(
        guess=guess,
        agree=agree,
        certified=certified,
        pvalues=table[index],
        n=n,
        tau=float(tau),
        alpha=float(alpha),
        fwer=fwer,
        min_agreements=k_min,
    )


def radius(sigma: float, tau: float) -> float:
    """Certified L2 radius R = sigma * Phi^-1(tau) (Fischer et al. 2021, Theorem 4.1)."""
    validate_sigma(sigma)
    if not (isinstance(tau, (int, float)) and 0.5 <= tau < 1.0):
        raise CertificationError(f"tau must lie in [0.5, 1), got {tau!r}")
    return float(sigma * norm.ppf(tau))
