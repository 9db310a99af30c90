"""Painting the street itself, back to front: sky, ground (road, kerbs, sidewalks, grass), skyline, facades.

Every function writes whole rows or columns with exact elementwise float32 arithmetic, as the canvas does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from certseg.training.scenes.canvas import Canvas
from certseg.training.scenes.colours import SKIES, mix
from certseg.training.scenes.labels import BUILDING, SIDEWALK, SKY, VEGETATION
from certseg.training.scenes.street_layout import BUILDING_FRONT, GAP, HEDGE, FacadeSegment, StreetLayout
from certseg.training.scenes.value_noise import F32, fraction, noise_1d

ASPHALT, LANE_PAINT, KERB, SIDEWALK_LEFT, SIDEWALK_RIGHT, GRASS = range(6)
"""Ground materials, each with its colour and texture strength."""


def paint_sky(canvas: Canvas, layout: StreetLayout) -> None:
    """A zenith-to-horizon gradient with clouds from the scene's coarse and fine noise."""
    camera = canvas.camera
    rows = canvas.rows_between(-1.0, camera.horizon_v)
    if rows is None:
        return
    zenith, horizon, cloud = SKIES[layout.sky]
    t = np.clip((camera.horizon_v - canvas.row_v[rows]) / max(camera.horizon_v, 1e-6), 0.0, 1.0)
    t = (t * (2.0 - t)).astype(F32)[None, :, None]
    base = (np.asarray(horizon, F32)[:, None, None]
            + (np.asarray(zenith, F32) - np.asarray(horizon, F32))[:, None, None] * t)
    noise = canvas.coarse_noise[rows] + F32(0.35) * (canvas.fine_noise[rows] - F32(0.5))
    threshold = F32(0.75 - 0.45 * layout.lighting.cloud_cover)
    coverage = np.clip((noise - threshold) * F32(3.0), 0.0, 1.0)
    cloud_colour = np.asarray(cloud, F32)[:, None, None] * (F32(0.8) + F32(0.3) * canvas.fine_noise[rows])
    canvas.image[:, rows] = base + (cloud_colour - base) * coverage
    canvas.labels[rows] = SKY


def _select_u8(condition: np.ndarray, value: int, current: np.ndarray) -> np.ndarray:
    """``where(condition, value, current)`` for uint8 arrays by wrap-around arithmetic (much faster than np.where)."""
    return current - (current - np.uint8(value)) * condition.view(np.uint8)


def paint_ground(canvas: Canvas, layout: StreetLayout) -> None:
    """Road (lane markings, zebra, patches), kerbs, sidewalks (tiles), grass strips and lawns."""
    camera = canvas.camera
    rows = canvas.rows_between(camera.horizon_v + 1e-9, 2.0)
    if rows is None:
        return
    depth64 = camera.focal_v * camera.height / (canvas.row_v[rows] - camera.horizon_v)
    z = depth64.astype(F32)[:, None]
    from_centre = ((canvas.column_u - camera.vanishing_u).astype(F32)[None, :]
                   * (depth64 / camera.focal_u).astype(F32)[:, None] - F32(layout.road_centre_x))
    distance = np.abs(from_centre)
    is_right = from_centre > 0
    right = is_right.astype(F32)
    half_width = F32(layout.road_half_width)
    kerb = half_width + F32(0.22)
    sidewalks = layout.sidewalk_widths
    sidewalk_edge = half_width + F32(sidewalks[0]) + F32(sidewalks[1] - sidewalks[0]) * right
    grass_edge = kerb + F32(layout.grass_widths[0]) + F32(layout.grass_widths[1] - layout.grass_widths[0]) * right
    grass = (distance >= kerb) & (distance < grass_edge)
    lawn_left, lawn_right = layout.lawn_beyond
    if lawn_left or lawn_right:
        beyond = distance >= sidewalk_edge
        if not (lawn_left and lawn_right):
            beyond &= is_right if lawn_right else ~is_right
        grass |= beyond
    road = distance < half_width
    material = np.uint8(SIDEWALK_LEFT) + is_right.view(np.uint8)
    material = _select_u8(grass, GRASS, material)
    material = _select_u8(distance < kerb, KERB, material)
    material = _select_u8(road, ASPHALT, material)
    lane_width = F32(2 * layout.road_half_width / layout.lanes)
    lane_position = (from_centre + half_width) * (F32(1) / lane_width)
    to_line = np.abs(lane_position - np.floor(lane_position + F32(0.5))) * lane_width
    road_edge = (lane_position < 0.5) | (lane_position > layout.lanes - 0.5)
    dashed = fraction(z * F32(1 / 9.0) + F32(layout.noise_lattice[0])) < F32(0.45)
    paint = road & (to_line < F32(0.08)) & (road_edge | dashed)
    if math.isfinite(layout.crossing_z):
        crossing = F32(layout.crossing_z)
        paint |= (road & (z > crossing) & (z < crossing + F32(4.0))
                  & (fraction(from_centre * F32(1 / 1.1)) < F32(0.5)))
    material = _select_u8(paint, LANE_PAINT, material)
    colours = np.array(
        [
            layout.road_rgb,
            (0.86, 0.86, 0.82),
            (0.72, 0.72, 0.7),
            layout.sidewalk_rgb[0],
            layout.sidewalk_rgb[1],
            mix(layout.leaf_rgb, (0.45, 0.5, 0.2), 0.3),
        ],
        F32,
    ).T
    texture = np.array([0.2, 0.3, 0.2, 0.25, 0.25, 1.1], F32)
    factor = F32(1) + texture.take(material) * (canvas.fine_noise[rows] - F32(0.5))
    repaired = (material == ASPHALT) & (canvas.coarse_noise[rows] > F32(0.8))
    tile = layout.tile_size
    joints = (
        (material >= SIDEWALK_LEFT)
        & (material <= SIDEWALK_RIGHT)
        & ((fraction(from_centre * F32(1 / tile)) < F32(0.06)) | (fraction(z * F32(1 / tile)) < F32(0.06)))
    )
    factor *= F32(1) - F32(0.12) * repaired.astype(F32) - F32(0.2) * joints.astype(F32)
    if layout.sun_side != 0:  # building shadow along one side, its edge stepping with the building heights
        left_facade, right_facade = layout.facade_x
        reach = layout.shadow_reach(depth64).astype(F32)[:, None]
        if layout.sun_side < 0:
            in_shadow = from_centre < F32(left_facade - layout.road_centre_x) + reach
        else:
            in_shadow = from_centre > F32(right_facade - layout.road_centre_x) - reach
        factor *= F32(1) - F32(0.42) * in_shadow.astype(F32)
    haze = np.clip(z * F32(1 / 400.0), 0.0, 0.5)
    factor *= F32(1) - haze
    haze_colour = np.asarray(SKIES[layout.sky][1], F32)
    for channel in range(3):
        canvas.image[channel, rows] = colours[channel].take(material) * factor + haze_colour[channel] * haze
    canvas.labels[rows] = (np.uint8(SIDEWALK) * (~road).view(np.uint8)
                           + np.uint8(VEGETATION - SIDEWALK) * (material == GRASS).view(np.uint8))


