"""Painting what stands in the street: each object on the planes it occupies, shaded by where it stands.

``light`` is the cast-shadow factor at the object's foot (``StreetLayout.shade_at``): 1 in the sun, 0.6 in the
buildings' shadow.
"""

from __future__ import annotations

import numpy as np

from certseg.training.scenes.canvas import Canvas, Patch
from certseg.training.scenes.labels import PERSON, POLE, VEGETATION, VEHICLE
from certseg.training.scenes.street_objects import Pedestrian, Pole, StreetObject, Tree, Vehicle
from certseg.training.scenes.value_noise import F32, bilinear, fraction


def paint_object(canvas: Canvas, thing: StreetObject, light: float) -> None:
    """Paint one object of any kind."""
    if isinstance(thing, Vehicle):
        paint_vehicle(canvas, thing, light)
    elif isinstance(thing, Pedestrian):
        paint_pedestrian(canvas, thing, light)
    elif isinstance(thing, Pole):
        paint_pole(canvas, thing, light)
    else:
        paint_tree(canvas, thing, light)


def paint_vehicle(canvas: Canvas, vehicle: Vehicle, light: float) -> None:
    """A car/van/bus as a box: ground shadow, visible side face, then rear (or front) face."""
    x, z, width, height, length = vehicle.x, vehicle.z, vehicle.width, vehicle.height, vehicle.length
    beltline, kind = vehicle.beltline_height, vehicle.kind
    ground = canvas.ground_patch(x - width / 2 - 0.15, x + width / 2 + 0.15, z - 0.2, z + length + 0.1)
    if ground is not None:
        rows, cols, ground_x, ground_z = ground
        under = ((ground_x > x - width / 2 - 0.15) & (ground_x < x + width / 2 + 0.15) & (ground_z > z - 0.2)
                 & (ground_z < z + length))
        canvas.darken_ground(rows, cols, under, 0.45)
    shade = F32(light)
    left, right = x - width / 2, x + width / 2
    side_x = left if left > 0.05 else right if right < -0.05 else None  # the side the camera sees, if any
    if side_x is not None:
        side = canvas.side_patch(side_x, z, z + length, 0.0, height)
        if side is not None:
            _paint_vehicle_side(canvas, side, vehicle, shade * F32(0.85))
    face = canvas.facing_patch(z, left, right, 0.0, height)
    if face is None:
        return
    rows, cols, world_x, y = face
    from_axis = np.abs(world_x - F32(x))
    half_width = F32(width / 2)
    up_cabin = (y - F32(beltline)) * F32(1 / (height - beltline))  # 0 at the beltline, 1 at the roof
    taper = {"car": (0.9, 0.16), "van": (0.97, 0.04), "bus": (1.0, 0.0)}[kind]
    cabin_half_width = half_width * (F32(taper[0]) - F32(taper[1]) * up_cabin)
    lower = ((y >= F32(0.2)) & (y < F32(beltline))
             & (from_axis < half_width - np.maximum(F32(0), y - F32(beltline - 0.08)) * F32(0.6)))
    cabin = (y >= F32(beltline)) & (y < F32(height)) & (from_axis < cabin_half_width)
    tyres = (y < F32(0.34)) & (from_axis > half_width - F32(0.34)) & (from_axis < half_width - F32(0.04))
    body_shade = shade * (F32(0.8) + F32(0.3) * y * F32(1 / height))
    canvas.paint(rows, cols, lower | cabin, VEHICLE, vehicle.body_rgb, 0.12, body_shade)
    canvas.paint(rows, cols, tyres, VEHICLE, (0.06, 0.06, 0.06), 0.2)
    canvas.paint(rows, cols, lower & (y < F32(0.36)), VEHICLE, (0.12, 0.12, 0.13), 0.2, shade)  # bumper
    window_bottom = 1.25 if kind == "bus" and not vehicle.oncoming else beltline + 0.06
    window = (cabin & (y > F32(window_bottom)) & (y < F32(height - 0.07))
              & (from_axis < cabin_half_width - F32(0.1)))
    if kind == "bus" and vehicle.oncoming:
        window = (y > F32(1.2)) & (y < F32(height - 0.25)) & (from_axis < half_width - F32(0.1))
    canvas.paint(rows, cols, window, VEHICLE, vehicle.glass_rgb, 0.1,
                 shade * (F32(0.8) + F32(0.5) * np.clip(up_cabin, 0, 1)))
    lamps = ((y > F32(beltline - 0.24)) & (y < F32(beltline - 0.08)) & (from_axis > half_width - F32(0.32))
             & (from_axis < half_width - F32(0.05)))
    lamp_rgb = (0.95, 0.92, 0.75) if vehicle.oncoming else (0.85, 0.08, 0.06)
    canvas.paint(rows, cols, lamps & lower, VEHICLE, lamp_rgb, 0.1)
    plate = (from_axis < F32(0.26)) & (y > F32(0.38)) & (y < F32(0.5))
    canvas.paint(rows, cols, plate, VEHICLE, (0.92, 0.92, 0.9), 0.1, shade)


