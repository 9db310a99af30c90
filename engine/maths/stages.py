"""The pipeline stages as small pure torch functions: the only place their maths is written.

Every runtime (in-process torch, the ONNX graphs exported from these functions, the Triton python models)
calls these, so the stages cannot drift apart. Images are (B, C, H, W) float tensors; pixel space is [0, 1].
Resizes are stated exactly because they change how much noise reaches the models: bilinear,
``align_corners=False``, antialias off unless asked (the authors' torchvision 0.8 had none).

Non-finite model outputs fail closed. A pixel whose class scores are NaN or infinite in a sample (fp16
overflow, a corrupt weight), and every pixel of a sample whose denoiser output was non-finite, gets the label
K (= the number of classes, the abstain label): it is never a guess, so it can only count as a disagreement.
The smoothed classifier is thus that of "the segmenter, or K where its output is non-finite", and its
certificates hold as they are; argmax alone would silently map NaN scores to class 0 in every sample.

The plain values the stages take (``Normalization``, sizes) live in torch-free modules and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from certseg.engine.labels import label_numpy_dtype
from certseg.engine.maths.normalization import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalization
from certseg.engine.maths.sizes import as_pair, scaled_size

__all__ = [
    "IMAGENET", "IMAGENET_MEAN", "IMAGENET_STD", "Normalization", "add_noise", "argmax_labels", "argmax_or_invalid",
    "as_pair", "finite_samples", "label_dtype", "labels_from_logits", "normalize", "normalize_imagenet", "resize",
    "scaled_size", "segmenter_input", "to_rgb", "upsample_logits",
]

def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x + σ·ε in [0, 1] pixel space, without clipping (clipping would change the smoothing distribution)."""
    return clean + sigma * noise


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) → (B, 3, H, W) by replication; RGB passes through.

    Applied after the noise, never before: a grayscale image is certified in its own 1-channel pixel space, where
    each pixel gets one noise draw. Replicating first would draw three per pixel and certify only the 3-channel
    space, whose radius R is worth R/√3 in the grayscale image's own space.
    """
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize(images: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize to ``size`` = (H, W), align_corners=False; a no-op when the size already matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def normalize(images: torch.Tensor, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """[0, 1] pixels → (lo + x·(hi - lo) - mean) / std; the range's affine map is skipped for (0, 1), so the
    shipped models' inputs are exactly ``(x - mean) / std`` as they always were.

    One new tensor: the first op makes it and the rest run in place on it, with the same float operations in
    the same order (so the same values) as the expression; ``images`` itself is never written.
    """
    low, high = normalization.input_range
    mean = torch.tensor(normalization.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    if (low, high) != (0.0, 1.0):
        out = images * (high - low)
        out.add_(low).sub_(mean)
    else:
        out = images - mean
    return out.div_(std)


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the ImageNet statistics the shipped segmenters were trained with."""
    return normalize(images, IMAGENET)


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of class scores to the full label-map size."""
    return resize(logits, size, antialias=False)


def label_dtype(num_classes: int) -> torch.dtype:
    """uint8 while the K classes and the invalid/abstain label K fit (K <= 255), else int32."""
    return torch.uint8 if label_numpy_dtype(num_classes).itemsize == 1 else torch.int32


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class (B, H, W) as uint8 when K <= 255 (ties: the lowest class id, as torch.argmax).

    Says nothing about non-finite scores (torch's argmax picks a NaN); ``labels_from_logits`` handles them.
    """
    return logits.argmax(dim=1).to(label_dtype(logits.shape[1]))


def finite_samples(values: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether every value of each sample is finite (a denoiser's ε, say).

    A float32 sum per sample is non-finite exactly when a value is (NaN and ±Inf propagate), or when it would
    overflow (fail closed); it needs no batch-sized mask, unlike ``isfinite(values).all()``.
    """
    return torch.isfinite(values.sum(dim=tuple(range(1, values.ndim)), dtype=torch.float32))


def segmenter_input(
    images01: torch.Tensor, size: Sequence[int], normalization: Normalization = IMAGENET
) -> torch.Tensor:
    """[0, 1] images → the segmenter's input: bilinear resize to ``size`` (the paper's scale), then normalised."""
    return normalize(resize(images01, size), normalization)


def argmax_or_invalid(scores: torch.Tensor) -> torch.Tensor:
    """Full-size scores (B, K, H, W) → labels (B, H, W): the argmax, or K where a pixel's scores are not all finite.

    The argmax is a running maximum over the K class planes with a strict ``>``, so ties keep the lowest class
    (as ``torch.argmax``) and the labels of finite scores are exactly argmax's; a pixel is invalid when the float32
    sum of its K scores is non-finite (any score NaN or ±Inf, or an overflow: fail closed). Why not argmax: a
    compiler (``torch.compile``) fuses this into one pass over the pixels that reads each score once, where
    torch's CPU argmax over the channels of a channels-last tensor is 2-3x slower (``labels_from_logits`` with
    ``argmax=``). Eager, it makes a temporary per class: use ``labels_from_logits``' own path there.
    """
    num_classes = scores.shape[1]
    best = scores[:, 0]
    labels = torch.zeros(best.shape, dtype=label_dtype(num_classes), device=scores.device)
    for index in range(1, num_classes):
        candidate = scores[:, index]
        higher = candidate > best
        best = torch.where(higher, candidate, best)
        labels = torch.where(higher, index, labels)
    invalid = ~torch.isfinite(scores.sum(dim=1, dtype=torch.float32))
    return labels.masked_fill(invalid, num_classes)


def labels_from_logits(
    logits: torch.Tensor, size: Sequence[int], valid_samples: torch.Tensor | None = None,
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Segmenter scores at any resolution → per-pixel classes at the certified map's full ``size``.

    Pixels whose upsampled scores are not all finite, and every pixel of a sample that ``valid_samples``
    ((B,) bool) marks False, get the invalid label K. The check upsamples the per-pixel sum of the scores
    with the same operator: the sum is non-finite wherever any score is (or would overflow: fail closed),
    and the upsampled sum is non-finite wherever any tap feeding an upsampled score is, at 1/K of the cost.

    One sample at a time into the (B, H, W) label tensor: the full-size float32 scores (K·4 bytes per pixel)
    exist for one sample, never for the whole batch; each sample's labels are what the batched ops give it
    (no op mixes samples). Nothing is read back to the host (no branch on values), so the check stays on the
    device and the function traces (meta tensors, ``torch.compile``).

    ``argmax``: a compiled ``argmax_or_invalid``, which takes each sample's upsampled scores and checks the sum of
    the upsampled scores instead (``--compile``: the same labels wherever the scores are finite, and K wherever
    an upsampled score is not).
    """
    batch, num_classes = logits.shape[0], logits.shape[1]
    height, width = (int(s) for s in size)
    labels = torch.empty((batch, height, width), dtype=label_dtype(num_classes), device=logits.device)
    for index in range(batch):
        scores = logits[index : index + 1].float()
        if argmax is not None:
            labels[index] = argmax(upsample_logits(scores, size))[0]
            continue
        labels[index] = upsample_logits(scores, size).argmax(dim=1)[0]
        invalid = ~torch.isfinite(upsample_logits(scores.sum(dim=1, keepdim=True), size)[0, 0])
        labels[index].masked_fill_(invalid, num_classes)
    if valid_samples is not None:
        valid = valid_samples.to(device=logits.device, dtype=torch.bool).reshape(-1, 1, 1)
        labels.masked_fill_(~valid, num_classes)
    return labels
