"""The street a scene shows, sampled in world metres: camera, road, sidewalks, facades, skyline, sky and light.

What stands in the street (vehicles, people, poles, trees) is sampled afterwards, from the same draws
(``certseg.training.scenes.street_objects``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from certseg.training.scenes.camera import Camera
from certseg.training.scenes.colours import LEAVES, PAVINGS, WALLS, mix
from certseg.training.scenes.draws import RGB, UniformDraws

BUILDING_FRONT, HEDGE, GAP = 0, 1, 2
"""What a facade segment or a skyline block is (a skyline's "hedge" is a clump of trees)."""


@dataclass
class FacadeSegment:
    """One stretch of facade along a side of the street, from the previous segment's end to ``end_z``."""

    end_z: float
    kind: int
    height: float
    wall_rgb: RGB
    window_pitch: float
    """Window spacing along the street (m)."""
    window_span_x: tuple[float, float]
    """Where a window starts and ends within one pitch (fractions)."""
    floor_height: float
    window_span_y: tuple[float, float]
    """Where a window starts and ends within one floor (fractions)."""
    shopfronts: bool
    glass_rgb: RGB


@dataclass(frozen=True)
class SkylineBlock:
    """A building or tree clump across the far end of the street, up to world X ``end_x``."""

    end_x: float
    height: float
    kind: int
    rgb: RGB


@dataclass(frozen=True)
class Lighting:
    """Per-scene light and sensor: applied to the painted image as a last step."""

    gain: float
    temperature: float
    """Warm (> 0) or cold (< 0) tint: red gain up, blue gain down by this fraction."""
    contrast: float
    saturation: float
    vignette: float
    grain: float
    cloud_cover: float
    cloud_shadow: float


@dataclass
class StreetLayout:
    """Everything about the street that is fixed before objects are placed in it."""

    camera: Camera
    style: str
    sky: str
    road_centre_x: float
    road_half_width: float
    sidewalk_widths: tuple[float, float]
    """Left, right."""
    grass_widths: tuple[float, float]
    """Grass strips next to the kerb, left and right (0: none)."""
    lawn_beyond: tuple[bool, bool]
    """Whether lawn (rather than paving) lies beyond each sidewalk."""
    lanes: int
    street_end_z: float
    crossing_z: float
    """Depth of the zebra crossing (inf if none)."""
    road_rgb: RGB
    sidewalk_rgb: tuple[RGB, RGB]
    leaf_rgb: RGB
    tile_size: float
    facades: tuple[list[FacadeSegment], list[FacadeSegment]]
    skyline: list[SkylineBlock]
    sun_side: int
    """-1 sun from the right (the left side in shadow), 1 the opposite, 0 overcast."""
    shadow_width: float
    lighting: Lighting
    noise_lattice: np.ndarray
    """65 uniform values: 1-D noise for shadow steps, hedge and tree-clump outlines, the lane dashes' phase."""

    @property
    def facade_x(self) -> tuple[float, float]:
        """World X of the left and right facade planes."""
        return (self.road_centre_x - self.road_half_width - self.sidewalk_widths[0],
                self.road_centre_x + self.road_half_width + self.sidewalk_widths[1])

    def shadow_reach(self, z: np.ndarray) -> np.ndarray:
        """How far (m) the buildings' shadow reaches from the shaded facade at depth z: steps every 11 m."""
        steps = self.noise_lattice[np.mod(np.floor(z * (1 / 11.0)), 64).astype(np.intp)]
        return self.shadow_width * (0.7 + 0.6 * steps)

    def shade_at(self, x: float, z: float) -> float:
        """Cast-shadow factor for an object standing at world (X, z), consistent with the ground shadow."""
        if self.sun_side == 0:
            return 1.0
        left, right = self.facade_x
        reach = float(self.shadow_reach(np.array([z]))[0])
        in_shadow = x < left + reach if self.sun_side < 0 else x > right - reach
        return 0.6 if in_shadow else 1.0


def _sample_facades(draws: UniformDraws, style: str, street_end_z: float, walls: list[RGB]) -> list[FacadeSegment]:
    """Facade stretches from the camera to the end of the street, mostly buildings."""
    low, high = {"downtown": (12.0, 34.0), "residential": (7.0, 16.0), "suburban": (4.0, 9.0)}[style]
    hedge_chance, gap_chance = {"downtown": (0.05, 0.08), "residential": (0.12, 0.12), "suburban": (0.3, 0.2)}[style]
    segments: list[FacadeSegment] = []
    z = draws.uniform(-4.0, 2.0)
    while z < street_end_z:
        z += draws.uniform(7.0, 26.0) if style != "suburban" else draws.uniform(6.0, 16.0)
        roll = draws.uniform()
        kind = HEDGE if roll < hedge_chance else GAP if roll < hedge_chance + gap_chance else BUILDING_FRONT
        floor_height = draws.uniform(2.9, 3.6)
        window_sill = draws.uniform(0.2, 0.35)
        window_start = draws.uniform(0.12, 0.3)
        segments.append(
            FacadeSegment(
                end_z=z,
                kind=kind,
                height=draws.uniform(1.2, 2.6) if kind == HEDGE else draws.uniform(low, high),
                wall_rgb=draws.colour(draws.pick(walls), 0.05, 0.1),
                window_pitch=draws.uniform(2.2, 4.0),
                window_span_x=(window_start, draws.uniform(0.65, 0.9)),
                floor_height=floor_height,
                window_span_y=(window_sill, draws.uniform(0.7, 0.85)),
                shopfronts=draws.chance(0.6 if style == "downtown" else 0.25),
                glass_rgb=draws.colour((0.16, 0.2, 0.26), 0.05, 0.35),
            )
        )
        if draws.chance(0.15) and segments[-1].kind == BUILDING_FRONT:  # a glass tower: big windows, dark walls
            segments[-1].window_span_x, segments[-1].window_span_y = (0.04, 0.96), (0.08, 0.92)
    segments[-1].end_z = math.inf
    return segments


def _sample_skyline(draws: UniformDraws, style: str, leaf_rgb: RGB) -> list[SkylineBlock]:
    """Frontal buildings and tree clumps closing the street at its end, left to right in world X."""
    blocks = []
    x = -90.0
    highest = {"downtown": 45.0, "residential": 22.0, "suburban": 12.0}[style]
    while x < 90.0:
        x += draws.uniform(6.0, 22.0)
        kind = HEDGE if draws.chance(0.25) else GAP if draws.chance(0.08) else BUILDING_FRONT
        if kind == BUILDING_FRONT:
            rgb = mix(draws.colour(draws.pick(WALLS)), (0.7, 0.72, 0.76), 0.35)
        else:
            rgb = draws.colour(leaf_rgb)
        height = draws.uniform(4.0, highest) if kind == BUILDING_FRONT else draws.uniform(5.0, 12.0)
        blocks.append(SkylineBlock(x, height, kind, rgb))
    return blocks


def _sample_lighting(draws: UniformDraws, sky: str) -> Lighting:
    warmth = {"dusk": 0.08, "day": 0.0, "overcast": -0.02, "hazy": 0.01}[sky]
    return Lighting(
        gain=draws.uniform(0.78, 1.12) * (0.85 if sky == "dusk" else 1.0),
        temperature=warmth + draws.uniform(-0.06, 0.06),
        contrast=draws.uniform(0.8, 1.15) * (0.9 if sky in ("overcast", "hazy") else 1.0),
        saturation=draws.uniform(0.7, 1.25),
        vignette=draws.uniform(0.0, 0.35),
        grain=draws.uniform(0.01, 0.045),
        cloud_cover=draws.uniform(0.0, 0.9) if sky != "overcast" else 1.0,
        cloud_shadow=draws.uniform(0.0, 0.25) if sky == "day" else 0.0,
    )


def sample_street_layout(draws: UniformDraws) -> StreetLayout:
    """A street: style, camera, road, sidewalks, facades, skyline, sky and light (in this order of draws)."""
    roll = draws.uniform()
    style = "downtown" if roll < 0.4 else "residential" if roll < 0.75 else "suburban"
    focal_u = draws.uniform(0.7, 1.0)
    camera = Camera(vanishing_u=draws.uniform(0.4, 0.6), horizon_v=draws.uniform(0.36, 0.5), focal_u=focal_u,
                    focal_v=2.0 * focal_u, height=draws.uniform(1.3, 1.7))
    road_half_width = draws.uniform(3.0, 6.5)
    sky_roll = draws.uniform()
    sky = "day" if sky_roll < 0.5 else "overcast" if sky_roll < 0.75 else "dusk" if sky_roll < 0.87 else "hazy"
    street_end_z = draws.uniform(50.0, 140.0)
    leaf_rgb = draws.colour(draws.pick(LEAVES), 0.04, 0.15)
    walls = [draws.pick(WALLS) for _ in range(4)]  # a street has a handful of related facade colours
    grass_chance = {"downtown": 0.1, "residential": 0.35, "suburban": 0.7}[style]
    road_centre_x = draws.uniform(-0.5, 0.5) * road_half_width
    sidewalk_widths = (draws.uniform(2.5, 6.5), draws.uniform(2.5, 6.5))
    grass_widths = tuple(draws.uniform(0.8, 2.0) if draws.chance(grass_chance) else 0.0 for _ in range(2))
    lawn_beyond = (draws.chance(0.5), draws.chance(0.5))
    lanes = max(2, round(2 * road_half_width / draws.uniform(3.0, 3.8)))
    crossing_z = draws.uniform(6.0, 30.0) if draws.chance(0.45) else math.inf
    road_rgb = draws.colour((0.36, 0.36, 0.37), 0.015, 0.3)
    sidewalk_rgb = tuple(draws.colour(draws.pick(PAVINGS), 0.03, 0.12) for _ in range(2))
    tile_size = draws.uniform(0.4, 1.2)
    facades = (_sample_facades(draws, style, street_end_z, walls), _sample_facades(draws, style, street_end_z, walls))
    skyline = _sample_skyline(draws, style, leaf_rgb)
    sun_side = 0 if sky in ("overcast", "hazy") else (-1 if draws.chance(0.5) else 1)
    shadow_width = draws.uniform(1.0, 2.0 * road_half_width + 4.0)
    noise_lattice = draws.generator.random(65)
    return StreetLayout(
        camera=camera, style=style, sky=sky, road_centre_x=road_centre_x, road_half_width=road_half_width,
        sidewalk_widths=sidewalk_widths, grass_widths=grass_widths, lawn_beyond=lawn_beyond, lanes=lanes,
        street_end_z=street_end_z, crossing_z=crossing_z, road_rgb=road_rgb, sidewalk_rgb=sidewalk_rgb,
        leaf_rgb=leaf_rgb, tile_size=tile_size, facades=facades, skyline=skyline, sun_side=sun_side,
        shadow_width=shadow_width, lighting=_sample_lighting(draws, sky), noise_lattice=noise_lattice,
    )
