"""``generate_scene``: one procedural street scene, image and labels, bit-identical on every platform.

A pinhole camera looks down a straight street (road with lane markings and crossings, kerbs and sidewalks,
building facades with windows in perspective, a skyline, trees, poles, parked and moving vehicles, pedestrians),
painted far to near so that nearer things occlude farther ones, then lit per scene (brightness, contrast, colour
temperature, cast shadows, haze, vignetting, sensor grain).

Resolution independence: a scene is sampled in world units (metres) and normalised image coordinates and only
then rasterised at pixel centres. The same seed at two sizes gives the same layout; only the sampling density
(and the per-pixel grain) changes.

Determinism: every random draw comes from PCG64 streams derived from the seed through SeedSequence, and only
uniform draws are used. Rendering uses elementwise IEEE arithmetic (+ - * /, floor, comparisons) only: no BLAS,
no reductions, no transcendental functions. The output is therefore bit-identical across platforms for a given
seed and size, and ``GENERATOR_VERSION`` names it: the shipped models record the version they were trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from certseg.training.scenes.canvas import Canvas
from certseg.training.scenes.draws import UniformDraws
from certseg.training.scenes.paint_objects import paint_object
from certseg.training.scenes.paint_street import paint_facades, paint_ground, paint_sky, paint_skyline
from certseg.training.scenes.street_layout import StreetLayout, sample_street_layout
from certseg.training.scenes.street_objects import sample_street_objects
from certseg.training.scenes.value_noise import F32, fractal_noise

GENERATOR_VERSION = "certseg-procedural-street-1"
"""Change it whenever any scene's bytes change (tests pin scenes per version)."""


@dataclass(frozen=True, eq=False)  # arrays: identity equality and hashing
class Scene:
    """One rendered scene: ``image`` float32 (3,H,W) in [0,1], ``labels`` uint8 (H,W) with ids 0..K-1."""

    image: np.ndarray
    labels: np.ndarray
    seed: int


def _apply_lighting(canvas: Canvas, layout: StreetLayout, grain_rng: np.random.Generator) -> np.ndarray:
    """Per-scene lighting: cloud shadows, gain, colour temperature, saturation, contrast, vignette, grain.

    All of these are linear per pixel, so they are folded into one scale and one offset per pixel:
    out_c = img_c * (gain_c * sat * scale) + (lum * (1 - sat) * scale + 0.5 * (1 - contrast) + grain).
    """
    light = layout.lighting
    image = canvas.image
    gain = (light.gain * (1 + light.temperature), light.gain, light.gain * (1 - light.temperature))
    saturation, contrast = light.saturation, light.contrast
    luminance = F32(0.3 * gain[0]) * image[0] + F32(0.59 * gain[1]) * image[1] + F32(0.11 * gain[2]) * image[2]
    vignette_u = ((canvas.column_u - 0.5) ** 2 * light.vignette).astype(F32)
    vignette_v = ((canvas.row_v - 0.5) ** 2 * light.vignette).astype(F32)
    scale = (F32(1) - vignette_v[:, None] - vignette_u[None, :]) * F32(contrast)
    if light.cloud_shadow > 0:
        scale *= F32(1.0) - F32(light.cloud_shadow) * np.clip((canvas.coarse_noise - F32(0.45)) * F32(4.0), 0.0, 1.0)
    grain = grain_rng.random((canvas.height, canvas.width), dtype=F32)
    grain *= F32(2 * light.grain)
    offset = luminance * F32(1 - saturation)
    offset *= scale
    offset += grain
    offset += F32(0.5 * (1 - contrast) - light.grain)
    for channel in range(3):
        image[channel] *= scale
        image[channel] *= F32(gain[channel] * saturation)
        image[channel] += offset
    return np.clip(image, 0.0, 1.0, out=image)


def generate_scene(seed: int, height: int, width: int) -> Scene:
    """Render scene ``seed`` at ``height`` x ``width``: float32 image (3,H,W) in [0,1], uint8 labels (H,W)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}x{width}")
    layout_seed, noise_seed, grain_seed = np.random.SeedSequence(int(seed)).spawn(3)
    draws = UniformDraws(np.random.Generator(np.random.PCG64(layout_seed)))
    layout = sample_street_layout(draws)
    objects = sample_street_objects(draws, layout)
    noise_rng = np.random.Generator(np.random.PCG64(noise_seed))
    noise = np.stack(
        [
            fractal_noise(noise_rng, ((2, 4), (4, 8), (8, 16), (16, 32)), 0.5),
            fractal_noise(noise_rng, ((12, 24), (24, 48), (48, 96), (96, 192)), 0.7),
        ]
    )
    canvas = Canvas(int(height), int(width), layout.camera, noise)
    paint_sky(canvas, layout)
    paint_ground(canvas, layout)
    paint_skyline(canvas, layout)
    paint_facades(canvas, layout)
    for thing in sorted(objects, key=lambda thing: -thing.z):  # far to near; stable for equal depths
        paint_object(canvas, thing, layout.shade_at(thing.x, thing.z))
    image = _apply_lighting(canvas, layout, np.random.Generator(np.random.PCG64(grain_seed)))
    return Scene(image=np.ascontiguousarray(image, F32), labels=canvas.labels, seed=int(seed))


def generate_batch(seeds: Iterable[int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack scenes for training: images (N,3,H,W) float32 and labels (N,H,W) uint8."""
    scenes = [generate_scene(s, height, width) for s in seeds]
    return np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float (3,H,W) in [0,1] -> (H,W,3) uint8 by rounding, as the PNG files store it."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