def _paint_vehicle_side(canvas: Canvas, patch: Patch, vehicle: Vehicle, shade: np.float32) -> None:
    """The side face: body, cabin with windows (bus: a row of them), wheels with rims."""
    rows, cols, depth, y = patch
    length, height, beltline, kind = vehicle.length, vehicle.height, vehicle.beltline_height, vehicle.kind
    along = depth - F32(vehicle.z)  # metres from the rear
    if vehicle.oncoming:
        along = F32(length) - along  # oncoming: the bonnet is nearest
    inside = (along >= 0) & (along <= F32(length))
    wheel_radius = 0.5 if kind == "bus" else 0.33
    axles = (1.9, length - 2.6) if kind == "bus" else (0.85, length - 0.9)
    wheel = np.zeros(y.shape, bool)
    rim = np.zeros(y.shape, bool)
    for axle in axles:
        squared_distance = (along - F32(axle)) ** 2 + (y - F32(wheel_radius)) ** 2
        wheel |= squared_distance < F32(wheel_radius * wheel_radius)
        rim |= squared_distance < F32(0.3 * wheel_radius * wheel_radius)
    lower = inside & (y >= F32(0.2)) & (y < F32(beltline))
    up_cabin = (y - F32(beltline)) * F32(1 / (height - beltline))
    rear_start, rear_slope, front_start, front_slope = {
        "car": (0.3, 0.55, 1.0, 0.75),
        "van": (0.05, 0.05, 0.25, 0.5),
        "bus": (0.0, 0.0, 0.0, 0.0),
    }[kind]
    cabin_rear = F32(rear_start) + F32(rear_slope) * up_cabin
    cabin_front = F32(length - front_start) - F32(front_slope) * up_cabin
    cabin = (y >= F32(beltline)) & (y < F32(height)) & (along > cabin_rear) & (along < cabin_front)
    if kind == "bus":
        window = ((y > F32(1.25)) & (y < F32(height - 0.3)) & inside
                  & (fraction(along * F32(1 / 1.5)) > F32(0.1)))
        window &= (along > F32(0.3)) & (along < F32(length - 0.3))
    else:
        pillar = F32(0.5 * (rear_start + length - front_start) - 0.2)
        window = (cabin & (y > F32(beltline + 0.05)) & (y < F32(height - 0.06)) & (along > cabin_rear + F32(0.1))
                  & (along < cabin_front - F32(0.1)))
        window &= np.abs(along - pillar) > F32(0.07)
    body_shade = shade * (F32(0.8) + F32(0.3) * y * F32(1 / height))
    canvas.paint(rows, cols, lower | cabin, VEHICLE, vehicle.body_rgb, 0.12, body_shade)
    canvas.paint(rows, cols, window, VEHICLE, vehicle.glass_rgb, 0.1, shade)
    canvas.paint(rows, cols, wheel, VEHICLE, (0.06, 0.06, 0.06), 0.2)
    canvas.paint(rows, cols, rim, VEHICLE, (0.55, 0.56, 0.58), 0.2, shade)


