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
from certseg.engine.errors import InputError
from certseg.engine.maths.denoise import (
    LINEAR,
    NoiseFn,
    Schedule,
    TimestepChoice,
    VarianceMode,
    multi_step_denoise_checked,
    one_step_denoise_checked,
    select_timestep,
    spaced_timesteps,
)
from certseg.engine.maths.stages import (
    IMAGENET,
    Normalization,
    labels_from_logits,
    scaled_size,
    segmenter_input,
)

MULTI_STEP_VARIANCE: VarianceMode = "fixed_small"
"""The ancestral variance of K > 1 steps: DDPM's posterior variance β̃, which needs only ε. Exported and served
denoisers output ε alone (and the shipped ADM has no learned variance), so every runtime runs the same chain."""


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
    denoise_steps: int = 1
    """K: 1 is the paper's one-step denoiser; K > 1 runs K spaced ancestral steps from t* down to 0."""

    @property
    def denoise_timesteps(self) -> tuple[int, ...] | None:
        """The timesteps the denoiser visits, from t* down (None without a denoiser)."""
        if self.timestep is None:
            return None
        chain = spaced_timesteps(self.timestep.t, self.denoise_steps, self.timestep.noise_schedule)
        return tuple(int(t) for t in chain[::-1])

    @property
    def segmenter_size(self) -> tuple[int, int]:
        if self.segmenter_input_size is not None:
            return self.segmenter_input_size
        return scaled_size(*self.image_size, self.scale)

    def record(self) -> dict[str, Any]:
        """JSON-ready description, stored in every result so any number can be re-made."""
        out = asdict(self)
        out["segmenter_size"] = list(self.segmenter_size)
        timesteps = self.denoise_timesteps
        out["denoise_timesteps"] = None if timesteps is None else list(timesteps)
        out["denoise_variance"] = None if self.denoise_steps == 1 else MULTI_STEP_VARIANCE
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
    denoise_steps: int = 1,
) -> PipelineSpec:
    """A spec with t* chosen by ``timestep_rule`` (on the denoiser's ``schedule``) for the noise that actually
    reaches the denoiser; the defaults are the shipped models' (ImageNet normalisation, linear schedule).

    ``denoise_steps`` K must lie in [1, t* + 1] (one UNet call per visited timestep) and be 1 without a denoiser.
    """
    method = choice(Method, method, "method")
    if isinstance(denoise_steps, bool) or not isinstance(denoise_steps, int) or denoise_steps < 1:
        raise InputError(f"--denoise-steps must be an integer >= 1, got {denoise_steps!r}")
    if method != Method.denoisecertify and denoise_steps != 1:
        raise InputError(f"--denoise-steps {denoise_steps} needs --method denoisecertify ({method} denoises nothing)")
    timestep = None
    if method == Method.denoisecertify:
        if denoiser_size is None:
            raise ValueError("denoisecertify needs the denoiser's input size")
        timestep = select_timestep(
            sigma, timestep_rule, image_size=image_size, denoiser_size=denoiser_size, antialias=antialias,
            schedule=schedule,
        )
        if denoise_steps > timestep.t + 1:
            raise InputError(f"--denoise-steps {denoise_steps} is more than the {timestep.t + 1} timesteps from "
                             f"t* = {timestep.t} down to 0 (σ = {sigma:g})")
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
        denoise_steps=denoise_steps,
    )


class LabelPipeline(nn.Module):
    """noisy images (B, 3, H, W) in [0, 1] → labels (B, H, W) uint8, for one ``PipelineSpec``.

    Labels are classes 0..K-1, or K where the sample's model outputs were non-finite (see ``stages``). With
    ``spec.denoise_steps`` > 1 it takes each batch's reverse-process noise (``sampling.ReverseNoise``) as its second
    argument, which ``LocalRuntime`` passes to label functions that say so (``takes_reverse_noise``).
    """

    takes_reverse_noise = True

    def __init__(self, spec: PipelineSpec, segmenter: nn.Module, denoiser: nn.Module | None = None) -> None:
        super().__init__()
        if spec.method == Method.denoisecertify and denoiser is None:
            raise ValueError("denoisecertify needs a denoiser")
        self.spec = spec
        self.segmenter = segmenter
        self.denoiser = denoiser if spec.method == Method.denoisecertify else None

    def clean_images(self, noisy: torch.Tensor, reverse_noise: NoiseFn | None = None) -> torch.Tensor:
        """What the segmenter sees, in [0, 1] at the segmenter's size: denoised (DenoiseCertify) or resized."""
        return self.denoise(noisy, reverse_noise)[0]

    def denoise(
        self, noisy: torch.Tensor, reverse_noise: NoiseFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(clean images, (B,) bool: whether the denoiser's ε was finite at every step), or (noisy, None) without a
        denoiser.

        ε is checked before x̂0's clamp, which would turn an infinite ε into a finite, meaningless image. One step
        (K = 1) is ``one_step_denoise_checked`` itself, so its outputs keep every bit; K > 1 needs ``reverse_noise``.
        """
        spec = self.spec
        if self.denoiser is None:
            return noisy, None
        common = dict(denoiser_size=spec.denoiser_size, antialias=spec.antialias, out_size=spec.segmenter_size,
                      schedule=spec.timestep.noise_schedule)
        if spec.denoise_steps == 1:
            return one_step_denoise_checked(self.denoiser, noisy, spec.timestep.t, **common)
        if reverse_noise is None:
            raise ValueError(f"{spec.denoise_steps}-step denoising needs each sample's reverse noise (ReverseNoise)")
        return multi_step_denoise_checked(self.denoiser, noisy, spec.timestep.t, noise=reverse_noise,
                                          steps=spec.denoise_steps, variance=MULTI_STEP_VARIANCE, **common)

    def forward(self, noisy: torch.Tensor, reverse_noise: NoiseFn | None = None) -> torch.Tensor:
        """Labels, with K (= num_classes) where the sample's scores, or its denoiser output, were non-finite."""
        clean, valid = self.denoise(noisy, reverse_noise)
        logits = self.segmenter(segmenter_input(clean, self.spec.segmenter_size, self.spec.normalization))
        return labels_from_logits(logits, noisy.shape[-2:], valid)
