"""Procedural street scenes with per-pixel labels: certseg's stand-in for Cityscapes.

Why: Cityscapes images and the published checkpoints are not available on our machines, so certseg trains
its own small models on synthetic street scenes and ships them as the default. This module draws those
scenes: a pinhole camera looks down a straight street (road with lane markings and crossings, kerbs and
sidewalks, building facades with windows in perspective, a skyline, trees, poles, parked and moving
vehicles, pedestrians), painted far to near so that nearer things occlude farther ones, then lit per scene
(brightness, contrast, colour temperature, cast shadows, haze, vignetting, sensor grain).

Resolution independence: a scene is sampled in world units (metres) and normalised image coordinates
(fractions of width and height) and only then rasterised at pixel centres. The same seed at two sizes gives
the same layout; only the sampling density (and the per-pixel grain) changes.

Determinism: every random draw comes from PCG64 streams derived from the seed through SeedSequence, and
only uniform draws are used (numpy's normal sampler calls libm in its tails). Rendering uses elementwise
IEEE arithmetic (+ - * /, floor, comparisons) only: no BLAS, no reductions, no transcendental functions.
The output is therefore bit-identical across platforms for a given seed and size.

Labels: ids 0..7 index ``CLASSES`` (this dataset's own train ids, not Cityscapes' 19). Every pixel gets a
real class; the ignore value 255 is never produced. Traffic signs and traffic lights are labelled ``pole``
and tree trunks ``vegetation`` (as in Cityscapes); buses and vans are ``vehicle``.

Seeds: training must draw only from ``TRAIN_SEEDS``; evaluation uses only ``held_out_seed(j)``. The two
ranges are disjoint, so no evaluated scene was ever seen in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = "certseg-procedural-street-1"

CLASSES: tuple[str, ...] = ("road", "sidewalk", "building", "vegetation", "sky", "vehicle", "person", "pole")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, VEHICLE, PERSON, POLE = range(8)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255  # Cityscapes' void value; documented for readers, never produced by this generator.
# Cityscapes colours of the matching classes (vehicle = car), for overlays.
PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [107, 142, 35],
        [70, 130, 180],
        [0, 0, 142],
        [220, 20, 60],
        [153, 153, 153],
    ],
    dtype=np.uint8,
)

# Training draws seeds only from TRAIN_SEEDS; evaluation only from held_out_seed(j) = HELD_OUT_SEED_OFFSET + j.
# The ranges are disjoint, so no evaluated scene can have been seen in training.
TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEED_OFFSET = 10_000_000

F32 = np.float32
_NOISE_H, _NOISE_W = 96, 192  # the per-scene noise canvas, fixed so that noise is resolution independent


def held_out_seed(j: int) -> int:
    """Seed of held-out (evaluation) scene ``j``; disjoint from ``TRAIN_SEEDS`` by construction."""
    if j < 0 or j >= HELD_OUT_SEED_OFFSET:
        raise ValueError(f"held-out index must be in [0, {HELD_OUT_SEED_OFFSET}), got {j}")
    return HELD_OUT_SEED_OFFSET + j


def is_train_seed(seed: int) -> bool:
    return seed in TRAIN_SEEDS


@dataclass(frozen=True, eq=False)  # arrays: identity equality and hashing
class Scene:
    """One rendered scene: ``image`` float32 (3,H,W) in [0,1], ``labels`` uint8 (H,W) with ids 0..K-1."""

    image: np.ndarray
    labels: np.ndarray
    seed: int


# --------------------------------------------------------------------------------------------------- noise


def _bilinear(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray, smooth: bool = False) -> np.ndarray:
    """Sample ``grid`` (..., gh, gw) at fractional grid coordinates ys (n,), xs (m,) -> (..., n, m) float32.

    Separable gather + lerp (rows first): cheap and exact arithmetic, unlike an interpolation matmul.
    """
    gh, gw = grid.shape[-2:]
    ys = np.clip(ys, 0.0, gh - 1.0)
    xs = np.clip(xs, 0.0, gw - 1.0)
    y0 = np.minimum(ys.astype(np.intp), gh - 2)
    x0 = np.minimum(xs.astype(np.intp), gw - 2)
    fy = (ys - y0).astype(F32)
    fx = (xs - x0).astype(F32)
    if smooth:
        fy = fy * fy * (3 - 2 * fy)
        fx = fx * fx * (3 - 2 * fx)
    r0 = grid[..., y0, :]
    rows = r0 + (grid[..., y0 + 1, :] - r0) * fy[:, None]
    c0 = rows[..., x0]
    return c0 + (rows[..., x0 + 1] - c0) * fx


def _fbm(rng: np.random.Generator, lattices: tuple[tuple[int, int], ...], gain: float) -> np.ndarray:
    """Fractal value noise on the fixed canvas, stretched to roughly [0,1] (mean 0.5)."""
    ys = (np.arange(_NOISE_H) + 0.5) / _NOISE_H
    xs = (np.arange(_NOISE_W) + 0.5) / _NOISE_W
    acc = np.zeros((_NOISE_H, _NOISE_W), F32)
    total = 0.0
    weight = 1.0
    for gh, gw in lattices:
        lat = rng.random((gh + 1, gw + 1), dtype=F32)
        acc += _bilinear(lat, ys * gh, xs * gw, smooth=True) * F32(weight)
        total += weight
        weight *= gain
    return np.clip((acc * F32(1.0 / total) - 0.5) * 2.6 + 0.5, 0.0, 1.0)


def _noise1d(lat: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Smooth 1-D value noise in [0,1] at lattice coordinate ``t`` (wraps around)."""
    t = np.mod(t, len(lat) - 1)
    i0 = np.minimum(t.astype(np.intp), len(lat) - 2)
    f = t - i0
    f = f * f * (3 - 2 * f)
    return lat[i0] + (lat[i0 + 1] - lat[i0]) * f


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


# -------------------------------------------------------------------------------------- camera and canvas


@dataclass(frozen=True)
class _Camera:
    """Pinhole camera at height ``h_c`` looking along +z; u, v are normalised image coordinates."""

    u_vp: float
    v_h: float
    f_u: float
    f_v: float
    h_c: float

    def u(self, x: float, z: float) -> float:
        return self.u_vp + self.f_u * x / z

    def v(self, y: float, z: float) -> float:
        return self.v_h + self.f_v * (self.h_c - y) / z


Patch = tuple[slice, slice, np.ndarray, np.ndarray]


