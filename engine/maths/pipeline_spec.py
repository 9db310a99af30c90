"""The complete, recordable description of what a noisy sample goes through (``PipelineSpec``), and how it is made.

Method, σ, t* with its rule and the denoiser's noise schedule, sizes, resize mode, the segmenter's input
normalisation: plain values, no torch, so that a client of a Triton server (which only sends them) makes and
records the same spec as an in-process run. The torch module that runs a spec is
``certseg.engine.maths.label_pipeline.LabelPipeline`` (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from certseg.engine.choices import Method, TimestepRule, choice
from certseg.engine.errors import InputError
from certseg.engine.maths.normalization import IMAGENET, Normalization
from certseg.engine.maths.schedules import LINEAR, Schedule, TimestepChoice, select_timestep, spaced_timesteps
from certseg.engine.maths.sizes import scaled_size

if TYPE_CHECKING:
    from certseg.engine.maths.denoise import VarianceMode

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
