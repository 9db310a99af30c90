"""The pipeline stages as small pure torch functions: the only place their maths is written.

Every runtime (in-process torch, the ONNX graphs exported from these functions, the Triton python models)
calls these, so the stages cannot drift apart. Images are (B, C, H, W) float tensors; pixel space is [0, 1].
Resizes are stated exactly because they change how much noise reaches the models: bilinear,
``align_corners=False``, antialias off unless asked (the authors' torchvision 0.8 had none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x + σ·ε in [0, 1] pixel space, without clipping (clipping would change the smoothing distribution)."""
    return clean + sigma * noise


def resize(images: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size`` = (H, W), align_corners=False; a no-op when the size already matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The segmenter's input size for the paper's ``scale`` (Table 2): round(scale · dataset size)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the ImageNet statistics the segmenters were trained with."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of class scores to the full label-map size."""
    return resize(logits, size, antialias=False)


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class (B, H, W) as uint8 when K <= 256 (ties: the lowest class id, as torch.argmax)."""
    labels = logits.argmax(dim=1)
    return labels.to(torch.uint8) if logits.shape[1] <= 256 else labels.to(torch.int32)


def segmenter_input(images01: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[0, 1] images → the segmenter's input: bilinear resize to ``size`` (the paper's scale), ImageNet-normalised."""
    return normalize_imagenet(resize(images01, size))


def labels_from_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Segmenter scores at any resolution → per-pixel classes at the certified map's full ``size``."""
    return argmax_labels(upsample_logits(logits.float(), size))