class _Canvas:
    """Image + label buffers, pixel-centre coordinates, screen-space noise, and patch rasterisers."""

    def __init__(self, height: int, width: int, cam: _Camera, noise: np.ndarray):
        self.h, self.w, self.cam = height, width, cam
        self.u = (np.arange(width) + 0.5) / width
        self.v = (np.arange(height) + 0.5) / height
        self.v32 = self.v.astype(F32)
        self.image = np.zeros((3, height, width), F32)
        self.labels = np.zeros((height, width), np.uint8)
        sampled = _bilinear(noise, self.v * _NOISE_H - 0.5, self.u * _NOISE_W - 0.5)
        self.coarse, self.fine = sampled[0], sampled[1]

    def _span(self, a: float, b: float, n: int) -> slice | None:
        """Pixels whose centres fall in [a, b] (normalised), clipped to the image."""
        if not (math.isfinite(a) and math.isfinite(b)):
            a, b = max(min(a, 2.0), -1.0), max(min(b, 2.0), -1.0)
        i0 = max(0, math.ceil(a * n - 0.5))
        i1 = min(n - 1, math.floor(b * n - 0.5))
        return slice(i0, i1 + 1) if i1 >= i0 else None

    def rows(self, a: float, b: float) -> slice | None:
        return self._span(a, b, self.h)

    def cols(self, a: float, b: float) -> slice | None:
        return self._span(a, b, self.w)

    def frontal(self, z: float, x0: float, x1: float, y0: float, y1: float) -> Patch | None:
        """A vertical plane facing the camera at depth z: world X (1,w) and Y (h,1) per pixel."""
        c = self.cam
        rs, cs = self.rows(c.v(y1, z), c.v(y0, z)), self.cols(c.u(x0, z), c.u(x1, z))
        if rs is None or cs is None:
            return None
        x = ((self.u[cs] - c.u_vp) * (z / c.f_u)).astype(F32)[None, :]
        y = (c.h_c - (self.v[rs] - c.v_h) * (z / c.f_v)).astype(F32)[:, None]
        return rs, cs, x, y

    def side(self, xp: float, z0: float, z1: float, y0: float, y1: float) -> Patch | None:
        """A vertical plane X = xp along the street: depth z (1,w) and world Y (h,w) per pixel."""
        c = self.cam
        us = [c.u(xp, z0), c.u(xp, z1)]
        vs = [c.v(y, z) for y in (y0, y1) for z in (z0, z1)]
        rs, cs = self.rows(min(vs), max(vs)), self.cols(min(us), max(us))
        if rs is None or cs is None:
            return None
        zc = c.f_u * xp / (self.u[cs] - c.u_vp)
        y = F32(c.h_c) - (self.v32[rs] - F32(c.v_h))[:, None] * (zc / c.f_v).astype(F32)[None, :]
        return rs, cs, zc.astype(F32)[None, :], y

    def ground(self, x0: float, x1: float, z0: float, z1: float) -> Patch | None:
        """A rectangle on the ground plane: world X (h,w) and depth z (h,1) per pixel."""
        c = self.cam
        us = [c.u(x, z) for x in (x0, x1) for z in (z0, z1)]
        rs, cs = self.rows(c.v(0.0, z1), c.v(0.0, z0)), self.cols(min(us), max(us))
        if rs is None or cs is None:
            return None
        z = c.f_v * c.h_c / (self.v[rs] - c.v_h)
        x = (self.u[cs] - c.u_vp).astype(F32)[None, :] * (z / c.f_u).astype(F32)[:, None]
        return rs, cs, x, z.astype(F32)[:, None]

    def paint(
        self,
        rs: slice,
        cs: slice,
        mask: np.ndarray,
        cls: int | None,
        rgb: tuple[float, float, float] | np.ndarray,
        tex: float = 0.15,
        shade: np.ndarray | float | None = None,
    ) -> None:
        """Write colour (modulated by fine noise and ``shade``) and class ``cls`` where ``mask``.

        The patch is first cropped to the mask's bounding box: small parts (wheels, lamps, heads) of big
        objects then cost little.
        """
        mask = np.broadcast_to(mask, (rs.stop - rs.start, cs.stop - cs.start))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            return
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        rs, cs = slice(rs.start + r0, rs.start + r1), slice(cs.start + c0, cs.start + c1)
        f = 1 + F32(tex) * (self.fine[rs, cs] - F32(0.5))
        if isinstance(shade, np.ndarray) and shade.ndim == 2:  # crop, keeping broadcast (size-1) axes
            f = (
                f
                * shade[(r0 if shade.shape[0] > 1 else 0) :, (c0 if shade.shape[1] > 1 else 0) :][: r1 - r0, : c1 - c0]
            )
        elif shade is not None:
            f = f * shade
        self.put(rs, cs, mask[r0:r1, c0:c1], np.asarray(rgb, F32).reshape(3, 1, 1) * f, cls)

    def put(self, rs: slice, cs: slice, mask: np.ndarray, col: np.ndarray, lab) -> None:
        """Exact masked write done arithmetically: numpy's masked copies are ~20x slower than this."""
        mf = mask.astype(F32)
        view = self.image[:, rs, cs]
        view *= F32(1) - mf
        view += col * mf
        if lab is not None:
            lv = self.labels[rs, cs]
            lv -= (lv - np.asarray(lab, np.uint8)) * mask.view(np.uint8)  # uint8 wrap-around: exact

    def darken(self, rs: slice, cs: slice, mask: np.ndarray, factor: float) -> None:
        """Image-only darkening (cast shadows) restricted to ground pixels."""
        lab = self.labels[rs, cs]
        m = mask & ((lab <= SIDEWALK) | (lab == VEGETATION))
        self.image[:, rs, cs] *= F32(1) - F32(1 - factor) * m.astype(F32)


# ----------------------------------------------------------------------------------------------- random


class _Rand:
    """Thin wrapper over a PCG64 Generator that only makes uniform draws and returns Python scalars."""

    def __init__(self, gen: np.random.Generator):
        self.g = gen

    def u(self, a: float = 0.0, b: float = 1.0) -> float:
        return a + (b - a) * float(self.g.random())

    def i(self, a: int, b: int) -> int:
        """Integer in [a, b)."""
        return int(self.g.integers(a, b))

    def p(self, prob: float) -> bool:
        return float(self.g.random()) < prob

    def pick(self, seq):
        return seq[self.i(0, len(seq))]

    def rgb(self, base: tuple[float, float, float], jitter: float = 0.06, bright: float = 0.12):
        """``base`` with per-channel jitter and a common brightness change, clipped to [0,1]."""
        k = self.u(1 - bright, 1 + bright)
        return tuple(min(1.0, max(0.0, (c + self.u(-jitter, jitter)) * k)) for c in base)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))


# Colour families. They overlap across classes on purpose (grey walls, grey cars, grey asphalt, overcast
# sky; green cars and green shirts), so a model has to use shape, texture and context, not colour alone.
_WALLS = (
    (0.62, 0.62, 0.62),
    (0.80, 0.74, 0.60),
    (0.62, 0.33, 0.25),
    (0.86, 0.86, 0.83),
    (0.88, 0.78, 0.52),
    (0.82, 0.64, 0.58),
    (0.60, 0.68, 0.76),
    (0.45, 0.45, 0.47),
    (0.70, 0.58, 0.45),
    (0.30, 0.32, 0.36),
)
_LEAVES = ((0.20, 0.36, 0.10), (0.28, 0.42, 0.14), (0.14, 0.28, 0.12), (0.40, 0.40, 0.14), (0.30, 0.34, 0.18))
_CARS = (
    (0.88, 0.88, 0.88),
    (0.08, 0.08, 0.09),
    (0.62, 0.63, 0.65),
    (0.38, 0.39, 0.41),
    (0.62, 0.08, 0.07),
    (0.10, 0.20, 0.50),
    (0.14, 0.30, 0.18),
    (0.75, 0.68, 0.50),
    (0.90, 0.72, 0.10),
    (0.25, 0.45, 0.70),
)
_CLOTHES = (
    (0.10, 0.10, 0.12),
    (0.85, 0.85, 0.85),
    (0.60, 0.10, 0.10),
    (0.15, 0.25, 0.55),
    (0.25, 0.45, 0.25),
    (0.55, 0.45, 0.30),
    (0.80, 0.60, 0.15),
    (0.45, 0.45, 0.48),
    (0.55, 0.25, 0.45),
    (0.30, 0.50, 0.70),
)
_PANTS = ((0.10, 0.12, 0.20), (0.08, 0.08, 0.08), (0.35, 0.35, 0.38), (0.60, 0.55, 0.42), (0.20, 0.30, 0.50))
_SKIN = ((0.92, 0.74, 0.60), (0.80, 0.60, 0.45), (0.60, 0.42, 0.30), (0.40, 0.27, 0.18))
_SKIES = {  # (zenith, horizon, cloud)
    "day": ((0.22, 0.42, 0.78), (0.68, 0.80, 0.92), (0.96, 0.96, 0.97)),
    "overcast": ((0.62, 0.64, 0.68), (0.80, 0.81, 0.83), (0.90, 0.90, 0.91)),
    "dusk": ((0.24, 0.28, 0.52), (0.95, 0.66, 0.42), (0.85, 0.62, 0.55)),
    "hazy": ((0.48, 0.58, 0.74), (0.86, 0.86, 0.84), (0.92, 0.92, 0.90)),
}


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class _Segment:
    """One stretch of facade along a side of the street (kind 0 building, 1 hedge, 2 gap)."""

    z1: float
    kind: int
    height: float
    rgb: tuple[float, float, float]
    win_sx: float  # window pitch along the street (m)
    win_fx: tuple[float, float]  # window extent within a pitch (fractions)
    floor_h: float
    win_fy: tuple[float, float]
    shops: bool
    glass: tuple[float, float, float]


