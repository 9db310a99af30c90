"""Value noise from uniform lattices, with exact elementwise arithmetic only (no BLAS, no libm).

Everything is sampled on a fixed canvas (``NOISE_HEIGHT`` x ``NOISE_WIDTH``) and resampled to the image, so
the noise a scene gets does not depend on the resolution it is rendered at.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
NOISE_HEIGHT, NOISE_WIDTH = 96, 192
"""The per-scene noise canvas, fixed so that noise is resolution independent."""


def bilinear(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray, smooth: bool = False) -> np.ndarray:
    """Sample ``grid`` (..., gh, gw) at fractional grid coordinates ys (n,), xs (m,) -> (..., n, m) float32.

    Separable gather + lerp (rows first): cheap and exact arithmetic, unlike an interpolation matmul.
    """
    grid_h, grid_w = grid.shape[-2:]
    ys = np.clip(ys, 0.0, grid_h - 1.0)
    xs = np.clip(xs, 0.0, grid_w - 1.0)
    y0 = np.minimum(ys.astype(np.intp), grid_h - 2)
    x0 = np.minimum(xs.astype(np.intp), grid_w - 2)
    fy = (ys - y0).astype(F32)
    fx = (xs - x0).astype(F32)
    if smooth:
        fy = fy * fy * (3 - 2 * fy)
        fx = fx * fx * (3 - 2 * fx)
    first_row = grid[..., y0, :]
    rows = first_row + (grid[..., y0 + 1, :] - first_row) * fy[:, None]
    first_col = rows[..., x0]
    return first_col + (rows[..., x0 + 1] - first_col) * fx


def fractal_noise(rng: np.random.Generator, lattices: tuple[tuple[int, int], ...], gain: float) -> np.ndarray:
    """Fractal value noise on the fixed canvas, stretched to roughly [0,1] (mean 0.5)."""
    ys = (np.arange(NOISE_HEIGHT) + 0.5) / NOISE_HEIGHT
    xs = (np.arange(NOISE_WIDTH) + 0.5) / NOISE_WIDTH
    total_noise = np.zeros((NOISE_HEIGHT, NOISE_WIDTH), F32)
    total_weight = 0.0
    weight = 1.0
    for grid_h, grid_w in lattices:
        lattice = rng.random((grid_h + 1, grid_w + 1), dtype=F32)
        total_noise += bilinear(lattice, ys * grid_h, xs * grid_w, smooth=True) * F32(weight)
        total_weight += weight
        weight *= gain
    return np.clip((total_noise * F32(1.0 / total_weight) - 0.5) * 2.6 + 0.5, 0.0, 1.0)


def noise_1d(lattice: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Smooth 1-D value noise in [0,1] at lattice coordinate ``t`` (wraps around)."""
    t = np.mod(t, len(lattice) - 1)
    i0 = np.minimum(t.astype(np.intp), len(lattice) - 2)
    f = t - i0
    f = f * f * (3 - 2 * f)
    return lattice[i0] + (lattice[i0 + 1] - lattice[i0]) * f


def fraction(x: np.ndarray) -> np.ndarray:
    """The fractional part, x - floor(x), in [0, 1)."""
    return x - np.floor(x)