def paint_skyline(canvas: Canvas, layout: StreetLayout) -> None:
    """Buildings and tree clumps across the far end of the street (hazy, low detail)."""
    camera = canvas.camera
    end_z = layout.street_end_z
    x = (canvas.column_u - camera.vanishing_u) * (end_z / camera.focal_u)
    ends = np.array([block.end_x for block in layout.skyline])
    block = np.minimum(np.searchsorted(ends, x), len(ends) - 1)
    heights = np.array([b.height for b in layout.skyline])[block]
    kinds = np.array([b.kind for b in layout.skyline])[block]
    outline = noise_1d(layout.noise_lattice, x / 3.0)
    heights = np.where(kinds == HEDGE, heights + 2.0 * outline, np.where(kinds == GAP, 0.0, heights))
    top = (camera.horizon_v + camera.focal_v * (camera.height - heights) / end_z).astype(F32)
    bottom = camera.image_v(0.0, end_z)
    rows = canvas.rows_between(float(top.min()), bottom)
    if rows is None:
        return
    v = canvas.row_v32[rows][:, None]
    mask = (v >= top[None, :]) & (v < F32(bottom))
    rgb = np.array([b.rgb for b in layout.skyline], F32).T[:, block][:, None, :]
    y = F32(camera.height) - (v - F32(camera.horizon_v)) * F32(end_z / camera.focal_v)
    windows = ((kinds == BUILDING_FRONT)[None, :] & (fraction(x / 1.6).astype(F32)[None, :] < F32(0.5))
               & (fraction(y * F32(1 / 3.2)) < 0.5))
    texture = np.where(kinds == HEDGE, F32(0.9), F32(0.2))[None, :]
    haze = F32(min(0.6, end_z / 250.0))
    factor = ((1 + texture * (canvas.fine_noise[rows] - F32(0.5))) * (F32(1) - F32(0.15) * windows.astype(F32))
              * (F32(1) - haze))
    colour = rgb * factor + np.asarray(SKIES[layout.sky][1], F32)[:, None, None] * haze
    labels = np.where(kinds == HEDGE, np.uint8(VEGETATION), np.uint8(BUILDING))[None, :]
    canvas.write(rows, slice(None), mask, colour, labels)


