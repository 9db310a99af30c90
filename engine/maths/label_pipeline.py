"""What one noisy sample goes through: (scale → denoise →) resize → segment → argmax, as a torch module.

``PipelineSpec`` is the complete, recordable description of that path (method, σ, t* with its rule and the
denoiser's noise schedule, sizes, resize mode, the segmenter's input normalisation); ``LabelPipeline``
composes the stage functions of ``certseg.engine.maths.stages`` and ``certseg.engine.maths.denoise`` around the two
models, so the torch runtime, ONNX export and the Triton step models all run the same maths. ``PipelineSpec`` and
``make_spec`` live in the torch-free ``certseg.engine.maths.pipeline_spec`` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from certseg.engine.choices import Method
from certseg.engine.maths.denoise import NoiseFn, multi_step_denoise_checked, one_step_denoise_checked
from certseg.engine.maths.normalization import IMAGENET, Normalization
from certseg.engine.maths.pipeline_spec import MULTI_STEP_VARIANCE, PipelineSpec, make_spec
from certseg.engine.maths.schedules import LINEAR, Schedule, TimestepChoice, select_timestep, spaced_timesteps
from certseg.engine.maths.sizes import scaled_size
from certseg.engine.maths.stages import labels_from_logits, segmenter_input

__all__ = [
    "IMAGENET", "LINEAR", "MULTI_STEP_VARIANCE", "LabelPhases", "LabelPipeline", "Normalization", "PipelineSpec",
    "Schedule", "TimestepChoice", "make_spec", "scaled_size", "select_timestep", "spaced_timesteps",
]
"""``LabelPipeline``, and the spec values this module offered before they moved to torch-free modules."""


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
        self.argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
        """``labels_from_logits``' ``argmax``: None (its own eager path), or a compiled ``argmax_or_invalid``."""

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
        logits, valid = self.scores(self.prepare(noisy), reverse_noise)
        return self.labels(logits, valid, noisy.shape[-2:])

    # The three phases of ``forward``, for runtimes that run the stage maths around the models in another thread
    # (``sampling.LocalRuntime`` on CPU): what comes before the first model, the models (with the maths between
    # them), and the label step.
    def prepare(self, noisy: torch.Tensor) -> torch.Tensor:
        """The first model's input where no model comes before it: the segmenter's (resized, normalised) for
        SegCertify; the noisy images themselves for DenoiseCertify, whose denoiser input ``scores`` forms."""
        if self.denoiser is None:
            return segmenter_input(noisy, self.spec.segmenter_size, self.spec.normalization)
        return noisy

    def scores(
        self, prepared: torch.Tensor, reverse_noise: NoiseFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the segmenter's scores, (B,) bool: whether each sample's denoiser output was finite, or None) of what
        ``prepare`` gave."""
        if self.denoiser is None:
            return self.segmenter(prepared), None
        clean, valid = self.denoise(prepared, reverse_noise)
        return self.segmenter(segmenter_input(clean, self.spec.segmenter_size, self.spec.normalization)), valid

    def labels(self, logits: torch.Tensor, valid: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        """The label step: full-size labels (B, H, W), K where non-finite (``stages.labels_from_logits``)."""
        return labels_from_logits(logits, size, valid, argmax=self.argmax)

    @property
    def phases(self) -> LabelPhases:
        """``prepare``, ``scores`` and ``labels`` as ``sampling.LocalRuntime`` runs them."""
        return LabelPhases(self.prepare, self.scores, self.labels)


class LabelPhases(NamedTuple):
    """A label function cut where the stage maths around its models can run in another thread: ``labels(*scores(
    prepare(noisy), [reverse_noise]), size)`` is the label function's output, bit for bit."""

    prepare: Callable[[torch.Tensor], torch.Tensor]
    scores: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    labels: Callable[[torch.Tensor, torch.Tensor | None, Sequence[int]], torch.Tensor]