@dataclass
class _Layout:
    cam: _Camera
    style: str
    sky: str
    c: float  # road centre X
    rh: float  # road half width
    sw: tuple[float, float]  # sidewalk widths (left, right)
    grass: tuple[float, float]  # grass strip widths next to the kerb
    beyond_lawn: tuple[bool, bool]
    lanes: int
    z_far: float
    crossing: float  # z of the zebra crossing (inf if none)
    road_rgb: tuple[float, float, float]
    walk_rgb: tuple[tuple[float, float, float], tuple[float, float, float]]
    leaf_rgb: tuple[float, float, float]
    tile: float
    segments: tuple[list[_Segment], list[_Segment]]
    skyline: list[tuple[float, float, int, tuple[float, float, float]]]  # (x1, height, kind, rgb)
    objects: list[tuple[float, Callable[[_Canvas], None]]]
    sun: int  # -1 sun from the right (left side in shadow), 1 the opposite, 0 overcast
    shadow_w: float
    light: dict
    lat1d: np.ndarray

    @property
    def facade_x(self) -> tuple[float, float]:
        return self.c - self.rh - self.sw[0], self.c + self.rh + self.sw[1]

    def shadow_reach(self, z: np.ndarray) -> np.ndarray:
        """How far (m) the buildings' shadow reaches from the shaded facade at depth z: steps every 11 m."""
        return self.shadow_w * (0.7 + 0.6 * self.lat1d[np.mod(np.floor(z * (1 / 11.0)), 64).astype(np.intp)])

    def shade_at(self, x: float, z: float) -> float:
        """Cast-shadow factor for an object standing at world (X, z), consistent with the ground shadow."""
        if self.sun == 0:
            return 1.0
        xl, xr = self.facade_x
        reach = float(self.shadow_reach(np.array([z]))[0])
        in_shadow = x < xl + reach if self.sun < 0 else x > xr - reach
        return 0.6 if in_shadow else 1.0


def _sample_segments(r: _Rand, style: str, z_far: float, walls: list) -> list[_Segment]:
    """Facade stretches from the camera to the end of the street, mostly buildings."""
    lo, hi = {"downtown": (12.0, 34.0), "residential": (7.0, 16.0), "suburban": (4.0, 9.0)}[style]
    p_hedge, p_gap = {"downtown": (0.05, 0.08), "residential": (0.12, 0.12), "suburban": (0.3, 0.2)}[style]
    segs: list[_Segment] = []
    z = r.u(-4.0, 2.0)
    while z < z_far:
        z += r.u(7.0, 26.0) if style != "suburban" else r.u(6.0, 16.0)
        roll = r.u()
        kind = 1 if roll < p_hedge else 2 if roll < p_hedge + p_gap else 0
        floor_h = r.u(2.9, 3.6)
        fy0 = r.u(0.2, 0.35)
        fx0 = r.u(0.12, 0.3)
        segs.append(
            _Segment(
                z1=z,
                kind=kind,
                height=r.u(1.2, 2.6) if kind == 1 else r.u(lo, hi),
                rgb=r.rgb(r.pick(walls), 0.05, 0.1),
                win_sx=r.u(2.2, 4.0),
                win_fx=(fx0, r.u(0.65, 0.9)),
                floor_h=floor_h,
                win_fy=(fy0, r.u(0.7, 0.85)),
                shops=r.p(0.6 if style == "downtown" else 0.25),
                glass=r.rgb((0.16, 0.2, 0.26), 0.05, 0.35),
            )
        )
        if r.p(0.15) and segs[-1].kind == 0:  # a tall glass tower: big windows, dark walls
            segs[-1].win_fx, segs[-1].win_fy = (0.04, 0.96), (0.08, 0.92)
    segs[-1].z1 = math.inf
    return segs


def _sample_skyline(r: _Rand, style: str, leaf: tuple) -> list:
    """Frontal buildings and tree clumps closing the street at z_far, left to right in world X."""
    out = []
    x = -90.0
    hi = {"downtown": 45.0, "residential": 22.0, "suburban": 12.0}[style]
    while x < 90.0:
        x += r.u(6.0, 22.0)
        kind = 1 if r.p(0.25) else 2 if r.p(0.08) else 0
        rgb = _mix(r.rgb(r.pick(_WALLS)), (0.7, 0.72, 0.76), 0.35) if kind == 0 else r.rgb(leaf)
        out.append((x, r.u(4.0, hi) if kind == 0 else r.u(5.0, 12.0), kind, rgb))
    return out


def _sample_layout(r: _Rand) -> _Layout:
    roll = r.u()
    style = "downtown" if roll < 0.4 else "residential" if roll < 0.75 else "suburban"
    f_u = r.u(0.7, 1.0)
    cam = _Camera(u_vp=r.u(0.4, 0.6), v_h=r.u(0.36, 0.5), f_u=f_u, f_v=2.0 * f_u, h_c=r.u(1.3, 1.7))
    rh = r.u(3.0, 6.5)
    sroll = r.u()
    sky = "day" if sroll < 0.5 else "overcast" if sroll < 0.75 else "dusk" if sroll < 0.87 else "hazy"
    z_far = r.u(50.0, 140.0)
    leaf = r.rgb(r.pick(_LEAVES), 0.04, 0.15)
    walls = [r.pick(_WALLS) for _ in range(4)]  # a street has a handful of related facade colours
    grass_p = {"downtown": 0.1, "residential": 0.35, "suburban": 0.7}[style]
    lay = _Layout(
        cam=cam,
        style=style,
        sky=sky,
        c=r.u(-0.5, 0.5) * rh,
        rh=rh,
        sw=(r.u(2.5, 6.5), r.u(2.5, 6.5)),
        grass=tuple(r.u(0.8, 2.0) if r.p(grass_p) else 0.0 for _ in range(2)),
        beyond_lawn=(r.p(0.5), r.p(0.5)),
        lanes=max(2, round(2 * rh / r.u(3.0, 3.8))),
        z_far=z_far,
        crossing=r.u(6.0, 30.0) if r.p(0.45) else math.inf,
        road_rgb=r.rgb((0.36, 0.36, 0.37), 0.015, 0.3),
        walk_rgb=tuple(
            r.rgb(r.pick(((0.6, 0.6, 0.6), (0.7, 0.65, 0.55), (0.62, 0.45, 0.4))), 0.03, 0.12) for _ in range(2)
        ),
        leaf_rgb=leaf,
        tile=r.u(0.4, 1.2),
        segments=(_sample_segments(r, style, z_far, walls), _sample_segments(r, style, z_far, walls)),
        skyline=_sample_skyline(r, style, leaf),
        objects=[],
        sun=0 if sky in ("overcast", "hazy") else (-1 if r.p(0.5) else 1),
        shadow_w=r.u(1.0, 2.0 * rh + 4.0),
        light={},
        lat1d=r.g.random(65),
    )
    lay.light = _sample_light(r, sky)
    _sample_objects(r, lay)
    return lay


def _sample_light(r: _Rand, sky: str) -> dict:
    warm = {"dusk": 0.08, "day": 0.0, "overcast": -0.02, "hazy": 0.01}[sky]
    return {
        "gain": r.u(0.78, 1.12) * (0.85 if sky == "dusk" else 1.0),
        "temp": warm + r.u(-0.06, 0.06),
        "contrast": r.u(0.8, 1.15) * (0.9 if sky in ("overcast", "hazy") else 1.0),
        "sat": r.u(0.7, 1.25),
        "vignette": r.u(0.0, 0.35),
        "grain": r.u(0.01, 0.045),
        "cloud": r.u(0.0, 0.9) if sky != "overcast" else 1.0,
        "cloud_shadow": r.u(0.0, 0.25) if sky == "day" else 0.0,
    }


# ---------------------------------------------------------------------------------------------- objects


