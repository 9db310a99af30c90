"""Per-pixel certified radii from the same estimation samples: how robust is each pixel, not just "≥ R or not".

Pixel i has a guess c_i (the mode of the n0 selection samples) and k_i agreements among the n estimation samples,
which are independent of the selection. Its one-sided Clopper–Pearson lower bound at confidence 1 − α/N,

    p̲_i = Beta⁻¹(α/N; k_i, n − k_i + 1)          (0 when k_i = 0),

satisfies P(p̲_i > p_i) ≤ α/N, where p_i = P(f(x + ε)_i = c_i). Where p̲_i > ½ the smoothed classifier returns
c_i at pixel i for every perturbation of L2 norm < R_i = σ·Φ⁻¹(p̲_i) (Cohen et al. 2019, Theorem 1, with the
runner-up bounded by 1 − p̲_i); elsewhere the pixel abstains.

Why this holds for all pixels and all radii at once, with probability ≥ 1 − α: a false claim at pixel i (a radius
above σ·Φ⁻¹(p_i)) happens only if p̲_i > p_i, which has probability ≤ α/N; a union bound over the N pixels gives α.
Each pixel's claims are nested (certified at R_i means certified at every smaller radius), so the continuum of
radii costs nothing extra.

Relation to the fixed-τ certificate of ``certseg.engine.core.certify`` (same samples): by the duality of the exact test
and the Clopper–Pearson bound, P(Bin(n, τ) ≥ k) ≤ α/N exactly when p̲ ≥ τ, so the radius map is Bonferroni's test
at every τ at once — a pixel Bonferroni certifies at τ has R_i ≥ σ·Φ⁻¹(τ). Holm rejects at least as much, so it
may certify a pixel at σ·Φ⁻¹(τ) whose R_i is smaller. Each of the two holds at level α on its own; both hold
together with probability ≥ 1 − 2α (union bound), and whenever the radius map holds, so does Bonferroni's
certificate at every τ.

The bound takes n + 1 values, so it is a lookup table over k, like the p-values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from certseg.engine.core.certify import validate_sigma, validate_tau_alpha
from certseg.engine.core.tails import beta, norm

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
ACCURACY_RADII: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
"""The radii at which reports tabulate certified accuracy."""


def lower_bound_table(n: int, confidence_alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bounds for k = 0..n at level ``confidence_alpha`` (float64)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not 0.0 < confidence_alpha < 1.0:
        raise ValueError(f"the bound's level must lie in (0, 1), got {confidence_alpha!r}")
    k = np.arange(n + 1)
    bounds = np.zeros(n + 1)
    bounds[1:] = beta.ppf(confidence_alpha, k[1:], n - k[1:] + 1)
    return bounds


def radius_table(n: int, sigma: float, alpha: float, num_pixels: int) -> np.ndarray:
    """R(k) = σ·Φ⁻¹(p̲(k)) where p̲(k) > ½, NaN (abstain) elsewhere, for k = 0..n (float64)."""
    validate_sigma(sigma)
    validate_tau_alpha(0.5, alpha)
    if num_pixels < 1:
        raise ValueError("cannot bound an empty label map")
    bounds = lower_bound_table(n, alpha / num_pixels)
    radii = np.full(n + 1, np.nan)
    above = bounds > 0.5
    radii[above] = sigma * norm.ppf(bounds[above])
    return radii


@dataclass(frozen=True)
class RadiusMap:
    """Per-pixel certified radii (float32, NaN = abstain) and what the bound used."""

    radius: np.ndarray
    sigma: float
    n: int
    alpha: float
    num_pixels: int

    @property
    def certified(self) -> np.ndarray:
        return ~np.isnan(self.radius)

    @property
    def top(self) -> float:
        """The largest radius any pixel can get with these σ, n, α, N (all n samples agreeing)."""
        return float(radius_table(self.n, self.sigma, self.alpha, self.num_pixels)[self.n])

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the bound's inputs, the certified fraction and the radius quantiles over certified pixels."""
        radii = self.radius[self.certified]
        quantiles = {f"q{round(q * 100):02d}": float(np.quantile(radii, q)) for q in QUANTILES} if radii.size else {}
        return {
            "bound": "one-sided Clopper-Pearson at confidence 1 - alpha/N, union bound over pixels",
            "sigma": self.sigma, "n": self.n, "alpha": self.alpha, "num_pixels": self.num_pixels,
            "certified_percent": 100.0 * float(self.certified.mean()) if self.radius.size else 0.0,
            "radius_quantiles": quantiles,
            "radius_max": float(radii.max()) if radii.size else None,
            "radius_attainable_max": self.top,
        }


def radius_map(agree: np.ndarray, n: int, *, sigma: float, alpha: float) -> RadiusMap:
    """Radii of every pixel from its agreement count ``agree`` (any shape) among n estimation samples."""
    agree = np.asarray(agree)
    if not np.issubdtype(agree.dtype, np.integer):
        raise ValueError(f"agree must be an integer array, got dtype {agree.dtype}")
    if agree.size and (int(agree.min()) < 0 or int(agree.max()) > n):
        raise ValueError(f"agree must lie in [0, n={n}], got values in [{agree.min()}, {agree.max()}]")
    table = radius_table(n, sigma, alpha, int(agree.size)).astype(np.float32)
    return RadiusMap(radius=table[agree.astype(np.intp, copy=False)], sigma=float(sigma), n=int(n),
                     alpha=float(alpha), num_pixels=int(agree.size))


def certified_accuracy_at(radii: np.ndarray, correct: np.ndarray, valid: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Fraction of ``valid`` pixels whose guess is ``correct`` and certified at radius ≥ each level (Cohen's curve).

    NaN radii (abstentions) never count.
    """
    radii = np.where(np.isnan(radii), -np.inf, radii)
    hits = np.sort(radii[valid & correct])
    total = int(valid.sum())
    if not total:
        return np.zeros(len(levels))
    return (hits.size - np.searchsorted(hits, np.asarray(levels, dtype=np.float64), side="left")) / total