def paint_pedestrian(canvas: Canvas, person: Pedestrian, light: float) -> None:
    """Legs, torso (or coat), arms, head and hair on a plane facing the camera, in units of body height."""
    height = person.height
    face = canvas.facing_patch(person.z, person.x - 0.3 * height, person.x + 0.3 * height, 0.0, height)
    if face is None:
        return
    rows, cols, world_x, world_y = face
    x = (world_x - F32(person.x)) * F32(1 / height)  # across the body, in body heights
    s = world_y * F32(1 / height)  # up the body: 0 at the feet, 1 at the top of the head
    shade = F32(light)
    below_hips = np.clip((F32(0.5) - s) * F32(2.0), 0.0, 1.0)  # 0 at the hips, 1 at the feet: the stride's spread
    stride = F32(person.stride)
    legs = (s < F32(0.52)) & (
        (np.abs(x + F32(0.045) + stride * below_hips) < F32(0.04))
        | (np.abs(x - F32(0.045) - stride * below_hips) < F32(0.04))
    )
    torso_half_width = np.where(s > F32(0.79), F32(0.11) - (s - F32(0.79)) * F32(1.6), F32(0.105))
    torso_half_width = np.where(s < F32(0.58), F32(0.095), torso_half_width)
    torso_bottom = F32(0.3) if person.coat else F32(0.48)
    if person.coat:
        torso_half_width = np.where(s < F32(0.52), F32(0.095) + (F32(0.52) - s) * F32(0.25), torso_half_width)
    torso = (s >= torso_bottom) & (s < F32(0.845)) & (np.abs(x) < torso_half_width)
    swing = F32(person.arm_swing) * (F32(0.8) - s)
    arm_centre = F32(0.135) + np.abs(swing) * F32(0.5)
    arms = (s > F32(0.45)) & (s < F32(0.8)) & (
        (np.abs(x - arm_centre - swing) < F32(0.03)) | (np.abs(x + arm_centre - swing) < F32(0.03))
    )
    head = ((x * F32(1 / 0.062)) ** 2 + ((s - F32(0.915)) * F32(1 / 0.075)) ** 2) < F32(1.0)
    neck = (s >= F32(0.83)) & (s < F32(0.87)) & (np.abs(x) < F32(0.03))
    hair = head & ((s > F32(0.935)) | (((x * F32(1 / 0.062)) ** 2) > F32(0.75)) & (s > F32(0.88)))
    canvas.paint(rows, cols, legs, PERSON, person.trousers_rgb, 0.2, shade)
    canvas.paint(rows, cols, legs & (s < F32(0.035)), PERSON, (0.08, 0.07, 0.07), 0.1)  # shoes
    canvas.paint(rows, cols, torso, PERSON, person.shirt_rgb, 0.2, shade)
    if person.bag:
        bag = (s > F32(0.42)) & (s < F32(0.58)) & (np.abs(x - F32(0.16)) < F32(0.05))
        canvas.paint(rows, cols, bag, PERSON, (0.3, 0.2, 0.12), 0.2, shade)
    canvas.paint(rows, cols, arms & (s > F32(0.62)), PERSON, person.shirt_rgb, 0.2, shade * F32(0.9))
    forearm_rgb = person.shirt_rgb if person.sleeves else person.skin_rgb
    canvas.paint(rows, cols, arms & (s <= F32(0.62)), PERSON, forearm_rgb, 0.2, shade)
    canvas.paint(rows, cols, head | neck, PERSON, person.skin_rgb, 0.15, shade)
    canvas.paint(rows, cols, hair, PERSON, person.hair_rgb, 0.2, shade)


