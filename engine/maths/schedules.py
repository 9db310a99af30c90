"""Denoisers' noise schedules and the choice of t*: which ᾱ_t a timestep stands for, and which timestep matches σ.

Plain float64 numpy: a pipeline spec (and so a client of a Triton server, which only names t*) needs these
without torch. The denoising maths that runs on tensors is ``certseg.engine.maths.denoise``, which re-exports
all of this. One part of t* selection does need torch: how a resize scales the noise
(``denoise.resize_noise_factor``, computed from torch's own interpolation weights); it is measured once per image
size and torch version and kept on disk (``noise_factors``), so torch is imported only for a size not seen before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from certseg.engine.choices import TimestepRule, choice

NUM_TIMESTEPS = 1000
SCHEDULES: tuple[str, ...] = ("linear", "cosine")
COSINE_OFFSET = 0.008
"""s in Nichol & Dhariwal's cosine schedule: keeps β small near t = 0."""
MAX_BETA = 0.999
"""β is clipped here (Nichol & Dhariwal): the cosine's last steps would otherwise have β → 1."""


@dataclass(frozen=True)
class Schedule:
    """A denoiser's noise schedule: which ᾱ_t its timestep t (0-based, what the UNet takes) stands for.

    Every place ᾱ is used (t* selection, x_t's scaling, x̂0, the ancestral chain) takes it from here, so a
    cosine-schedule denoiser is run with its own ᾱ throughout. ``num_timesteps`` T is the length the model
    was trained with (1000 for guided-diffusion's ADM).
    """

    name: str = "linear"
    num_timesteps: int = NUM_TIMESTEPS

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; expected one of {', '.join(SCHEDULES)}")
        if int(self.num_timesteps) < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {self.num_timesteps}")
        object.__setattr__(self, "num_timesteps", int(self.num_timesteps))

    def alpha_bar(self) -> np.ndarray:
        """ᾱ_t for t = 0 … T-1, float64 (read-only: shared)."""
        return _schedule_alpha_bar(self.name, self.num_timesteps)

    def record(self) -> dict[str, object]:
        return {"name": self.name, "num_timesteps": self.num_timesteps}


LINEAR = Schedule()
"""guided-diffusion's linear schedule over 1000 steps: the shipped denoiser's and the official ADM's."""


def linear_alpha_bar() -> np.ndarray:
    """ᾱ_t = cumprod(1 - β) for guided-diffusion's linear schedule, β = linspace(1e-4, 0.02, 1000), float64.

    t is the 0-based index that the UNet also takes as its timestep.
    """
    return _alpha_bar().copy()


