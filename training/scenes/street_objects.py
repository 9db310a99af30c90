"""What stands in the street: vehicles, pedestrians, poles (lamps, signs, traffic lights) and trees.

Each object is sampled in world metres with its depth ``z``; the scene paints them far to near, so nearer things
occlude farther ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from certseg.training.scenes.colours import CARS, CLOTHES, POLE_METALS, SIGN_PLATES, SKIN, TROUSERS
from certseg.training.scenes.draws import RGB, UniformDraws
from certseg.training.scenes.street_layout import StreetLayout
from certseg.training.scenes.value_noise import F32


@dataclass(frozen=True)
class Vehicle:
    """A car, van or bus as a box of ``width`` x ``height`` x ``length``, its rear (or front) at depth ``z``."""

    x: float
    z: float
    width: float
    height: float
    length: float
    kind: str
    oncoming: bool
    """Facing the camera (front lamps, the bonnet nearest)."""
    beltline_height: float
    """Where the body ends and the cabin (windows) starts."""
    body_rgb: RGB
    glass_rgb: RGB


@dataclass(frozen=True)
class Pedestrian:
    x: float
    z: float
    height: float
    stride: float
    arm_swing: float
    coat: bool
    shirt_rgb: RGB
    trousers_rgb: RGB
    skin_rgb: RGB
    hair_rgb: RGB
    sleeves: bool
    bag: bool


@dataclass(frozen=True)
class Pole:
    """A street lamp, a sign or a traffic light (all labelled pole)."""

    x: float
    z: float
    kind: str
    facing: int
    """Which way (world X sign) a lamp's arm reaches: towards the road."""
    metal_rgb: RGB
    width: float
    height: float
    arm_length: float
    plate_rgb: RGB
    round_plate: bool
    lit_signal: int
    """A traffic light's lit lamp: 0 red (top), 1 amber, 2 green."""


@dataclass(frozen=True)
class Tree:
    """A tree (trunk and crown) or a bush (crown only, ``trunk_width`` 0)."""

    x: float
    z: float
    crown_radius_x: float
    crown_radius_y: float
    crown_centre_y: float
    trunk_width: float
    leaf_rgb: RGB
    trunk_rgb: RGB
    crown_lumps: np.ndarray
    """7x7 uniform values shaping the crown's outline."""


StreetObject = Vehicle | Pedestrian | Pole | Tree


def _sample_vehicle(draws: UniformDraws, x: float, z: float, parked: bool, oncoming: bool = False) -> Vehicle:
    roll = draws.uniform()
    kind = "car" if roll < 0.78 or parked and roll < 0.9 else "van" if roll < 0.93 else "bus"
    width, height, length = {  # every kind's sizes are drawn, whichever is used
        "car": (draws.uniform(1.7, 1.9), draws.uniform(1.38, 1.55), draws.uniform(3.9, 4.8)),
        "van": (draws.uniform(1.9, 2.05), draws.uniform(1.9, 2.4), draws.uniform(4.8, 5.8)),
        "bus": (draws.uniform(2.45, 2.55), draws.uniform(2.9, 3.3), draws.uniform(9.0, 12.0)),
    }[kind]
    body_rgb = draws.colour(draws.pick(CARS), 0.04, 0.12)
    return Vehicle(
        x=x, z=z, width=width, height=height, length=length, kind=kind, oncoming=oncoming,
        beltline_height=height * (0.58 if kind == "car" else 0.45 if kind == "van" else 0.35), body_rgb=body_rgb,
        glass_rgb=draws.colour((0.12, 0.15, 0.2), 0.04, 0.35),
    )


def _sample_pedestrian(draws: UniformDraws, x: float, z: float) -> Pedestrian:
    coat = draws.chance(0.3)
    return Pedestrian(
        x=x,
        z=z,
        height=draws.uniform(1.55, 1.95) if draws.chance(0.9) else draws.uniform(1.05, 1.35),
        stride=draws.uniform(0.0, 0.16),
        arm_swing=draws.uniform(-0.15, 0.15),
        coat=coat,
        shirt_rgb=draws.colour(draws.pick(CLOTHES), 0.05, 0.15),
        trousers_rgb=draws.colour(draws.pick(TROUSERS), 0.03, 0.15),
        skin_rgb=draws.colour(draws.pick(SKIN), 0.03, 0.05),
        hair_rgb=draws.colour((0.12, 0.09, 0.07), 0.03, 0.6),
        sleeves=draws.chance(0.6),
        bag=draws.chance(0.3),
    )


def _sample_pole(draws: UniformDraws, x: float, z: float, kind: str, side: int) -> Pole:
    metal_rgb = draws.colour(draws.pick(POLE_METALS), 0.03, 0.15)
    return Pole(
        x=x,
        z=z,
        kind=kind,
        facing=-side,
        metal_rgb=metal_rgb,
        width=draws.uniform(0.16, 0.32) if kind == "lamp" else draws.uniform(0.1, 0.18),
        height=(draws.uniform(6.0, 9.5) if kind == "lamp" else draws.uniform(2.4, 3.4) if kind == "sign"
                else draws.uniform(3.2, 4.5)),
        arm_length=draws.uniform(0.8, 2.2),
        plate_rgb=draws.pick(SIGN_PLATES),
        round_plate=draws.chance(0.5),
        lit_signal=draws.integer(0, 3),
    )


