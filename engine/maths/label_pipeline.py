"""What one noisy sample goes through: (scale → denoise →) resize → segment → argmax, as a torch module.

``PipelineSpec`` is the complete, recordable description of that path (method, σ, t* with its rule and the
denoiser's noise schedule, sizes, resize mode, the segmenter's input normalisation); ``LabelPipeline``
composes the stage functions of ``certseg.engine.maths.stages`` and ``certseg.engine.maths.denoise`` around the two
models, so the torch runtime, ONNX export and the Triton step models all run the same maths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from certseg.engine.choices import Method, TimestepRule, choice
from certseg.engine.maths.denoise import LINEAR, Schedule, TimestepChoice, one_step_denoise_checked, select_timestep
from certseg.engine.maths.stages import (
    IMAGENET,
    Normalization,
    labels_from_logits,
    scaled_size,
    segmenter_input,
)


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides which label map a noisy sample becomes (besides the model weights)."""

    method: Method
    sigma: float
    image_size: tuple[int, int]
    scale: float = 1.0
    denoiser_size: tuple[int, int] | None = None
    timestep: TimestepChoice | None = None
    antialias: bool = False
    normalization: Normalization = IMAGENET
    """How [0, 1] pixels become the segmenter's input (its mean, std and input range)."""
    segmenter_input_size: tuple[int, int] | None = None
    """A segmenter that takes one fixed (H, W) gets that, whatever the image; None: round(scale · image size)."""

    @property
    def segmenter_size(self) -> tuple[int, int]:
        if self.segmenter_input_size is not None:
            return self.segmenter_input_size
        return scaled_size(*self.image_size, self.scale)

    def record(self) -> dict[str, Any]:
        """JSON-ready description, stored in every result so any number can be re-made."""
        out = asdict(self)
        out["segmenter_size"] = list(self.segmenter_size)
        return out


def make_spec(
    method: Method | str,
    sigma: float,
    image_size: tuple[int, int],
    *,
    scale: float = 1.0,
    denoiser_size: tuple[int, int] | None = None,
    timestep_rule: TimestepRule | str = TimestepRule.principled,
    antialias: bool = False,
    normalization: Normalization = IMAGENET,
    segmenter_input_size: tuple[int, int] | None = None,
    schedule: Schedule = LINEAR,
) -> PipelineSpec:
    """A spec with t* chosen by ``timestep_rule`` (on the denoiser's ``schedule``) for the noise that actually
    reaches the denoiser; the defaults are the shipped models' (ImageNet normalisation, linear schedule)."""
    method = choice(Method, method, "method")
    timestep = None
    if method == Method.denoisecertify:
        if denoiser_size is None:
            raise ValueError("denoisecertify needs the denoiser's input size")
        timestep = select_timestep(
            sigma, timestep_rule, image_size=image_size, denoiser_size=denoiser_size, antialias=antialias,
            schedule=schedule,
        )
    else:
        denoiser_size = None
    return PipelineSpec(
        method=method,
        sigma=float(sigma),
        image_size=(int(image_size[0]), int(image_size[1])),
        scale=float(scale),
        denoiser_size=None if denoiser_size is None else (int(denoiser_size[0]), int(denoiser_size[1])),
        timestep=timestep,
        antialias=antialias,
        normalization=normalization,
        segmenter_input_size=None if segmenter_input_size is None else (
            int(segmenter_input_size[0]), int(segmenter_input_size[1])),
    )


class LabelPipeline(nn.Module):
    """noisy images (B, 3, H, W) in [0, 1] → labels (B, H, W) uint8, for one ``PipelineSpec``.

    Labels are classes 0..K-1, or K where the sample's model outputs were non-finite (see ``stages``).
    """

    def __init__(self, spec: PipelineSpec, segmenter: nn.Module, denoiser: nn.Module | None = None) -> None:
        super().__init__()
        if spec.method == Method.denoisecertify and denoiser is None:
            raise ValueError("denoisecertify needs a denoiser")
        self.spec = spec
        self.segmenter = segmenter
        self.denoiser = denoiser if spec.method == Method.denoisecertify else None

    def clean_images(self, noisy: torch.Tensor) -> torch.Tensor:
        """What the segmenter sees, in [0, 1] at the segmenter's size: denoised (DenoiseCertify) or resized."""
        return self.denoise(noisy)[0]

    def denoise(self, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(clean images, (B,) bool: whether the denoiser's ε was finite), or (noisy, None) without a denoiser.

        ε is checked before x̂0's clamp, which would turn an infinite ε into a finite, meaningless image.
        """
        spec = self.spec
        if self.denoiser is None:
            return noisy, None
        return one_step_denoise_checked(
            self.denoiser, noisy, spec.timestep.t, denoiser_size=spec.denoiser_size, antialias=spec.antialias,
            out_size=spec.segmenter_size, schedule=spec.timestep.noise_schedule,
        )

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """Labels, with K (= num_classes) where the sample's scores, or its denoiser output, were non-finite."""
        clean, valid = self.denoise(noisy)
        logits = self.segmenter(segmenter_input(clean, self.spec.segmenter_size, self.spec.normalization))
        return labels_from_logits(logits, noisy.shape[-2:], valid)
