"""The pinhole camera every scene is seen through: world metres to normalised image coordinates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Camera:
    """A camera ``height`` metres above the ground looking along +z (world X right, Y up, z depth).

    Image coordinates are normalised: u (column) and v (row) in [0, 1], v growing downwards.
    """

    vanishing_u: float
    """u of the vanishing point (where the street's centre line meets the horizon)."""
    horizon_v: float
    focal_u: float
    """Focal length in widths of the image (u per metre at 1 m depth)."""
    focal_v: float
    height: float

    def image_u(self, x: float, z: float) -> float:
        """u of world point (x, ., z)."""
        return self.vanishing_u + self.focal_u * x / z

    def image_v(self, y: float, z: float) -> float:
        """v of world point (., y, z)."""
        return self.horizon_v + self.focal_v * (self.height - y) / z
