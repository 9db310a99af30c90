"""Tiny deterministic segmenters with known per-pixel agreement probabilities, for statistical tests."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm


class ThresholdSegmenter:
    """Class 0 where channel 0 of the noisy image is below ``level + sigma * Phi^-1(p)``, else class 1.

    On a constant image at ``level`` with noise sigma, every pixel is class 0 with probability exactly p,
    independently across pixels and samples when (and only when) the noise is independent.
    """

    def __init__(self, sigma: float, p: float, level: float = 0.5) -> None:
        self.threshold = level + sigma * float(norm.ppf(p))

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        return (noisy[:, 0] > self.threshold).to(torch.uint8)


def constant_image(height: int, width: int, level: float = 0.5) -> np.ndarray:
    return np.full((3, height, width), level, dtype=np.float32)


def stripes_segmenter(num_classes: int):
    """A deterministic segmenter of real images: the class of a pixel is its quantised brightness."""

    def segment(noisy: torch.Tensor) -> torch.Tensor:
        brightness = noisy.mean(dim=1).clamp(0, 1 - 1e-6)
        return (brightness * num_classes).floor().to(torch.uint8)

    return segment


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm statistics and affine parameters far from the identity (in place), so that a rewrite that drops,
    misplaces or misfolds a norm shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) * 3 + 0.05)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator))
    return model
