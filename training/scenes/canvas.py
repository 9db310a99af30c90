"""The image and label buffers a scene is painted into, and the patch rasterisers objects are drawn with.

A patch is the block of pixels a plane covers (rows, columns) plus the world coordinates of each pixel centre on
that plane; drawing code builds boolean masks from those coordinates and paints them. Pixels are sampled at
their centres, in normalised image coordinates, so a scene's layout does not depend on its resolution.
"""

from __future__ import annotations

import math

import numpy as np

from certseg.training.scenes.camera import Camera
from certseg.training.scenes.labels import SIDEWALK, VEGETATION
from certseg.training.scenes.value_noise import F32, NOISE_HEIGHT, NOISE_WIDTH, bilinear

Patch = tuple[slice, slice, np.ndarray, np.ndarray]
"""(rows, columns, first world coordinate, second world coordinate) of a plane's pixels."""


class Canvas:
    """Image + label buffers, pixel-centre coordinates, screen-space noise, and patch rasterisers."""

    def __init__(self, height: int, width: int, camera: Camera, noise: np.ndarray):
        self.height, self.width, self.camera = height, width, camera
        self.column_u = (np.arange(width) + 0.5) / width
        self.row_v = (np.arange(height) + 0.5) / height
        self.row_v32 = self.row_v.astype(F32)
        self.image = np.zeros((3, height, width), F32)
        self.labels = np.zeros((height, width), np.uint8)
        sampled = bilinear(noise, self.row_v * NOISE_HEIGHT - 0.5, self.column_u * NOISE_WIDTH - 0.5)
        self.coarse_noise, self.fine_noise = sampled[0], sampled[1]

    def _pixel_span(self, start: float, stop: float, count: int) -> slice | None:
        """Pixels whose centres fall in [start, stop] (normalised), clipped to the image."""
        if not (math.isfinite(start) and math.isfinite(stop)):
            start, stop = max(min(start, 2.0), -1.0), max(min(stop, 2.0), -1.0)
        first = max(0, math.ceil(start * count - 0.5))
        last = min(count - 1, math.floor(stop * count - 0.5))
        return slice(first, last + 1) if last >= first else None

    def rows_between(self, top_v: float, bottom_v: float) -> slice | None:
        return self._pixel_span(top_v, bottom_v, self.height)

    def columns_between(self, left_u: float, right_u: float) -> slice | None:
        return self._pixel_span(left_u, right_u, self.width)

    def facing_patch(self, z: float, x0: float, x1: float, y0: float, y1: float) -> Patch | None:
        """A vertical plane facing the camera at depth z: world X (1,w) and Y (h,1) per pixel."""
        camera = self.camera
        rows = self.rows_between(camera.image_v(y1, z), camera.image_v(y0, z))
        cols = self.columns_between(camera.image_u(x0, z), camera.image_u(x1, z))
        if rows is None or cols is None:
            return None
        world_x = ((self.column_u[cols] - camera.vanishing_u) * (z / camera.focal_u)).astype(F32)[None, :]
        world_y = (camera.height - (self.row_v[rows] - camera.horizon_v) * (z / camera.focal_v)).astype(F32)[:, None]
        return rows, cols, world_x, world_y

    def side_patch(self, plane_x: float, z0: float, z1: float, y0: float, y1: float) -> Patch | None:
        """A vertical plane X = plane_x along the street: depth z (1,w) and world Y (h,w) per pixel."""
        camera = self.camera
        us = [camera.image_u(plane_x, z0), camera.image_u(plane_x, z1)]
        vs = [camera.image_v(y, z) for y in (y0, y1) for z in (z0, z1)]
        rows, cols = self.rows_between(min(vs), max(vs)), self.columns_between(min(us), max(us))
        if rows is None or cols is None:
            return None
        depth = camera.focal_u * plane_x / (self.column_u[cols] - camera.vanishing_u)
        world_y = F32(camera.height) - (self.row_v32[rows] - F32(camera.horizon_v))[:, None] * (
            depth / camera.focal_v
        ).astype(F32)[None, :]
        return rows, cols, depth.astype(F32)[None, :], world_y

    def ground_patch(self, x0: float, x1: float, z0: float, z1: float) -> Patch | None:
        """A rectangle on the ground plane: world X (h,w) and depth z (h,1) per pixel."""
        camera = self.camera
        us = [camera.image_u(x, z) for x in (x0, x1) for z in (z0, z1)]
        rows = self.rows_between(camera.image_v(0.0, z1), camera.image_v(0.0, z0))
        cols = self.columns_between(min(us), max(us))
        if rows is None or cols is None:
            return None
        depth = camera.focal_v * camera.height / (self.row_v[rows] - camera.horizon_v)
        world_x = (self.column_u[cols] - camera.vanishing_u).astype(F32)[None, :] * (
            depth / camera.focal_u
        ).astype(F32)[:, None]
        return rows, cols, world_x, depth.astype(F32)[:, None]

    def paint(
        self,
        rows: slice,
        cols: slice,
        mask: np.ndarray,
        label: int | None,
        rgb: tuple[float, float, float] | np.ndarray,
        texture: float = 0.15,
        shade: np.ndarray | float | None = None,
    ) -> None:
        """Write colour (modulated by fine noise and ``shade``) and class ``label`` where ``mask``.

        The patch is first cropped to the mask's bounding box: small parts (wheels, lamps, heads) of big
        objects then cost little.
        """
        mask = np.broadcast_to(mask, (rows.stop - rows.start, cols.stop - cols.start))
        hit_rows, hit_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(hit_rows) == 0:
            return
        r0, r1, c0, c1 = int(hit_rows[0]), int(hit_rows[-1]) + 1, int(hit_cols[0]), int(hit_cols[-1]) + 1
        rows, cols = slice(rows.start + r0, rows.start + r1), slice(cols.start + c0, cols.start + c1)
        factor = 1 + F32(texture) * (self.fine_noise[rows, cols] - F32(0.5))
        if isinstance(shade, np.ndarray) and shade.ndim == 2:  # crop, keeping broadcast (size-1) axes
            factor = (
                factor
                * shade[(r0 if shade.shape[0] > 1 else 0) :, (c0 if shade.shape[1] > 1 else 0) :][: r1 - r0, : c1 - c0]
            )
        elif shade is not None:
            factor = factor * shade
        self.write(rows, cols, mask[r0:r1, c0:c1], np.asarray(rgb, F32).reshape(3, 1, 1) * factor, label)

    def write(self, rows: slice, cols: slice, mask: np.ndarray, colour: np.ndarray, label) -> None:
        """Exact masked write done arithmetically: numpy's masked copies are ~20x slower than this."""
        weight = mask.astype(F32)
        view = self.image[:, rows, cols]
        view *= F32(1) - weight
        view += colour * weight
        if label is not None:
            labels = self.labels[rows, cols]
            labels -= (labels - np.asarray(label, np.uint8)) * mask.view(np.uint8)  # uint8 wrap-around: exact

    def darken_ground(self, rows: slice, cols: slice, mask: np.ndarray, factor: float) -> None:
        """Image-only darkening (cast shadows) restricted to ground pixels."""
        labels = self.labels[rows, cols]
        on_ground = mask & ((labels <= SIDEWALK) | (labels == VEGETATION))
        self.image[:, rows, cols] *= F32(1) - F32(1 - factor) * on_ground.astype(F32)
