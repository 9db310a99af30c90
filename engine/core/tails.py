"""The distribution functions the exact test and the radius map need, ``binom.sf``, ``norm.ppf`` and ``beta.ppf``,
as ``scipy.stats`` computes them, without importing ``scipy.stats`` (about 0.5 s of every ``certseg certify`` and
45 MiB of resident memory; ``scipy.special``, imported on first use, is about 0.2 s and 7 MiB).

Exactness is the point: these call the same ``scipy.special`` ufuncs ``scipy.stats`` calls, with the same arguments
and the same handling of the support's edges, so every p-value and radius is bit-identical
(``tests/test_startup.py`` checks it against ``scipy.stats``). A scipy without those ufuncs gets ``scipy.stats``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["beta", "binom", "norm"]


@functools.cache
def _boost_ufunc(name: str) -> Callable[..., np.ndarray] | None:
    """The private ``scipy.special`` ufunc (Boost's) that ``scipy.stats`` calls, e.g. ``_binom_sf`` behind
    ``binom.sf``, or None where this scipy keeps it elsewhere."""
    try:
        from scipy.special import _ufuncs
    except ImportError:
        return None
    return getattr(_ufuncs, name, None)


class _Binomial:
    """``scipy.stats.binom``'s ``sf``."""

    @staticmethod
    def sf(k: np.ndarray | int, n: int, p: float) -> np.ndarray | float:
        """P(X > k) for X ~ Bin(n, p), as ``scipy.stats.binom.sf(k, n, p)``: 1 below the support, 0 from n on,
        NaN for an n or p outside the distribution's domain."""
        ufunc = _boost_ufunc("_binom_sf")
        if ufunc is None:
            from scipy.stats import binom

            return binom.sf(k, n, p)
        k = np.asarray(k)
        output = np.zeros(k.shape, dtype=np.float64)
        valid = n >= 0 and float(n).is_integer() and 0 <= p <= 1
        if not valid:
            output[...] = np.nan
        else:
            output[np.isnan(k)] = np.nan
            output[(k < 0) | np.isneginf(k)] = 1.0
            inside = (k >= 0) & (k < n) & np.isfinite(k)
            if np.any(inside):
                output[inside] = np.clip(ufunc(np.floor(k[inside]), n, p), 0, 1)
        return output[()] if output.ndim == 0 else output


class _Normal:
    """``scipy.stats.norm``'s ``ppf``."""

    @staticmethod
    def ppf(q: np.ndarray | float) -> np.ndarray | float:
        """Φ⁻¹(q), as ``scipy.stats.norm.ppf(q)``: -inf at 0, inf at 1, NaN outside [0, 1]."""
        from scipy.special import ndtri

        quantiles = np.asarray(ndtri(np.asarray(q, dtype=np.float64)), dtype=np.float64) * 1.0 + 0.0
        output = np.where(np.isnan(quantiles), np.nan, quantiles)  # scipy.stats' NaN, bit for bit
        return output[()] if output.ndim == 0 else output


class _Beta:
    """``scipy.stats.beta``'s ``ppf`` (the Clopper–Pearson bound of ``certseg.engine.core.radius``)."""

    @staticmethod
    def ppf(q: np.ndarray | float, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray | float:
        """The q-quantile of Beta(a, b), as ``scipy.stats.beta.ppf(q, a, b)``: 0 at q = 0, 1 at q = 1, NaN for
        q outside [0, 1] or a, b ≤ 0."""
        ufunc = _boost_ufunc("_beta_ppf")
        if ufunc is None:
            from scipy.stats import beta

            return beta.ppf(q, a, b)
        q, a, b = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (q, a, b)))
        output = np.full(q.shape, np.nan)
        valid = (a > 0) & (b > 0) & (q >= 0) & (q <= 1)
        output[valid & (q == 0)] = 0.0
        output[valid & (q == 1)] = 1.0
        inside = valid & (q > 0) & (q < 1)
        if np.any(inside):
            output[inside] = ufunc(q[inside], a[inside], b[inside])
        return output[()] if output.ndim == 0 else output


beta = _Beta()
binom = _Binomial()
norm = _Normal()