def _sample_objects(r: _Rand, lay: _Layout) -> None:
    """Vehicles, pedestrians, poles and trees, each with the depth used for painter's ordering."""
    c, rh = lay.c, lay.rh
    xl, xr = lay.facade_x
    objs = lay.objects
    parked = []
    for side in (-1, 1):  # parked cars along both kerbs
        if not r.p(0.65 if lay.style != "suburban" else 0.45):
            continue
        parked.append(side)
        z = r.u(2.5, 12.0)
        while z < lay.z_far * 0.8:
            car = _sample_vehicle(r, c + side * (rh - r.u(1.0, 1.3)), z, parked=True)
            if r.p(0.65):
                objs.append((z, _vehicle_drawer(car, lay)))
            z += car["L"] + r.u(0.6, 6.0)
    lane_w = 2 * rh / lay.lanes
    free = [k for k in range(lay.lanes) if not (k == 0 and -1 in parked or k == lay.lanes - 1 and 1 in parked)]
    for _ in range(r.i(0, 5) if free else 0):  # moving traffic, outside the parking lanes
        lane = r.pick(free)
        x = c - rh + (lane + 0.5) * lane_w + r.u(-0.3, 0.3)
        z = r.u(4.0, 60.0)
        car = _sample_vehicle(r, x, z, parked=False, oncoming=lane < lay.lanes // 2 and r.p(0.7))
        objs.append((z, _vehicle_drawer(car, lay)))
    n_people = r.i(3, 16 if lay.style == "downtown" else 10)
    for _ in range(n_people):  # pedestrians on sidewalks, some in small groups
        side = -1 if r.p(0.5) else 1
        x = c + side * (rh + r.u(0.4, lay.sw[side > 0] - 0.3))
        t = r.u()
        z = 2.5 + 40.0 * t * (0.4 + 0.6 * t)  # denser near the camera; no pow(): libm varies
        for k in range(1 if r.p(0.6) else r.i(2, 5)):
            objs.append((z + 0.7 * k, _person_drawer(_sample_person(r, x + r.u(-0.8, 0.8), z + 0.7 * k), lay)))
    if math.isfinite(lay.crossing):  # people on the zebra crossing
        for _ in range(r.i(0, 5)):
            z = lay.crossing + r.u(0.3, 3.5)
            objs.append((z, _person_drawer(_sample_person(r, c + r.u(-rh, rh), z), lay)))
    for side in (-1, 1):  # street lamps, signs, traffic lights near the kerb
        x = c + side * (rh + r.u(0.35, 0.8))
        if r.p(0.8):
            z, step = r.u(2.0, 14.0), r.u(12.0, 30.0)
            while z < lay.z_far:
                objs.append((z, _pole_drawer(_sample_pole(r, x, z, "lamp", side), lay)))
                z += step
        for _ in range(r.i(0, 4)):
            z = r.u(3.0, 45.0)
            kind = "light" if r.p(0.3) else "sign"
            objs.append((z, _pole_drawer(_sample_pole(r, x + side * r.u(0.0, 0.6), z, kind, side), lay)))
    tree_p = {"downtown": 0.35, "residential": 0.7, "suburban": 0.85}[lay.style]
    for side in (-1, 1):  # street trees on the sidewalk or grass strip
        if not r.p(tree_p):
            continue
        x = c + side * (rh + min(lay.sw[side > 0] * 0.5, r.u(1.0, 2.5)))
        z, step = r.u(2.0, 10.0), r.u(6.0, 15.0)
        while z < lay.z_far * 0.9:
            if r.p(0.85):
                objs.append((z, _tree_drawer(_sample_tree(r, x + r.u(-0.3, 0.3), z, lay.leaf_rgb), lay)))
            z += step * r.u(0.8, 1.2)
    for side in (-1, 1):  # bushes in front of facades
        for _ in range(r.i(0, 4)):
            x = (xl if side < 0 else xr) - side * r.u(0.6, 1.5)
            z = r.u(3.0, 40.0)
            tree = _sample_tree(r, x, z, lay.leaf_rgb, bush=True)
            objs.append((z, _tree_drawer(tree, lay)))


def _sample_vehicle(r: _Rand, x: float, z: float, parked: bool, oncoming: bool = False) -> dict:
    roll = r.u()
    kind = "car" if roll < 0.78 or parked and roll < 0.9 else "van" if roll < 0.93 else "bus"
    w, h, length = {
        "car": (r.u(1.7, 1.9), r.u(1.38, 1.55), r.u(3.9, 4.8)),
        "van": (r.u(1.9, 2.05), r.u(1.9, 2.4), r.u(4.8, 5.8)),
        "bus": (r.u(2.45, 2.55), r.u(2.9, 3.3), r.u(9.0, 12.0)),
    }[kind]
    body = r.rgb(r.pick(_CARS), 0.04, 0.12)
    return {
        "x": x,
        "z": z,
        "w": w,
        "h": h,
        "L": length,
        "kind": kind,
        "front": oncoming,
        "hb": h * (0.58 if kind == "car" else 0.45 if kind == "van" else 0.35),
        "body": body,
        "glass": r.rgb((0.12, 0.15, 0.2), 0.04, 0.35),
    }


def _vehicle_drawer(car: dict, lay: _Layout) -> Callable[[_Canvas], None]:
    return lambda cv: _draw_vehicle(cv, car, lay.shade_at(car["x"], car["z"]))


def _sample_person(r: _Rand, x: float, z: float) -> dict:
    coat = r.p(0.3)
    return {
        "x": x,
        "z": z,
        "h": r.u(1.55, 1.95) if r.p(0.9) else r.u(1.05, 1.35),
        "stride": r.u(0.0, 0.16),
        "swing": r.u(-0.15, 0.15),
        "coat": coat,
        "shirt": r.rgb(r.pick(_CLOTHES), 0.05, 0.15),
        "pants": r.rgb(r.pick(_PANTS), 0.03, 0.15),
        "skin": r.rgb(r.pick(_SKIN), 0.03, 0.05),
        "hair": r.rgb((0.12, 0.09, 0.07), 0.03, 0.6),
        "sleeve": r.p(0.6),
        "bag": r.p(0.3),
    }


def _person_drawer(p: dict, lay: _Layout) -> Callable[[_Canvas], None]:
    return lambda cv: _draw_person(cv, p, lay.shade_at(p["x"], p["z"]))


def _sample_pole(r: _Rand, x: float, z: float, kind: str, side: int) -> dict:
    rgb = r.rgb(r.pick(((0.5, 0.5, 0.52), (0.25, 0.26, 0.27), (0.2, 0.3, 0.25), (0.12, 0.12, 0.12))), 0.03, 0.15)
    return {
        "x": x,
        "z": z,
        "kind": kind,
        "dir": -side,
        "rgb": rgb,
        "w": r.u(0.16, 0.32) if kind == "lamp" else r.u(0.1, 0.18),
        "h": r.u(6.0, 9.5) if kind == "lamp" else r.u(2.4, 3.4) if kind == "sign" else r.u(3.2, 4.5),
        "arm": r.u(0.8, 2.2),
        "plate": r.pick(((0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.9, 0.9, 0.9), (0.9, 0.75, 0.1))),
        "round": r.p(0.5),
        "lit": r.i(0, 3),
    }


def _pole_drawer(p: dict, lay: _Layout) -> Callable[[_Canvas], None]:
    return lambda cv: _draw_pole(cv, p, lay.shade_at(p["x"], p["z"]))


def _sample_tree(r: _Rand, x: float, z: float, leaf: tuple, bush: bool = False) -> dict:
    ry = r.u(0.6, 1.2) if bush else r.u(1.5, 3.6)
    return {
        "x": x,
        "z": z,
        "rx": ry * r.u(0.8, 1.4),
        "ry": ry,
        "cy": ry * 0.85 if bush else r.u(2.2, 3.5) + ry,
        "tw": 0.0 if bush else r.u(0.18, 0.4),
        "leaf": r.rgb(leaf, 0.04, 0.15),
        "trunk": r.rgb((0.33, 0.26, 0.2), 0.03, 0.2),
        "blob": r.g.random((7, 7), dtype=F32),
    }


def _tree_drawer(t: dict, lay: _Layout) -> Callable[[_Canvas], None]:
    return lambda cv: _draw_tree(cv, t, lay.shade_at(t["x"], t["z"]))


# ------------------------------------------------------------------------------------------------ draw


def _draw_sky(cv: _Canvas, lay: _Layout) -> None:
    cam = cv.cam
    rs = cv.rows(-1.0, cam.v_h)
    if rs is None:
        return
    zen, hor, cloud = _SKIES[lay.sky]
    t = np.clip((cam.v_h - cv.v[rs]) / max(cam.v_h, 1e-6), 0.0, 1.0)
    t = (t * (2.0 - t)).astype(F32)[None, :, None]
    base = np.asarray(hor, F32)[:, None, None] + (np.asarray(zen, F32) - np.asarray(hor, F32))[:, None, None] * t
    n = cv.coarse[rs] + F32(0.35) * (cv.fine[rs] - F32(0.5))
    thr = F32(0.75 - 0.45 * lay.light["cloud"])
    cov = np.clip((n - thr) * F32(3.0), 0.0, 1.0)
    cloud_col = np.asarray(cloud, F32)[:, None, None] * (F32(0.8) + F32(0.3) * cv.fine[rs])
    cv.image[:, rs] = base + (cloud_col - base) * cov
    cv.labels[rs] = SKY


def _select_u8(cond: np.ndarray, value: int, m: np.ndarray) -> np.ndarray:
    """``where(cond, value, m)`` for uint8 arrays by wrap-around arithmetic (much faster than np.where)."""
    return m - (m - np.uint8(value)) * cond.view(np.uint8)


def _draw_ground(cv: _Canvas, lay: _Layout) -> None:
    """Road (lane markings, zebra, patches), kerbs, sidewalks (tiles), grass strips and lawns."""
    cam = cv.cam
    rs = cv.rows(cam.v_h + 1e-9, 2.0)
    if rs is None:
        return
    z64 = cam.f_v * cam.h_c / (cv.v[rs] - cam.v_h)
    z = z64.astype(F32)[:, None]
    rel = (cv.u - cam.u_vp).astype(F32)[None, :] * (z64 / cam.f_u).astype(F32)[:, None] - F32(lay.c)
    a = np.abs(rel)
    is_right = rel > 0
    right = is_right.astype(F32)
    rh = F32(lay.rh)
    kerb = rh + F32(0.22)
    sw_edge = rh + F32(lay.sw[0]) + F32(lay.sw[1] - lay.sw[0]) * right
    grass_edge = kerb + F32(lay.grass[0]) + F32(lay.grass[1] - lay.grass[0]) * right
    grass = (a >= kerb) & (a < grass_edge)
    lawn_l, lawn_r = lay.beyond_lawn
    if lawn_l or lawn_r:
        beyond = a >= sw_edge
        if not (lawn_l and lawn_r):
            beyond &= is_right if lawn_r else ~is_right
        grass |= beyond
    road = a < rh
    # materials: 0 asphalt, 1 paint, 2 kerb, 3 sidewalk L, 4 sidewalk R, 5 grass
    m = np.uint8(3) + is_right.view(np.uint8)
    m = _select_u8(grass, 5, m)
    m = _select_u8(a < kerb, 2, m)
    m = _select_u8(road, 0, m)
    lane_w = F32(2 * lay.rh / lay.lanes)
    q = (rel + rh) * (F32(1) / lane_w)
    dist = np.abs(q - np.floor(q + F32(0.5))) * lane_w
    edge = (q < 0.5) | (q > lay.lanes - 0.5)
    dashed = _frac(z * F32(1 / 9.0) + F32(lay.lat1d[0])) < F32(0.45)
    paint = road & (dist < F32(0.08)) & (edge | dashed)
    if math.isfinite(lay.crossing):
        zc = F32(lay.crossing)
        paint |= road & (z > zc) & (z < zc + F32(4.0)) & (_frac(rel * F32(1 / 1.1)) < F32(0.5))
    m = _select_u8(paint, 1, m)
    table = np.array(
        [
            lay.road_rgb,
            (0.86, 0.86, 0.82),
            (0.72, 0.72, 0.7),
            lay.walk_rgb[0],
            lay.walk_rgb[1],
            _mix(lay.leaf_rgb, (0.45, 0.5, 0.2), 0.3),
        ],
        F32,
    ).T
    tex_amp = np.array([0.2, 0.3, 0.2, 0.25, 0.25, 1.1], F32)
    f = F32(1) + tex_amp.take(m) * (cv.fine[rs] - F32(0.5))
    patch = (m == 0) & (cv.coarse[rs] > F32(0.8))  # repaired asphalt
    joints = (
        (m >= 3)
        & (m <= 4)
        & ((_frac(rel * F32(1 / lay.tile)) < F32(0.06)) | (_frac(z * F32(1 / lay.tile)) < F32(0.06)))
    )
    f *= F32(1) - F32(0.12) * patch.astype(F32) - F32(0.2) * joints.astype(F32)
    if lay.sun != 0:  # building shadow along one side, its edge stepping with the building heights
        xl, xr = lay.facade_x
        wob = lay.shadow_reach(z64).astype(F32)[:, None]
        edge_x = F32(xl - lay.c) + wob if lay.sun < 0 else F32(xr - lay.c) - wob
        in_shadow = rel < edge_x if lay.sun < 0 else rel > edge_x
        f *= F32(1) - F32(0.42) * in_shadow.astype(F32)
    haze = np.clip(z * F32(1 / 400.0), 0.0, 0.5)
    f *= F32(1) - haze
    hz_col = np.asarray(_SKIES[lay.sky][1], F32)
    for k in range(3):
        cv.image[k, rs] = table[k].take(m) * f + hz_col[k] * haze
    # labels: road 0, sidewalk 1, vegetation 3 (grass)
    lab = np.uint8(SIDEWALK) * (~road).view(np.uint8) + np.uint8(VEGETATION - SIDEWALK) * (m == 5).view(np.uint8)
    cv.labels[rs] = lab


def _draw_skyline(cv: _Canvas, lay: _Layout) -> None:
    """Buildings and tree clumps across the far end of the street (hazy, low detail)."""
    cam = cv.cam
    zf = lay.z_far
    x = (cv.u - cam.u_vp) * (zf / cam.f_u)
    ends = np.array([s[0] for s in lay.skyline])
    idx = np.minimum(np.searchsorted(ends, x), len(ends) - 1)
    heights = np.array([s[1] for s in lay.skyline])[idx]
    kinds = np.array([s[2] for s in lay.skyline])[idx]
    jag = _noise1d(lay.lat1d, x / 3.0)
    heights = np.where(kinds == 1, heights + 2.0 * jag, np.where(kinds == 2, 0.0, heights))
    top = (cam.v_h + cam.f_v * (cam.h_c - heights) / zf).astype(F32)
    bot = cam.v(0.0, zf)
    rs = cv.rows(float(top.min()), bot)
    if rs is None:
        return
    v = cv.v32[rs][:, None]
    mask = (v >= top[None, :]) & (v < F32(bot))
    rgb = np.array([s[3] for s in lay.skyline], F32).T[:, idx][:, None, :]
    y = F32(cam.h_c) - (v - F32(cam.v_h)) * F32(zf / cam.f_v)
    win = (kinds == 0)[None, :] & (_frac(x / 1.6).astype(F32)[None, :] < F32(0.5)) & (_frac(y * F32(1 / 3.2)) < 0.5)
    tex = np.where(kinds == 1, F32(0.9), F32(0.2))[None, :]
    hz_t = F32(min(0.6, zf / 250.0))
    f = (1 + tex * (cv.fine[rs] - F32(0.5))) * (F32(1) - F32(0.15) * win.astype(F32)) * (F32(1) - hz_t)
    col = rgb * f + np.asarray(_SKIES[lay.sky][1], F32)[:, None, None] * hz_t
    cv.put(rs, slice(None), mask, col, np.where(kinds == 1, np.uint8(VEGETATION), np.uint8(BUILDING))[None, :])


def _facade_columns(cv: _Canvas, lay: _Layout) -> dict:
    """Per image column: depth of the facade seen there and the parameters of its segment."""
    cam = cv.cam
    du = cv.u - cam.u_vp
    left = du < 0
    xl, xr = lay.facade_x
    with np.errstate(divide="ignore", invalid="ignore"):
        zc = np.where(left, xl, xr) * cam.f_u / du
    valid = np.isfinite(zc) & (zc > 0.05) & (zc < lay.z_far)
    zc = np.where(valid, zc, 1.0)
    segs = lay.segments[0] + lay.segments[1]
    n_left = len(lay.segments[0])
    ends_l = np.array([s.z1 for s in lay.segments[0]])
    ends_r = np.array([s.z1 for s in lay.segments[1]])
    idx = np.where(left, np.searchsorted(ends_l, zc), n_left + np.searchsorted(ends_r, zc))

    def col(attr: Callable[[_Segment], object]) -> np.ndarray:
        return np.array([attr(s) for s in segs])[idx]

    kind = np.where(valid, col(lambda s: s.kind), 2)
    height = col(lambda s: s.height)
    height = np.where(kind == 1, height + 0.7 * _noise1d(lay.lat1d, zc / 1.3), height)
    height = np.where(kind == 2, 0.0, height)
    return {
        "zc": zc,
        "kind": kind,
        "height": height,
        "left": left,
        "rgb": np.array([s.rgb for s in segs], F32).T[:, idx],
        "glass": np.array([s.glass for s in segs], F32).T[:, idx],
        "win_col": (_frac(zc / col(lambda s: s.win_sx) + idx * 0.37) > col(lambda s: s.win_fx[0]))
        & (_frac(zc / col(lambda s: s.win_sx) + idx * 0.37) < col(lambda s: s.win_fx[1])),
        "floor_h": col(lambda s: s.floor_h),
        "fy0": col(lambda s: s.win_fy[0]),
        "fy1": col(lambda s: s.win_fy[1]),
        "shop_col": col(lambda s: s.shops)
        & (_frac(zc / 5.0 + idx * 0.61) > 0.15)
        & (_frac(zc / 5.0 + idx * 0.61) < 0.85),
    }


def _draw_facades(cv: _Canvas, lay: _Layout) -> None:
    """Building fronts (windows, shop fronts, cornices) and hedges on the planes lining the street."""
    cam = cv.cam
    fc = _facade_columns(cv, lay)
    zc, kind, height = fc["zc"], fc["kind"], fc["height"]
    top = np.where(kind == 2, 9.0, cam.v_h + cam.f_v * (cam.h_c - height) / zc).astype(F32)
    bot = np.where(kind == 2, 9.0, cam.v_h + cam.f_v * cam.h_c / zc).astype(F32)
    rs = cv.rows(-1.0, float(np.where(kind == 2, 0.0, bot).max()))
    if rs is None:
        return
    v = cv.v32[rs][:, None]
    mask = (v >= top[None, :]) & (v < bot[None, :])
    y = F32(cam.h_c) - (v - F32(cam.v_h)) * (zc / cam.f_v).astype(F32)[None, :]
    fh = fc["floor_h"].astype(F32)[None, :]
    fy = _frac(y / fh)
    bld = (kind == 0)[None, :]
    h32 = height.astype(F32)[None, :]
    gf = fh * F32(1.15)
    win = bld & fc["win_col"][None, :] & (fy > fc["fy0"].astype(F32)) & (fy < fc["fy1"].astype(F32))
    win &= (y > gf) & (y < h32 - F32(0.7))
    shop = bld & fc["shop_col"][None, :] & (y > F32(0.25)) & (y < gf - F32(0.6))
    cornice = bld & (y > h32 - F32(0.35))
    leaf = np.asarray(lay.leaf_rgb, F32)[:, None]
    base = np.where((kind == 1)[None, :], leaf, fc["rgb"])  # (3, W)
    tex = np.where(kind == 1, F32(1.0), F32(0.22))[None, :]
    side_shade = np.where(fc["left"], 0.62 if lay.sun < 0 else 1.0, 0.62 if lay.sun > 0 else 1.0)
    haze = np.clip(zc / 300.0, 0.0, 0.5)
    colfac = (side_shade * (1.0 - haze)).astype(F32)  # per column: shading and haze
    wall = (base * colfac)[:, None, :]
    glass = (fc["glass"] * colfac)[:, None, :]
    winf = (win | shop).astype(F32)
    refl = F32(0.75) + F32(0.6) * (F32(1.0) - (fy - fc["fy0"].astype(F32)))  # sky reflection, brighter on top
    f_wall = (1 + tex * (cv.fine[rs] - F32(0.5))) * (F32(1) + F32(0.2) * cornice.astype(F32)) * (F32(1) - winf)
    hz = np.asarray(_SKIES[lay.sky][1], F32)[:, None, None] * haze.astype(F32)[None, None, :]
    col = wall * f_wall + glass * (refl * winf) + hz
    lab = np.where(kind == 1, np.uint8(VEGETATION), np.uint8(BUILDING))[None, :]
    cv.put(rs, slice(None), mask, col, lab)


def _draw_vehicle(cv: _Canvas, car: dict, light: float) -> None:
    """A car/van/bus as a box: ground shadow, visible side face, then rear (or front) face."""
    x, z, w, h, length, hb = car["x"], car["z"], car["w"], car["h"], car["L"], car["hb"]
    kind = car["kind"]
    g = cv.ground(x - w / 2 - 0.15, x + w / 2 + 0.15, z - 0.2, z + length + 0.1)
    if g is not None:
        rs, cs, gx, gz = g
        cv.darken(rs, cs, (gx > x - w / 2 - 0.15) & (gx < x + w / 2 + 0.15) & (gz > z - 0.2) & (gz < z + length), 0.45)
    body = car["body"]
    shade = F32(light)
    xl, xr = x - w / 2, x + w / 2
    xp = xl if xl > 0.05 else xr if xr < -0.05 else None
    if xp is not None:
        p = cv.side(xp, z, z + length, 0.0, h)
        if p is not None:
            _vehicle_side(cv, p, car, z, shade * F32(0.85))
    p = cv.frontal(z, xl, xr, 0.0, h)
    if p is None:
        return
    rs, cs, px, y = p
    xr_ = np.abs(px - F32(x))
    hw = F32(w / 2)
    yn = (y - F32(hb)) * F32(1 / (h - hb))
    taper = {"car": (0.9, 0.16), "van": (0.97, 0.04), "bus": (1.0, 0.0)}[kind]
    cab_hw = hw * (F32(taper[0]) - F32(taper[1]) * yn)
    lower = (y >= F32(0.2)) & (y < F32(hb)) & (xr_ < hw - np.maximum(F32(0), y - F32(hb - 0.08)) * F32(0.6))
    cabin = (y >= F32(hb)) & (y < F32(h)) & (xr_ < cab_hw)
    tyres = (y < F32(0.34)) & (xr_ > hw - F32(0.34)) & (xr_ < hw - F32(0.04))
    vshade = shade * (F32(0.8) + F32(0.3) * y * F32(1 / h))
    cv.paint(rs, cs, lower | cabin, VEHICLE, body, 0.12, vshade)
    cv.paint(rs, cs, tyres, VEHICLE, (0.06, 0.06, 0.06), 0.2)
    cv.paint(rs, cs, lower & (y < F32(0.36)), VEHICLE, (0.12, 0.12, 0.13), 0.2, shade)  # bumper
    wy0 = 1.25 if kind == "bus" and car["front"] is False else hb + 0.06
    window = cabin & (y > F32(wy0)) & (y < F32(h - 0.07)) & (xr_ < cab_hw - F32(0.1))
    if kind == "bus" and car["front"]:
        window = (y > F32(1.2)) & (y < F32(h - 0.25)) & (xr_ < hw - F32(0.1))
    cv.paint(rs, cs, window, VEHICLE, car["glass"], 0.1, shade * (F32(0.8) + F32(0.5) * np.clip(yn, 0, 1)))
    lamps = (y > F32(hb - 0.24)) & (y < F32(hb - 0.08)) & (xr_ > hw - F32(0.32)) & (xr_ < hw - F32(0.05))
    lamp_rgb = (0.95, 0.92, 0.75) if car["front"] else (0.85, 0.08, 0.06)
    cv.paint(rs, cs, lamps & lower, VEHICLE, lamp_rgb, 0.1)
    plate = (xr_ < F32(0.26)) & (y > F32(0.38)) & (y < F32(0.5))
    cv.paint(rs, cs, plate, VEHICLE, (0.92, 0.92, 0.9), 0.1, shade)


def _vehicle_side(cv: _Canvas, p: Patch, car: dict, z: float, shade: np.float32) -> None:
    rs, cs, zc, y = p
    length, h, hb, kind = car["L"], car["h"], car["hb"], car["kind"]
    zr = zc - F32(z)
    if car["front"]:
        zr = F32(length) - zr  # oncoming: the bonnet is nearest
    inside = (zr >= 0) & (zr <= F32(length))
    r_w = 0.5 if kind == "bus" else 0.33
    zw = (1.9, length - 2.6) if kind == "bus" else (0.85, length - 0.9)
    wheel = np.zeros(y.shape, bool)
    rim = np.zeros(y.shape, bool)
    for c in zw:
        d2 = (zr - F32(c)) ** 2 + (y - F32(r_w)) ** 2
        wheel |= d2 < F32(r_w * r_w)
        rim |= d2 < F32(0.3 * r_w * r_w)
    lower = inside & (y >= F32(0.2)) & (y < F32(hb))
    yn = (y - F32(hb)) * F32(1 / (h - hb))
    rear0, rear_k, front0, front_k = {
        "car": (0.3, 0.55, 1.0, 0.75),
        "van": (0.05, 0.05, 0.25, 0.5),
        "bus": (0.0, 0.0, 0.0, 0.0),
    }[kind]
    lo = F32(rear0) + F32(rear_k) * yn
    hi = F32(length - front0) - F32(front_k) * yn
    cabin = (y >= F32(hb)) & (y < F32(h)) & (zr > lo) & (zr < hi)
    if kind == "bus":
        window = (y > F32(1.25)) & (y < F32(h - 0.3)) & inside & (_frac(zr * F32(1 / 1.5)) > F32(0.1))
        window &= (zr > F32(0.3)) & (zr < F32(length - 0.3))
    else:
        mid = F32(0.5 * (rear0 + length - front0) - 0.2)
        window = cabin & (y > F32(hb + 0.05)) & (y < F32(h - 0.06)) & (zr > lo + F32(0.1)) & (zr < hi - F32(0.1))
        window &= np.abs(zr - mid) > F32(0.07)
    vshade = shade * (F32(0.8) + F32(0.3) * y * F32(1 / h))
    cv.paint(rs, cs, lower | cabin, VEHICLE, car["body"], 0.12, vshade)
    cv.paint(rs, cs, window, VEHICLE, car["glass"], 0.1, shade)
    cv.paint(rs, cs, wheel, VEHICLE, (0.06, 0.06, 0.06), 0.2)
    cv.paint(rs, cs, rim, VEHICLE, (0.55, 0.56, 0.58), 0.2, shade)


def _draw_person(cv: _Canvas, pr: dict, light: float) -> None:
    """Legs, torso (or coat), arms, head and hair on a plane facing the camera, in units of body height."""
    hp = pr["h"]
    p = cv.frontal(pr["z"], pr["x"] - 0.3 * hp, pr["x"] + 0.3 * hp, 0.0, hp)
    if p is None:
        return
    rs, cs, px, py = p
    x = (px - F32(pr["x"])) * F32(1 / hp)
    s = py * F32(1 / hp)
    shade = F32(light)
    t = np.clip((F32(0.5) - s) * F32(2.0), 0.0, 1.0)
    st = F32(pr["stride"])
    legs = (s < F32(0.52)) & (
        (np.abs(x + F32(0.045) + st * t) < F32(0.04)) | (np.abs(x - F32(0.045) - st * t) < F32(0.04))
    )
    hw = np.where(s > F32(0.79), F32(0.11) - (s - F32(0.79)) * F32(1.6), F32(0.105))
    hw = np.where(s < F32(0.58), F32(0.095), hw)
    bottom = F32(0.3) if pr["coat"] else F32(0.48)
    if pr["coat"]:
        hw = np.where(s < F32(0.52), F32(0.095) + (F32(0.52) - s) * F32(0.25), hw)
    torso = (s >= bottom) & (s < F32(0.845)) & (np.abs(x) < hw)
    sw = F32(pr["swing"]) * (F32(0.8) - s)
    arm_c = F32(0.135) + np.abs(sw) * F32(0.5)
    arms = (
        (s > F32(0.45)) & (s < F32(0.8)) & ((np.abs(x - arm_c - sw) < F32(0.03)) | (np.abs(x + arm_c - sw) < F32(0.03)))
    )
    head = ((x * F32(1 / 0.062)) ** 2 + ((s - F32(0.915)) * F32(1 / 0.075)) ** 2) < F32(1.0)
    neck = (s >= F32(0.83)) & (s < F32(0.87)) & (np.abs(x) < F32(0.03))
    hair = head & ((s > F32(0.935)) | (((x * F32(1 / 0.062)) ** 2) > F32(0.75)) & (s > F32(0.88)))
    cv.paint(rs, cs, legs, PERSON, pr["pants"], 0.2, shade)
    cv.paint(rs, cs, legs & (s < F32(0.035)), PERSON, (0.08, 0.07, 0.07), 0.1)
    cv.paint(rs, cs, torso, PERSON, pr["shirt"], 0.2, shade)
    if pr["bag"]:
        bag = (s > F32(0.42)) & (s < F32(0.58)) & (np.abs(x - F32(0.16)) < F32(0.05))
        cv.paint(rs, cs, bag, PERSON, (0.3, 0.2, 0.12), 0.2, shade)
    cv.paint(rs, cs, arms & (s > F32(0.62)), PERSON, pr["shirt"], 0.2, shade * F32(0.9))
    cv.paint(rs, cs, arms & (s <= F32(0.62)), PERSON, pr["shirt"] if pr["sleeve"] else pr["skin"], 0.2, shade)
    cv.paint(rs, cs, head | neck, PERSON, pr["skin"], 0.15, shade)
    cv.paint(rs, cs, hair, PERSON, pr["hair"], 0.2, shade)


def _draw_pole(cv: _Canvas, pl: dict, light: float) -> None:
    """Lamp post (arm + head), sign (round or square plate) or traffic light, all labelled pole."""
    x, z, h, d = pl["x"], pl["z"], pl["h"], pl["dir"]
    w = max(pl["w"], 0.006 * z / cv.cam.f_u)  # keep distant poles at least ~0.6% of the width wide
    reach = pl["arm"] + 0.45 if pl["kind"] == "lamp" else 0.45
    p = cv.frontal(z, x - (reach if d < 0 else 0.45), x + (reach if d > 0 else 0.45), 0.0, h + 0.1)
    if p is None:
        return
    rs, cs, px, y = p
    dx = px - F32(x)
    shade = F32(light) * (F32(1.0) + F32(0.5) * np.clip(dx * F32(1 / w), -0.5, 0.5))
    post = (np.abs(dx) < F32(w / 2)) & (y < F32(h))
    cv.paint(rs, cs, post, POLE, pl["rgb"], 0.15, shade)
    if pl["kind"] == "lamp":
        along = dx * F32(d)
        arm = (y > F32(h - 0.12)) & (y < F32(h)) & (along > 0) & (along < F32(pl["arm"]))
        head = (y > F32(h - 0.28)) & (y < F32(h + 0.05)) & (np.abs(along - F32(pl["arm"])) < F32(0.4))
        cv.paint(rs, cs, arm | head, POLE, pl["rgb"], 0.15, F32(light))
        cv.paint(rs, cs, head & (y < F32(h - 0.2)), POLE, (0.95, 0.93, 0.8), 0.05)
    elif pl["kind"] == "sign":
        hs = F32(h - 0.35)
        plate = (
            (dx * dx + (y - hs) ** 2 < F32(0.1225))
            if pl["round"]
            else ((np.abs(dx) < F32(0.33)) & (np.abs(y - hs) < F32(0.3)))
        )
        cv.paint(rs, cs, plate, POLE, pl["plate"], 0.1, F32(light))
        inner = (
            (dx * dx + (y - hs) ** 2 < F32(0.06))
            if pl["round"]
            else ((np.abs(dx) < F32(0.24)) & (np.abs(y - hs) < F32(0.21)))
        )
        cv.paint(rs, cs, inner, POLE, (0.92, 0.92, 0.92) if pl["plate"][0] < 0.85 else (0.1, 0.1, 0.1), 0.1, F32(light))
    else:
        box = (np.abs(dx) < F32(0.18)) & (y > F32(h - 1.0)) & (y < F32(h))
        cv.paint(rs, cs, box, POLE, (0.1, 0.1, 0.1), 0.1)
        yc = F32(h - 0.18 - 0.32 * pl["lit"])
        lit = dx * dx + (y - yc) ** 2 < F32(0.012)
        cv.paint(rs, cs, lit, POLE, ((0.95, 0.15, 0.1), (0.95, 0.7, 0.1), (0.2, 0.9, 0.4))[pl["lit"]], 0.05)


def _draw_tree(cv: _Canvas, t: dict, light: float) -> None:
    """Trunk plus a lumpy crown (per-tree blob noise) with a strong leafy texture and top-lit shading."""
    x, z, rx, ry, cy = t["x"], t["z"], t["rx"], t["ry"], t["cy"]
    p = cv.frontal(z, x - 1.3 * rx, x + 1.3 * rx, 0.0, cy + 1.3 * ry)
    if p is None:
        return
    rs, cs, px, y = p
    dx = (px - F32(x)) * F32(1 / rx)
    dy = (y - F32(cy)) * F32(1 / ry)
    blob = _bilinear(t["blob"], (dy[:, 0] * 0.5 + 0.5) * 6.0, (dx[0] * 0.5 + 0.5) * 6.0, smooth=True)
    crown = dx * dx + dy * dy < F32(0.62) + F32(0.8) * blob + F32(0.35) * (cv.fine[rs, cs] - F32(0.5))
    if t["tw"] > 0:
        trunk = (np.abs(px - F32(x)) < F32(t["tw"] / 2)) & (y < F32(cy))
        cv.paint(rs, cs, trunk, VEGETATION, t["trunk"], 0.3, F32(light))
    vshade = F32(light) * (F32(0.85) - F32(0.25) * dy) * (F32(0.55) + F32(0.9) * cv.fine[rs, cs])
    cv.paint(rs, cs, crown, VEGETATION, t["leaf"], 0.0, vshade)


def _finish(cv: _Canvas, lay: _Layout, grain_rng: np.random.Generator) -> np.ndarray:
    """Per-scene lighting: cloud shadows, gain, colour temperature, saturation, contrast, vignette, grain.

    All of these are linear per pixel, so they are folded into one scale and one offset per pixel:
    out_c = img_c * (gain_c * sat * scale) + (lum * (1 - sat) * scale + 0.5 * (1 - contrast) + grain).
    """
    li = lay.light
    img = cv.image
    g = li["gain"]
    gain = (g * (1 + li["temp"]), g, g * (1 - li["temp"]))
    sat, k = li["sat"], li["contrast"]
    lum = F32(0.3 * gain[0]) * img[0] + F32(0.59 * gain[1]) * img[1] + F32(0.11 * gain[2]) * img[2]
    vu = ((cv.u - 0.5) ** 2 * li["vignette"]).astype(F32)
    vv = ((cv.v - 0.5) ** 2 * li["vignette"]).astype(F32)
    scale = (F32(1) - vv[:, None] - vu[None, :]) * F32(k)
    if li["cloud_shadow"] > 0:
        scale *= F32(1.0) - F32(li["cloud_shadow"]) * np.clip((cv.coarse - F32(0.45)) * F32(4.0), 0.0, 1.0)
    grain = grain_rng.random((cv.h, cv.w), dtype=F32)
    grain *= F32(2 * li["grain"])
    offset = lum * F32(1 - sat)
    offset *= scale
    offset += grain
    offset += F32(0.5 * (1 - k) - li["grain"])
    for c in range(3):
        img[c] *= scale
        img[c] *= F32(gain[c] * sat)
        img[c] += offset
    return np.clip(img, 0.0, 1.0, out=img)


def generate_scene(seed: int, height: int, width: int) -> Scene:
    """Render scene ``seed`` at ``height`` x ``width``: float32 image (3,H,W) in [0,1], uint8 labels (H,W)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}x{width}")
    layout_ss, noise_ss, grain_ss = np.random.SeedSequence(int(seed)).spawn(3)
    lay = _sample_layout(_Rand(np.random.Generator(np.random.PCG64(layout_ss))))
    noise_rng = np.random.Generator(np.random.PCG64(noise_ss))
    noise = np.stack(
        [
            _fbm(noise_rng, ((2, 4), (4, 8), (8, 16), (16, 32)), 0.5),
            _fbm(noise_rng, ((12, 24), (24, 48), (48, 96), (96, 192)), 0.7),
        ]
    )
    cv = _Canvas(int(height), int(width), lay.cam, noise)
    _draw_sky(cv, lay)
    _draw_ground(cv, lay)
    _draw_skyline(cv, lay)
    _draw_facades(cv, lay)
    for _, draw in sorted(lay.objects, key=lambda o: -o[0]):
        draw(cv)
    image = _finish(cv, lay, np.random.Generator(np.random.PCG64(grain_ss)))
    return Scene(image=np.ascontiguousarray(image, F32), labels=cv.labels, seed=int(seed))


def generate_batch(seeds, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack scenes for training: images (N,3,H,W) float32 and labels (N,H,W) uint8."""
    scenes = [generate_scene(s, height, width) for s in seeds]
    return np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes])


