"""Small bring-your-own models, exported with ``torch.onnx``, whose ONNX Runtime outputs equal torch's bit for bit.

Each value they compute is one float32 product that is exact (a weight of ±1, ±0.5 or 0: a power of two or
nothing) plus one rounded addition, so neither summation order nor fused multiply-adds can change a bit: a
certificate made through the ``.onnx`` file can be compared exactly with one made from the torch module. Their
I/O names, input order and normalisation differ from the shipped exports', so nothing works by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

from certseg.engine.maths.denoise import Schedule, denoiser_input, denoiser_output
from certseg.engine.maths.stages import Normalization, finite_samples, labels_from_logits, segmenter_input

CLASSES = ["road", "grass", "sky", "shade"]
PALETTE = [[128, 64, 128], [0, 200, 0], [70, 130, 180], [40, 40, 40]]
MMSEG = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), (0.0, 255.0))
"""A [0, 255] model with mmseg's statistics: not the ImageNet-on-[0, 1] default."""
DENOISER_SIZE = 32
COSINE = Schedule("cosine")


class ExactSegmenter(nn.Module):
    """pixels (B, 3, H, W) -> scores (B, 4, H/2, W/2): a strided 1x1 convolution in which every class reads one
    channel (R, G, B, -R/2) plus a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(CLASSES), 1, stride=2)
        weight = torch.zeros(len(CLASSES), 3, 1, 1)
        weight[0, 0], weight[1, 1], weight[2, 2], weight[3, 0] = 1.0, 1.0, 1.0, -0.5
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(torch.tensor([0.0, 0.25, -0.25, 0.5]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels)


class ExactDenoiser(nn.Module):
    """(t (B,) int64, latent (B, 3, S, S)) -> noise = latent / 2 + e[t]: timesteps first, unlike ADM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 3)
        with torch.no_grad():
            self.embed.weight.copy_(0.2 * torch.randn(1000, 3, generator=torch.Generator().manual_seed(3)))

    def forward(self, t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return 0.5 * latent + self.embed(t)[:, :, None, None]


def add_props(path: Path, props: dict[str, str]) -> Path:
    model = onnx.load(str(path))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def export_segmenter(path: Path, *, fixed_size: tuple[int, int] | None = None, props: bool = True) -> Path:
    """``ExactSegmenter`` as ``pixels`` -> ``scores`` (dynamic batch; dynamic H, W unless ``fixed_size``), with
    the metadata props of a [0, 255] model and its classes and palette."""
    size = fixed_size or (64, 96)
    axes = {"pixels": {0: "batch"}, "scores": {0: "batch"}}
    if fixed_size is None:
        axes["pixels"] |= {2: "height", 3: "width"}
        axes["scores"] |= {2: "out_height", 3: "out_width"}
    with torch.no_grad():
        torch.onnx.export(ExactSegmenter().eval(), (torch.rand(2, 3, *size),), str(path), input_names=["pixels"],
                          output_names=["scores"], dynamic_axes=axes, opset_version=18, dynamo=False)
    if not props:
        return path
    return add_props(path, {
        "certseg.mean": json.dumps(list(MMSEG.mean)), "certseg.std": json.dumps(list(MMSEG.std)),
        "certseg.input_range": "[0, 255]", "certseg.classes": json.dumps(CLASSES),
        "certseg.palette": json.dumps(PALETTE), "certseg.name": "my-segmenter",
    })


def export_denoiser(path: Path) -> Path:
    """``ExactDenoiser`` as (``t``, ``latent``) -> ``noise`` at S = 32, declared a cosine-schedule model."""
    with torch.no_grad():
        example = (torch.tensor([5, 7]), torch.rand(2, 3, DENOISER_SIZE, DENOISER_SIZE))
        torch.onnx.export(ExactDenoiser().eval(), example, str(path), input_names=["t", "latent"],
                          output_names=["noise"], opset_version=18, dynamo=False,
                          dynamic_axes={"t": {0: "batch"}, "latent": {0: "batch"}, "noise": {0: "batch"}})
    return add_props(path, {"certseg.schedule": "cosine", "certseg.role": "denoiser", "certseg.name": "my-denoiser"})


def reference_label_fn(segmenter: nn.Module, denoiser: nn.Module | None = None, *, t: int | None = None,
                       input_size: tuple[int, int] | None = None, normalization: Normalization = MMSEG):
    """noisy (B, 3, H, W) -> labels, composed here from the stage functions around the torch modules (one-step
    denoising on the cosine schedule first when a denoiser is given): the pipeline a file's metadata describes."""

    @torch.no_grad()
    def label(noisy: torch.Tensor) -> torch.Tensor:
        image_size = tuple(noisy.shape[-2:])
        size = input_size or image_size
        clean, valid = noisy, None
        if denoiser is not None:
            x_t = denoiser_input(noisy, t, denoiser_size=DENOISER_SIZE, schedule=COSINE)
            eps = denoiser(torch.full((len(noisy),), t, dtype=torch.int64), x_t)
            clean, valid = denoiser_output(x_t, eps, t, out_size=size, schedule=COSINE), finite_samples(eps)
        scores = segmenter(segmenter_input(clean, size, normalization))
        return labels_from_logits(scores, image_size, valid)

    return label