def paint_pole(canvas: Canvas, pole: Pole, light: float) -> None:
    """Lamp post (arm + head), sign (round or square plate) or traffic light, all labelled pole."""
    x, z, height, facing = pole.x, pole.z, pole.height, pole.facing
    width = max(pole.width, 0.006 * z / canvas.camera.focal_u)  # keep distant poles at least ~0.6% of the width wide
    reach = pole.arm_length + 0.45 if pole.kind == "lamp" else 0.45
    face = canvas.facing_patch(z, x - (reach if facing < 0 else 0.45), x + (reach if facing > 0 else 0.45), 0.0,
                               height + 0.1)
    if face is None:
        return
    rows, cols, world_x, y = face
    dx = world_x - F32(x)
    shade = F32(light) * (F32(1.0) + F32(0.5) * np.clip(dx * F32(1 / width), -0.5, 0.5))
    post = (np.abs(dx) < F32(width / 2)) & (y < F32(height))
    canvas.paint(rows, cols, post, POLE, pole.metal_rgb, 0.15, shade)
    if pole.kind == "lamp":
        along = dx * F32(facing)
        arm = (y > F32(height - 0.12)) & (y < F32(height)) & (along > 0) & (along < F32(pole.arm_length))
        head = (y > F32(height - 0.28)) & (y < F32(height + 0.05)) & (np.abs(along - F32(pole.arm_length)) < F32(0.4))
        canvas.paint(rows, cols, arm | head, POLE, pole.metal_rgb, 0.15, F32(light))
        canvas.paint(rows, cols, head & (y < F32(height - 0.2)), POLE, (0.95, 0.93, 0.8), 0.05)
    elif pole.kind == "sign":
        centre_y = F32(height - 0.35)
        plate = (
            (dx * dx + (y - centre_y) ** 2 < F32(0.1225))
            if pole.round_plate
            else ((np.abs(dx) < F32(0.33)) & (np.abs(y - centre_y) < F32(0.3)))
        )
        canvas.paint(rows, cols, plate, POLE, pole.plate_rgb, 0.1, F32(light))
        inner = (
            (dx * dx + (y - centre_y) ** 2 < F32(0.06))
            if pole.round_plate
            else ((np.abs(dx) < F32(0.24)) & (np.abs(y - centre_y) < F32(0.21)))
        )
        symbol_rgb = (0.92, 0.92, 0.92) if pole.plate_rgb[0] < 0.85 else (0.1, 0.1, 0.1)
        canvas.paint(rows, cols, inner, POLE, symbol_rgb, 0.1, F32(light))
    else:
        box = (np.abs(dx) < F32(0.18)) & (y > F32(height - 1.0)) & (y < F32(height))
        canvas.paint(rows, cols, box, POLE, (0.1, 0.1, 0.1), 0.1)
        lit_y = F32(height - 0.18 - 0.32 * pole.lit_signal)
        lit = dx * dx + (y - lit_y) ** 2 < F32(0.012)
        canvas.paint(rows, cols, lit, POLE, ((0.95, 0.15, 0.1), (0.95, 0.7, 0.1), (0.2, 0.9, 0.4))[pole.lit_signal],
                     0.05)


def paint_tree(canvas: Canvas, tree: Tree, light: float) -> None:
    """Trunk plus a lumpy crown (per-tree lump noise) with a strong leafy texture and top-lit shading."""
    x, z = tree.x, tree.z
    radius_x, radius_y, centre_y = tree.crown_radius_x, tree.crown_radius_y, tree.crown_centre_y
    face = canvas.facing_patch(z, x - 1.3 * radius_x, x + 1.3 * radius_x, 0.0, centre_y + 1.3 * radius_y)
    if face is None:
        return
    rows, cols, world_x, y = face
    dx = (world_x - F32(x)) * F32(1 / radius_x)
    dy = (y - F32(centre_y)) * F32(1 / radius_y)
    lumps = bilinear(tree.crown_lumps, (dy[:, 0] * 0.5 + 0.5) * 6.0, (dx[0] * 0.5 + 0.5) * 6.0, smooth=True)
    crown = (dx * dx + dy * dy
             < F32(0.62) + F32(0.8) * lumps + F32(0.35) * (canvas.fine_noise[rows, cols] - F32(0.5)))
    if tree.trunk_width > 0:
        trunk = (np.abs(world_x - F32(x)) < F32(tree.trunk_width / 2)) & (y < F32(centre_y))
        canvas.paint(rows, cols, trunk, VEGETATION, tree.trunk_rgb, 0.3, F32(light))
    leaf_shade = F32(light) * (F32(0.85) - F32(0.25) * dy) * (F32(0.55) + F32(0.9) * canvas.fine_noise[rows, cols])
    canvas.paint(rows, cols, crown, VEGETATION, tree.leaf_rgb, 0.0, leaf_shade)