def colorize(labels: np.ndarray) -> np.ndarray:
    """Labels (H,W) -> palette colours (H,W,3) uint8; ignore (255) shows black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[labels]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float (3,H,W) in [0,1] -> (H,W,3) uint8 by rounding, as the PNG files store it."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


# ------------------------------------------------------------------------------------ Cityscapes layout

CITY = "procedural"


def save_png(path: Path, array: np.ndarray) -> None:
    """Write (H,W,3) or (H,W) uint8 as an 8-bit PNG (RGB or greyscale 'L')."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.ndim == 3 else "L").save(path)


def scene_name(j: int) -> str:
    """Cityscapes-style stem of held-out scene ``j`` (city, sequence, frame)."""
    return f"{CITY}_000000_{j:06d}"


def write_cityscapes_layout(
    root: Path, *, num_images: int, height: int, width: int, split: str = "val", first_held_out: int = 0
) -> list[Path]:
    """Render held-out scenes into the Cityscapes folder layout so ``certseg-bench`` reads them like real data.

    Writes ``leftImg8bit/{split}/procedural/*_leftImg8bit.png`` (RGB) and
    ``gtFine/{split}/procedural/*_gtFine_labelTrainIds.png`` (ids index ``CLASSES``), plus ``procedural.json``
    (generator version, classes, palette, seeds, size per split). Returns the image paths in order.
    """
    root = Path(root)
    manifest_path = root / "procedural.json"
    manifest = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("generator_version") != GENERATOR_VERSION:
            manifest = {}  # stale: written by another generator version
    manifest.update(
        generator_version=GENERATOR_VERSION,
        classes=list(CLASSES),
        palette=PALETTE.tolist(),
        ignore_index=IGNORE_INDEX,
        held_out_seed_offset=HELD_OUT_SEED_OFFSET,
    )
    paths, names, seeds = [], [], []
    for j in range(first_held_out, first_held_out + num_images):
        seed = held_out_seed(j)
        scene = generate_scene(seed, height, width)
        name = scene_name(j)
        img_path = root / "leftImg8bit" / split / CITY / f"{name}_leftImg8bit.png"
        save_png(img_path, to_uint8(scene.image))
        save_png(root / "gtFine" / split / CITY / f"{name}_gtFine_labelTrainIds.png", scene.labels)
        paths.append(img_path)
        names.append(name)
        seeds.append(seed)
    splits = manifest.setdefault("splits", {})
    splits[split] = {"city": CITY, "height": height, "width": width, "names": names, "seeds": seeds}
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return paths
