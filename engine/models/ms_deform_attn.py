"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch: bilinear ``grid_sample`` and nothing else.

One implementation serves both places ViT-Adapter uses it: the adapter's injectors/extractors (``ops.MSDeformAttn``)
and the Mask2Former pixel decoder (mmcv ``MultiScaleDeformableAttention``). The two compute the same sampling and
differ only in the value width (``value_ratio``) and in where the residual is added, which is left to the callers.
Without a custom op the graph exports to ONNX as is (``GridSample``, opset >= 16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Shapes = Sequence[tuple[int, int]]


def tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, HW, C), row-major."""
    return maps.flatten(2).transpose(1, 2)


def level_maps(x: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    """Inverse of concatenating :func:`tokens` over levels: (B, ΣHW, C) → [(B, C, H, W), ...]."""
    parts = x.split([height * width for height, width in shapes], dim=1)
    return [part.transpose(1, 2).unflatten(-1, shape) for part, shape in zip(parts, shapes, strict=True)]


def reference_points(shapes: Shapes, device: torch.device | None = None) -> torch.Tensor:
    """Pixel centres ((j+0.5)/W, (i+0.5)/H) of each level's grid, row-major, levels concatenated: (ΣHW, 2).

    Both official codes build the same float32 values (``linspace(0.5, H-0.5, H) / H`` and
    ``(j+0.5)·stride / (W·stride)`` with power-of-two strides are exact).
    """
    points = []
    for height, width in shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)


def deformable_sample(
    value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Σ_{level, point} weight · bilinear(value, location) per head, zeros outside the maps.

    value (B, ΣHW, heads, d) flattened row-major over ``shapes``; locations (B, Q, heads, levels, points, 2)
    as (x, y) in [0, 1]; weights (B, Q, heads, levels, points). Returns (B, Q, heads·d). The pixel position is
    loc·size − 0.5, i.e. ``grid_sample(align_corners=False)`` on 2·loc − 1, as the official kernels and their
    PyTorch fallbacks compute it.
    """
    heads, dim = value.shape[2], value.shape[3]
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1
    samples = []
    per_level = value.split([height * width for height, width in shapes], dim=1)
    for level, (value_level, (height, width)) in enumerate(zip(per_level, shapes, strict=True)):
        maps = value_level.flatten(2).transpose(1, 2).reshape(-1, dim, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(-1, 1, queries, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.reshape(-1, heads * dim, queries).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Projections around :func:`deformable_sample`; parameter names and order as both official modules."""

    def __init__(
        self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, value_ratio: float = 1.0
    ) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        value_dim = int(embed_dim * value_ratio)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, value_dim)
        self.output_proj = nn.Linear(value_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, shapes: Shapes
    ) -> torch.Tensor:
        """query (B, Q, C) around ``reference`` (Q, 2), shared by all levels; value (B, ΣHW, C) → (B, Q, C).

        Offsets are in pixels of each level, normalised by (W, H); the attention weights are softmaxed jointly
        over levels × points per head.
        """
        queries = query.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).unflatten(-1, (heads, -1))
        offsets = self.sampling_offsets(query).reshape(-1, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).reshape(-1, queries, heads, levels * points).softmax(-1)
        weights = weights.reshape(-1, queries, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(deformable_sample(value, shapes, locations, weights))
