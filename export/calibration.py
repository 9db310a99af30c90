"""Calibration inputs for int8 graphs: what the segmenter and the denoiser see in a certification run, made from
procedural TRAINING scenes (never the held-out scenes the agreement with fp32 is measured on).

Why through the pipeline: the ranges an int8 graph is calibrated for must be those of the run it serves, i.e.
noisy images at the run's σ, scaled to x_t at the run's t* (denoiser), and denoised or noisy images normalised
as the segmenter reads them (segmenter). So each calibration scene is pushed through the fp32 ``LabelPipeline``
of the run's ``PipelineSpec`` with its models wrapped in recorders, and the recorded model inputs are the
calibration set. Segmenter inputs larger than ``CalibrationRecipe.max_pixels`` are cropped (the graph is fully
convolutional), so calibration stays cheap at full resolution while keeping the run's per-pixel statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.engine.maths.label_pipeline import LabelPipeline, PipelineSpec
from certseg.training.scenes import GENERATOR_VERSION, generate_scene, is_train_seed

Feeds = list[dict[str, np.ndarray]]
"""One graph's calibration batches: input name → array, one dict per batch."""


@dataclass(frozen=True)
class CalibrationRecipe:
    """Which scenes and noise calibrate an int8 graph; recorded with every int8 certificate."""

    first_seed: int = 0
    """The first training seed (``certseg.training.scenes.TRAIN_SEEDS``): the segmenter trainer's first scenes."""
    scenes: int = 16
    samples_per_scene: int = 2
    noise_seed: int = 0
    """Root of the calibration noise (torch generator), apart from any certificate's noise."""
    max_pixels: int = 128 * 256
    """Segmenter inputs above this are centre-cropped to it (same aspect ratio): onnxruntime's calibrators hold
    every intermediate tensor of every batch, which with 256×512 crops peaked at 4 GB (512×1024 run)."""

    @property
    def seeds(self) -> range:
        """The scene seeds; a ``ValueError`` if any lies outside the training range."""
        seeds = range(self.first_seed, self.first_seed + self.scenes)
        if not all(is_train_seed(seed) for seed in (seeds[0], seeds[-1])):
            raise ValueError(f"calibration seeds {seeds[0]}..{seeds[-1]} leave the training range")
        return seeds

    def record(self) -> dict[str, Any]:
        seeds = self.seeds
        return asdict(self) | {"set": f"procedural training scenes, seeds {seeds[0]}..{seeds[-1]}",
                               "generator_version": GENERATOR_VERSION}


class _Recorder(nn.Module):
    """A model that keeps a copy of the inputs it is called with, then runs as before."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], crop_pixels: int | None = None) -> None:
        super().__init__()
        self.module, self.names, self.crop_pixels = module, names, crop_pixels
        self.feeds: Feeds = []

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kept = [_centre_crop(inputs[0], self.crop_pixels), *inputs[1:]]
        self.feeds.append({name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(
            self.names, kept, strict=True)})
        return self.module(*inputs)


def _centre_crop(images: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
    height, width = images.shape[-2:]
    if max_pixels is None or height * width <= max_pixels:
        return images
    shrink = (max_pixels / (height * width)) ** 0.5
    h, w = max(1, int(height * shrink)), max(1, int(width * shrink))
    top, left = (height - h) // 2, (width - w) // 2
    return images[..., top:top + h, left:left + w]


def calibration_feeds(
    spec: PipelineSpec, segmenter: nn.Module, denoiser: nn.Module | None, recipe: CalibrationRecipe,
    *, input_names: dict[str, tuple[str, ...]],
) -> dict[str, Feeds]:
    """role → the inputs each model gets when the fp32 pipeline of ``spec`` labels noisy training scenes.

    ``input_names``: role → the graph's input names in the order the pipeline passes them.
    """
    seg = _Recorder(segmenter, input_names["segmenter"], recipe.max_pixels)
    den = None if denoiser is None else _Recorder(denoiser, input_names["denoiser"])
    pipeline = LabelPipeline(spec, seg, den).eval()
    generator = torch.Generator().manual_seed(recipe.noise_seed)
    with torch.no_grad():
        for seed in recipe.seeds:
            image = torch.from_numpy(generate_scene(seed, *spec.image_size).image)
            clean = image.expand(recipe.samples_per_scene, *image.shape)
            pipeline(clean + spec.sigma * torch.randn(clean.shape, generator=generator))
    return {"segmenter": seg.feeds} | ({} if den is None else {"denoiser": den.feeds})
