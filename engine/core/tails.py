"""The two distribution functions the exact test needs, ``binom.sf`` and ``norm.ppf``, as ``scipy.stats`` computes
them, without importing ``scipy.stats`` (about 0.5 s of every ``certseg certify``; ``scipy.special``, imported on
first use, is about 0.2 s).

Exactness is the point: these call the same ``scipy.special`` ufuncs ``scipy.stats`` calls, with the same arguments
and the same handling of the support's edges, so every p-value and radius is bit-identical
(``tests/test_startup.py`` checks it against ``scipy.stats``). A scipy without those ufuncs gets ``scipy.stats``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["binom", "norm"]


@functools.cache
def _binom_sf_ufunc() -> Callable[..., np.ndarray] | None:
    """The ufunc behind ``scipy.stats.binom.sf`` (Boost's), or None where scipy keeps it elsewhere."""
    try:
        from scipy.special._ufuncs import _binom_sf
    except ImportError:
        return None
    return _binom_sf


class _Binomial:
    """``scipy.stats.binom``'s ``sf``."""

    @staticmethod
    def sf(k: np.ndarray | int, n: int, p: float) -> np.ndarray | float:
        """P(X > k) for X ~ Bin(n, p), as ``scipy.stats.binom.sf(k, n, p)``: 1 below the support, 0 from n on,
        NaN for an n or p outside the distribution's domain."""
        ufunc = _binom_sf_ufunc()
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


binom = _Binomial()
norm = _Normal()