def _facade_columns(canvas: Canvas, layout: StreetLayout) -> dict[str, np.ndarray]:
    """Per image column: depth of the facade seen there and the parameters of its segment."""
    camera = canvas.camera
    du = canvas.column_u - camera.vanishing_u
    left = du < 0
    left_facade, right_facade = layout.facade_x
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(left, left_facade, right_facade) * camera.focal_u / du
    valid = np.isfinite(depth) & (depth > 0.05) & (depth < layout.street_end_z)
    depth = np.where(valid, depth, 1.0)
    segments = layout.facades[0] + layout.facades[1]
    left_count = len(layout.facades[0])
    left_ends = np.array([s.end_z for s in layout.facades[0]])
    right_ends = np.array([s.end_z for s in layout.facades[1]])
    segment = np.where(left, np.searchsorted(left_ends, depth), left_count + np.searchsorted(right_ends, depth))

    def per_column(attribute: Callable[[FacadeSegment], object]) -> np.ndarray:
        return np.array([attribute(s) for s in segments])[segment]

    kind = np.where(valid, per_column(lambda s: s.kind), GAP)
    height = per_column(lambda s: s.height)
    height = np.where(kind == HEDGE, height + 0.7 * noise_1d(layout.noise_lattice, depth / 1.3), height)
    height = np.where(kind == GAP, 0.0, height)
    window_phase = fraction(depth / per_column(lambda s: s.window_pitch) + segment * 0.37)
    shop_phase = fraction(depth / 5.0 + segment * 0.61)
    return {
        "depth": depth,
        "kind": kind,
        "height": height,
        "left": left,
        "wall_rgb": np.array([s.wall_rgb for s in segments], F32).T[:, segment],
        "glass_rgb": np.array([s.glass_rgb for s in segments], F32).T[:, segment],
        "window_column": (window_phase > per_column(lambda s: s.window_span_x[0]))
        & (window_phase < per_column(lambda s: s.window_span_x[1])),
        "floor_height": per_column(lambda s: s.floor_height),
        "window_bottom": per_column(lambda s: s.window_span_y[0]),
        "window_top": per_column(lambda s: s.window_span_y[1]),
        "shop_column": per_column(lambda s: s.shopfronts) & (shop_phase > 0.15) & (shop_phase < 0.85),
    }


def paint_facades(canvas: Canvas, layout: StreetLayout) -> None:
    """Building fronts (windows, shop fronts, cornices) and hedges on the planes lining the street."""
    camera = canvas.camera
    columns = _facade_columns(canvas, layout)
    depth, kind, height = columns["depth"], columns["kind"], columns["height"]
    top = np.where(kind == GAP, 9.0, camera.horizon_v + camera.focal_v * (camera.height - height) / depth).astype(F32)
    bottom = np.where(kind == GAP, 9.0, camera.horizon_v + camera.focal_v * camera.height / depth).astype(F32)
    rows = canvas.rows_between(-1.0, float(np.where(kind == GAP, 0.0, bottom).max()))
    if rows is None:
        return
    v = canvas.row_v32[rows][:, None]
    mask = (v >= top[None, :]) & (v < bottom[None, :])
    y = F32(camera.height) - (v - F32(camera.horizon_v)) * (depth / camera.focal_v).astype(F32)[None, :]
    floor_height = columns["floor_height"].astype(F32)[None, :]
    in_floor = fraction(y / floor_height)
    building = (kind == BUILDING_FRONT)[None, :]
    height32 = height.astype(F32)[None, :]
    ground_floor = floor_height * F32(1.15)
    windows = (building & columns["window_column"][None, :] & (in_floor > columns["window_bottom"].astype(F32))
               & (in_floor < columns["window_top"].astype(F32)))
    windows &= (y > ground_floor) & (y < height32 - F32(0.7))
    shops = building & columns["shop_column"][None, :] & (y > F32(0.25)) & (y < ground_floor - F32(0.6))
    cornice = building & (y > height32 - F32(0.35))
    leaf = np.asarray(layout.leaf_rgb, F32)[:, None]
    base = np.where((kind == HEDGE)[None, :], leaf, columns["wall_rgb"])  # (3, W)
    texture = np.where(kind == HEDGE, F32(1.0), F32(0.22))[None, :]
    side_shade = np.where(columns["left"], 0.62 if layout.sun_side < 0 else 1.0, 0.62 if layout.sun_side > 0 else 1.0)
    haze = np.clip(depth / 300.0, 0.0, 0.5)
    column_factor = (side_shade * (1.0 - haze)).astype(F32)  # per column: shading and haze
    wall = (base * column_factor)[:, None, :]
    glass = (columns["glass_rgb"] * column_factor)[:, None, :]
    glazed = (windows | shops).astype(F32)
    reflection = (F32(0.75)  # sky reflection, brighter at the top of a window
                  + F32(0.6) * (F32(1.0) - (in_floor - columns["window_bottom"].astype(F32))))
    wall_factor = ((1 + texture * (canvas.fine_noise[rows] - F32(0.5))) * (F32(1) + F32(0.2) * cornice.astype(F32))
                   * (F32(1) - glazed))
    haze_colour = np.asarray(SKIES[layout.sky][1], F32)[:, None, None] * haze.astype(F32)[None, None, :]
    colour = wall * wall_factor + glass * (reflection * glazed) + haze_colour
    labels = np.where(kind == HEDGE, np.uint8(VEGETATION), np.uint8(BUILDING))[None, :]
    canvas.write(rows, slice(None), mask, colour, labels)