def cosine_alpha_bar(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """ᾱ_t of Nichol & Dhariwal's cosine schedule, built as guided-diffusion's ``betas_for_alpha_bar``.

    f(u) = cos²((u + s)/(1 + s)·π/2), s = 0.008; β_t = min(1 - f((t+1)/T)/f(t/T), 0.999); ᾱ_t = cumprod(1 - β).
    Unclipped, the product telescopes to ᾱ_t = f((t+1)/T)/f(0): the continuous ᾱ(u) = f(u)/f(0) at u = (t+1)/T.
    """
    return _schedule_alpha_bar("cosine", num_timesteps).copy()


def _f(u: np.ndarray) -> np.ndarray:
    return np.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


@lru_cache(maxsize=8)
def _schedule_alpha_bar(name: str, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        scale = NUM_TIMESTEPS / num_timesteps  # guided-diffusion's get_named_beta_schedule; 1.0 for T = 1000
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    else:
        steps = np.arange(num_timesteps, dtype=np.float64)
        betas = np.minimum(1.0 - _f((steps + 1) / num_timesteps) / _f(steps / num_timesteps), MAX_BETA)
    alpha_bar = np.cumprod(1.0 - betas)
    alpha_bar.flags.writeable = False
    return alpha_bar


def _alpha_bar() -> np.ndarray:
    return LINEAR.alpha_bar()


def timestep_std(alpha_bar: np.ndarray | float) -> np.ndarray | float:
    """sqrt((1-ᾱ)/ᾱ): the std of the noise, relative to the signal, that the model assumes in x_t/sqrt(ᾱ)."""
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


@dataclass(frozen=True)
class TimestepChoice:
    """The t* a rule picked, and the noise levels behind it (record it with every result)."""

    t: int
    rule: TimestepRule
    effective_sigma_model_space: float
    """Std of the noise that reaches the denoiser, in [-1, 1] model space: 2σ · resize_noise_factor."""
    alpha_bar: float
    sigma: float
    noise_factor: float
    """resize_noise_factor(image_size -> denoiser_size); 1.0 when no image size was given."""
    timestep_std: float
    """sqrt((1-ᾱ_t*)/ᾱ_t*): the noise std the model assumes at t*, to compare with the effective one."""
    schedule: str = "linear"
    """The denoiser's noise schedule, which gave ᾱ_t* here and gives it to every stage that uses t*."""
    num_timesteps: int = NUM_TIMESTEPS

    @property
    def noise_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.num_timesteps)


def select_timestep(
    sigma: float,
    rule: TimestepRule | str = TimestepRule.principled,
    *,
    image_size: int | Sequence[int] | None = None,
    denoiser_size: int | Sequence[int] = 256,
    antialias: bool = False,
    schedule: Schedule = LINEAR,
) -> TimestepChoice:
    """t* for pixel-space noise level σ, where s = 2σ·resize_noise_factor(image_size -> denoiser_size):

    - "principled" (default): t* = argmin_t |sqrt((1-ᾱ_t)/ᾱ_t) - s|, matching the noise std that actually
      reaches the denoiser (in model space the noise is 2σ, then the resize scales it).
    - "authors": t* = argmin_t |ᾱ_t - 1/(1+σ²)| (DenoiseCertify's code: 73, 144, 258 for σ = 0.25, 0.5, 1).
      It ignores both the factor 2 and the resize; on Cityscapes the two cancel (factor 0.5).
    - "dds-2sigma": DDS's published rule, the first t with sqrt((1-ᾱ_t)/ᾱ_t) >= 2σ, whatever the image size
      (DDS resized nothing): exactly its 145, 259, 396 for σ = 0.25, 0.5, 1.
    - "dds-resized": DDS's criterion applied to s, the noise after the resize (73, 145, 259 at 1024×2048).

    ``image_size`` None means the image is already at the denoiser size (no resize, factor 1). ᾱ comes from
    the denoiser's ``schedule`` (the quoted t* are the linear schedule's).
    """
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    rule = choice(TimestepRule, rule, "timestep rule")
    factor = 1.0 if image_size is None else _noise_factor(image_size, denoiser_size, antialias)
    effective = 2.0 * float(sigma) * factor
    alpha_bar = schedule.alpha_bar()
    stds = timestep_std(alpha_bar)
    if rule == TimestepRule.authors:
        t = int(np.argmin(np.abs(alpha_bar - 1.0 / (1.0 + float(sigma) ** 2))))
    elif rule == TimestepRule.principled:
        t = int(np.argmin(np.abs(stds - effective)))
    else:
        # DDS's criterion: the first t whose std reaches the target (2σ as published, or the noise after the resize)
        target = 2.0 * float(sigma) if rule == TimestepRule.dds_2sigma else effective
        reached = np.flatnonzero(stds >= target)
        if reached.size == 0:
            raise ValueError(f"no timestep reaches noise std {target:.4g} (sigma {sigma} is too large)")
        t = int(reached[0])
    return TimestepChoice(
        t=t,
        rule=rule,
        effective_sigma_model_space=effective,
        alpha_bar=float(alpha_bar[t]),
        sigma=float(sigma),
        noise_factor=factor,
        timestep_std=float(stds[t]),
        schedule=schedule.name,
        num_timesteps=schedule.num_timesteps,
    )


def _noise_factor(image_size: int | Sequence[int], denoiser_size: int | Sequence[int], antialias: bool) -> float:
    """``denoise.resize_noise_factor``, which measures torch's resize: read from the cache where it was measured
    before (``noise_factors``), else measured, importing torch."""
    from certseg.engine.maths.noise_factors import noise_factor

    return noise_factor(image_size, denoiser_size, antialias)


def _check_timestep(t: int, schedule: Schedule = LINEAR) -> int:
    if not 0 <= int(t) < schedule.num_timesteps:
        raise ValueError(f"timestep must be in [0, {schedule.num_timesteps}), got {t}")
    return int(t)


def spaced_timesteps(t: int, steps: int | None = None, schedule: Schedule = LINEAR) -> np.ndarray:
    """The timesteps an ancestral run from t down to 0 visits, increasing: every one (None) or ``steps``
    evenly spaced ones that include t and, for steps >= 2, 0."""
    t = _check_timestep(t, schedule)
    if steps is None:
        return np.arange(t + 1)
    if not 1 <= steps <= t + 1:
        raise ValueError(f"steps must be in [1, {t + 1}] for t = {t}, got {steps}")
    if steps == 1:
        return np.array([t])
    return np.round(np.linspace(0, t, steps)).astype(np.int64)