def _sample_tree(draws: UniformDraws, x: float, z: float, leaf_rgb: RGB, bush: bool = False) -> Tree:
    radius_y = draws.uniform(0.6, 1.2) if bush else draws.uniform(1.5, 3.6)
    return Tree(
        x=x,
        z=z,
        crown_radius_x=radius_y * draws.uniform(0.8, 1.4),
        crown_radius_y=radius_y,
        crown_centre_y=radius_y * 0.85 if bush else draws.uniform(2.2, 3.5) + radius_y,
        trunk_width=0.0 if bush else draws.uniform(0.18, 0.4),
        leaf_rgb=draws.colour(leaf_rgb, 0.04, 0.15),
        trunk_rgb=draws.colour((0.33, 0.26, 0.2), 0.03, 0.2),
        crown_lumps=draws.generator.random((7, 7), dtype=F32),
    )


def sample_street_objects(draws: UniformDraws, layout: StreetLayout) -> list[StreetObject]:
    """Vehicles, pedestrians, poles and trees, in the order they were drawn (paint them sorted by depth)."""
    centre, half_width = layout.road_centre_x, layout.road_half_width
    left_facade, right_facade = layout.facade_x
    objects: list[StreetObject] = []
    parked_sides = []
    for side in (-1, 1):  # parked cars along both kerbs
        if not draws.chance(0.65 if layout.style != "suburban" else 0.45):
            continue
        parked_sides.append(side)
        z = draws.uniform(2.5, 12.0)
        while z < layout.street_end_z * 0.8:
            car = _sample_vehicle(draws, centre + side * (half_width - draws.uniform(1.0, 1.3)), z, parked=True)
            if draws.chance(0.65):
                objects.append(car)
            z += car.length + draws.uniform(0.6, 6.0)
    lane_width = 2 * half_width / layout.lanes
    free_lanes = [k for k in range(layout.lanes)
                  if not (k == 0 and -1 in parked_sides or k == layout.lanes - 1 and 1 in parked_sides)]
    for _ in range(draws.integer(0, 5) if free_lanes else 0):  # moving traffic, outside the parking lanes
        lane = draws.pick(free_lanes)
        x = centre - half_width + (lane + 0.5) * lane_width + draws.uniform(-0.3, 0.3)
        z = draws.uniform(4.0, 60.0)
        oncoming = lane < layout.lanes // 2 and draws.chance(0.7)
        objects.append(_sample_vehicle(draws, x, z, parked=False, oncoming=oncoming))
    people = draws.integer(3, 16 if layout.style == "downtown" else 10)
    for _ in range(people):  # pedestrians on sidewalks, some in small groups
        side = -1 if draws.chance(0.5) else 1
        x = centre + side * (half_width + draws.uniform(0.4, layout.sidewalk_widths[side > 0] - 0.3))
        t = draws.uniform()
        z = 2.5 + 40.0 * t * (0.4 + 0.6 * t)  # denser near the camera; no pow(): libm varies
        for k in range(1 if draws.chance(0.6) else draws.integer(2, 5)):
            objects.append(_sample_pedestrian(draws, x + draws.uniform(-0.8, 0.8), z + 0.7 * k))
    if math.isfinite(layout.crossing_z):  # people on the zebra crossing
        for _ in range(draws.integer(0, 5)):
            z = layout.crossing_z + draws.uniform(0.3, 3.5)
            objects.append(_sample_pedestrian(draws, centre + draws.uniform(-half_width, half_width), z))
    for side in (-1, 1):  # street lamps, signs, traffic lights near the kerb
        x = centre + side * (half_width + draws.uniform(0.35, 0.8))
        if draws.chance(0.8):
            z, step = draws.uniform(2.0, 14.0), draws.uniform(12.0, 30.0)
            while z < layout.street_end_z:
                objects.append(_sample_pole(draws, x, z, "lamp", side))
                z += step
        for _ in range(draws.integer(0, 4)):
            z = draws.uniform(3.0, 45.0)
            kind = "light" if draws.chance(0.3) else "sign"
            objects.append(_sample_pole(draws, x + side * draws.uniform(0.0, 0.6), z, kind, side))
    tree_chance = {"downtown": 0.35, "residential": 0.7, "suburban": 0.85}[layout.style]
    for side in (-1, 1):  # street trees on the sidewalk or grass strip
        if not draws.chance(tree_chance):
            continue
        x = centre + side * (half_width + min(layout.sidewalk_widths[side > 0] * 0.5, draws.uniform(1.0, 2.5)))
        z, step = draws.uniform(2.0, 10.0), draws.uniform(6.0, 15.0)
        while z < layout.street_end_z * 0.9:
            if draws.chance(0.85):
                objects.append(_sample_tree(draws, x + draws.uniform(-0.3, 0.3), z, layout.leaf_rgb))
            z += step * draws.uniform(0.8, 1.2)
    for side in (-1, 1):  # bushes in front of facades
        for _ in range(draws.integer(0, 4)):
            x = (left_facade if side < 0 else right_facade) - side * draws.uniform(0.6, 1.5)
            z = draws.uniform(3.0, 40.0)
            objects.append(_sample_tree(draws, x, z, layout.leaf_rgb, bush=True))
    return objects
