"""DenoiseCertify's denoising step (the paper's Algorithm 2) as small pure torch functions.

A noisy image in [0, 1] pixel space is mapped to the diffusion model's [-1, 1] space, squashed to the
denoiser's size, scaled to x_t = sqrt(ᾱ_t*)·x and denoised in one step (x̂0 from the predicted ε), or by DDPM
ancestral sampling from t* down to 0 (the paper's Table 3 ablation). Every resize is ``stages.resize``
(bilinear, align_corners=False), and coefficients are float64 numbers rounded to float32, as in guided-diffusion.

Which t* to use depends on how much noise reaches the denoiser, and the resize changes that. So t* selection
is explicit: ``select_timestep`` returns a ``TimestepChoice`` that records the rule, t* and the noise level it
matched, for results to store. It also records the denoiser's noise ``Schedule`` (guided-diffusion's linear one,
or Nichol & Dhariwal's cosine one), which every stage then takes ᾱ from. Schedules and t* selection are plain
numpy and live in ``certseg.engine.maths.schedules`` (torch-free, for clients of a server); they are re-exported
here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from certseg.engine.maths.schedules import (
    COSINE_OFFSET,
    LINEAR,
    MAX_BETA,
    NUM_TIMESTEPS,
    SCHEDULES,
    Schedule,
    TimestepChoice,
    _check_timestep,
    cosine_alpha_bar,
    linear_alpha_bar,
    select_timestep,
    spaced_timesteps,
    timestep_std,
)
from certseg.engine.maths.stages import as_pair, finite_samples, resize

__all__ = [
    "COSINE_OFFSET", "LINEAR", "MAX_BETA", "NUM_TIMESTEPS", "SCHEDULES", "DenoiseChain", "NoiseFn", "Schedule",
    "TimestepChoice", "VarianceMode", "cosine_alpha_bar", "denoise_chain", "denoiser_input", "denoiser_output",
    "from_model_space", "linear_alpha_bar", "multi_step_denoise", "multi_step_denoise_checked", "one_step_denoise",
    "one_step_denoise_checked", "predict_x0", "resize_noise_factor", "reverse_step", "run_chain",
    "scale_for_timestep", "select_timestep", "spaced_timesteps", "timestep_std", "to_model_space",
]

VarianceMode = Literal["learned_range", "fixed_small"]
NoiseFn = Callable[[int, torch.Size], torch.Tensor]
"""``noise_fn(timestep, shape)`` -> standard-normal noise of ``shape`` for the ancestral step at ``timestep``."""


_COMB_ELEMENTS = 1 << 22
"""float64 values per resize call in ``_axis_row_sq_norms`` (32 MiB), whatever the image size."""


def _axis_row_sq_norms(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """Squared row norms of the 1-D operator that ``stages.resize`` applies along one axis (n_out,).

    Resizing the one-hot basis e_i gives column i of the operator A, but n_in such bases hold n_in² values
    (2.3 GB for a 12000-pixel side). A row of A is nonzero only on a window of input pixels narrower than
    ``spacing`` (bilinear: 2; antialiased downscaling by r: at most 2r + 1), so a "comb" of bases spaced
    ``spacing`` apart meets each row at most once: every output value of a resized comb is a single entry
    A[b, i], and the squares summed over all ``spacing`` combs are the squared row norms. The combs are
    resized in groups of at most ``_COMB_ELEMENTS`` values, so memory is linear in the side, and the
    entries are torch's own weights. Resized along H with W kept at 2 -> 2 (an identity axis). Not W = 1:
    torch 2.13's CPU antialiased bilinear gives wrong weights for width-1 images (every output row equals
    the first).
    """
    spacing = min(n_in, 2 * math.ceil(n_in / n_out) + 3)
    per_call = max(1, _COMB_ELEMENTS // (2 * n_in))
    positions = torch.arange(n_in) % spacing
    total = torch.zeros(n_out, dtype=torch.float64)
    for first in range(0, spacing, per_call):
        offsets = torch.arange(first, min(first + per_call, spacing))
        combs = (positions[None, :] == offsets[:, None]).to(torch.float64)  # (combs, n_in)
        combs = combs[:, None, :, None].expand(-1, 1, n_in, 2).contiguous()
        values = resize(combs, (n_out, 2), antialias=antialias)[:, 0, :, 0]  # (combs, n_out)
        total += (values**2).sum(dim=0)
    return total.numpy()


@lru_cache(maxsize=64)
def _resize_noise_factor(in_size: tuple[int, int], out_size: tuple[int, int], antialias: bool) -> float:
    rows = _axis_row_sq_norms(in_size[0], out_size[0], antialias)
    cols = _axis_row_sq_norms(in_size[1], out_size[1], antialias)
    return float(np.sqrt(rows.mean() * cols.mean()))


def resize_noise_factor(
    in_size: int | Sequence[int], out_size: int | Sequence[int], *, antialias: bool = False
) -> float:
    """How ``stages.resize`` scales the std of i.i.d. pixel noise, computed exactly from the operator.

    A linear resize y = A x maps i.i.d. N(0, s²) noise to per-pixel std s·||A_row||. Bilinear resizing is
    separable, A = A_h ⊗ A_w, so ||A_(i,j)||² = ||A_h[i]||²·||A_w[j]||². With non-integer ratios the per-pixel
    variance varies over the output, so the factor is the RMS over output pixels, sqrt(mean ||A_row||²): the
    std of all output noise values pooled (what a Monte Carlo measurement of "the noise std" reports).
    1024x2048 -> 256x256 non-antialiased gives exactly 0.5 (each axis averages two pixels).
    """
    return _resize_noise_factor(as_pair(in_size), as_pair(out_size), bool(antialias))


def _f32(value: float) -> float:
    """A float64 coefficient rounded to float32 (guided-diffusion casts its numpy coefficients so).

    Returned as a Python float: multiplying keeps the tensor's dtype, and float32 results are bit-identical.
    """
    return float(np.float32(value))


def to_model_space(noisy01: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the diffusion model's [-1, 1] space: 2x - 1 (noise std becomes 2σ)."""
    return 2 * noisy01 - 1


def from_model_space(x0: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: (x + 1) / 2."""
    return (x0 + 1) / 2


def scale_for_timestep(x_model: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x: noisy x = x0 + s·ε becomes the diffusion marginal when s matches t's std."""
    return x_model * _f32(np.sqrt(alpha_bar_t))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """x̂0 = clamp(sqrt(1/ᾱ)·x_t - sqrt(1/ᾱ - 1)·ε, -1, 1) (guided-diffusion's clipped pred_xstart)."""
    recip = _f32(np.sqrt(1.0 / alpha_bar_t))
    recip_m1 = _f32(np.sqrt(1.0 / alpha_bar_t - 1.0))
    return torch.clamp(recip * x_t - recip_m1 * eps, -1, 1)


def _timesteps_like(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) int64 filled with t; sized from x's batch so exported graphs keep a dynamic batch."""
    return torch.full_like(x[:, 0, 0, 0], t, dtype=torch.int64)


def denoiser_input(
    noisy01: torch.Tensor,
    t: int,
    *,
    denoiser_size: int | Sequence[int] = (256, 256),
    antialias: bool = False,
    schedule: Schedule = LINEAR,
) -> torch.Tensor:
    """The "scale" stage: x_t = sqrt(ᾱ_t)·resize(2x - 1) at the denoiser's size, ᾱ from its ``schedule``."""
    alpha_bar_t = float(schedule.alpha_bar()[_check_timestep(t, schedule)])
    return scale_for_timestep(resize(to_model_space(noisy01), as_pair(denoiser_size), antialias=antialias), alpha_bar_t)


def denoiser_output(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    *,
    out_size: Sequence[int],
    antialias: bool = False,
    schedule: Schedule = LINEAR,
) -> torch.Tensor:
    """x̂0 from ε (first 3 channels used), back to [0, 1] and resized to ``out_size``; ᾱ from ``schedule``."""
    alpha_bar_t = float(schedule.alpha_bar()[_check_timestep(t, schedule)])
    x0 = predict_x0(x_t, eps[:, :3].to(x_t.dtype), alpha_bar_t)
    return resize(from_model_space(x0), as_pair(out_size), antialias=antialias)


def one_step_denoise(
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noisy01: torch.Tensor,
    t: int,
    *,
    denoiser_size: int | Sequence[int] = (256, 256),
    antialias: bool = False,
    out_size: Sequence[int] | None = None,
    schedule: Schedule = LINEAR,
) -> torch.Tensor:
    """Denoise (B, 3, H, W) noisy images in [0, 1] with one UNet call at timestep t; returns [0, 1] images.

    x_t = sqrt(ᾱ_t)·resize(2x - 1); ε = unet(x_t, t)[:, :3]; x̂0 clipped; (x̂0 + 1)/2 resized to ``out_size``
    (default: the input size). ``antialias`` applies to both resizes; the authors used none.
    """
    return one_step_denoise_checked(unet, noisy01, t, denoiser_size=denoiser_size, antialias=antialias,
                                    out_size=out_size, schedule=schedule)[0]


def one_step_denoise_checked(
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noisy01: torch.Tensor,
    t: int,
    *,
    denoiser_size: int | Sequence[int] = (256, 256),
    antialias: bool = False,
    out_size: Sequence[int] | None = None,
    schedule: Schedule = LINEAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``one_step_denoise`` plus (B,) bool: whether each sample's ε was finite, checked before x̂0's clamp (which
    would turn an infinite ε into a finite, meaningless image). The label pipeline runs this."""
    x_t = denoiser_input(noisy01, t, denoiser_size=denoiser_size, antialias=antialias, schedule=schedule)
    eps = unet(x_t, _timesteps_like(x_t, t))
    clean = denoiser_output(x_t, eps, t, out_size=out_size or noisy01.shape[-2:], antialias=antialias,
                            schedule=schedule)
    return clean, finite_samples(eps[:, :3])


@dataclass(frozen=True)
class _Chain:
    """A (possibly respaced) reverse chain over increasing ``timesteps`` τ, built as guided-diffusion's
    SpacedDiffusion does: β_k = 1 - ᾱ[τ_k]/ᾱ[τ_(k-1)] (ᾱ before τ_0 is 1), then q(x_(k-1) | x_k, x0)."""

    timesteps: np.ndarray
    alpha_bar: np.ndarray
    log_beta: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    mean_coef_x0: np.ndarray
    mean_coef_xt: np.ndarray


def _chain(timesteps: np.ndarray, schedule: Schedule = LINEAR) -> _Chain:
    used = schedule.alpha_bar()[timesteps]
    betas = 1.0 - used / np.append(1.0, used[:-1])
    alphas = 1.0 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    # Step 0 has zero posterior variance, so its log is replaced by step 1's (step 0 adds no noise anyway;
    # a one-step chain has no variance to use at all).
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(timesteps) > 1 else np.ones(1)
    return _Chain(
        timesteps=timesteps,
        alpha_bar=alpha_bar,
        log_beta=np.log(betas),
        posterior_log_variance_clipped=np.log(clipped),
        mean_coef_x0=betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
        mean_coef_xt=(1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar),
    )


def multi_step_denoise(
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noisy01: torch.Tensor,
    t: int,
    *,
    noise: NoiseFn,
    steps: int | None = None,
    variance: VarianceMode = "learned_range",
    denoiser_size: int | Sequence[int] = (256, 256),
    antialias: bool = False,
    out_size: Sequence[int] | None = None,
    schedule: Schedule = LINEAR,
) -> torch.Tensor:
    """DDPM ancestral sampling from x_t (built as in ``one_step_denoise``) down to t = 0, clipping x̂0 each step.

    Each step: ε and x̂0 as in one step, mean = c1·x̂0 + c2·x_t of the posterior, then x = mean + exp(½ log v)·z
    (no noise at the last step). ``variance``: "learned_range" (guided-diffusion's learn_sigma models such as
    256x256_diffusion_uncond: log v interpolates between the clipped posterior log-variance and log β with
    frac = (v + 1)/2, v = UNet channels 3-5) or "fixed_small" (the posterior variance). ``steps`` None runs all
    t+1 timesteps (the paper); an int respaces the chain as guided-diffusion's SpacedDiffusion does (steps=1
    equals one_step_denoise). The extra noise z comes only from ``noise(τ, (B, 3, h, w))``, called once per step
    that adds noise: the engine passes ``sampling.ReverseNoise`` (each sample's own stream), never the global RNG.
    """
    return multi_step_denoise_checked(unet, noisy01, t, noise=noise, steps=steps, variance=variance,
                                      denoiser_size=denoiser_size, antialias=antialias, out_size=out_size,
                                      schedule=schedule)[0]


def multi_step_denoise_checked(
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noisy01: torch.Tensor,
    t: int,
    *,
    noise: NoiseFn,
    steps: int | None = None,
    variance: VarianceMode = "learned_range",
    denoiser_size: int | Sequence[int] = (256, 256),
    antialias: bool = False,
    out_size: Sequence[int] | None = None,
    schedule: Schedule = LINEAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``multi_step_denoise`` plus (B,) bool: whether each sample's UNet output (ε, and the variance channels it
    uses) was finite at every step. Fail-closed like ``one_step_denoise_checked``: one non-finite step is enough
    to mark the sample, since the clamp of x̂0 could turn it into a finite, meaningless image."""
    chain = denoise_chain(t, steps, variance=variance, schedule=schedule)
    x = denoiser_input(noisy01, chain.start, denoiser_size=denoiser_size, antialias=antialias, schedule=schedule)
    x, out, valid = run_chain(chain, x, unet(x, _timesteps_like(x, chain.start)), unet, noise)
    clean = denoiser_output(x, out, chain.last, out_size=out_size or noisy01.shape[-2:], antialias=antialias,
                            schedule=schedule)
    return clean, valid


@dataclass(frozen=True)
class DenoiseChain:
    """The steps a K-step denoising run takes, with its variance mode: what ``reverse_step`` needs at each step."""

    chain: _Chain
    variance: VarianceMode

    @property
    def timesteps(self) -> np.ndarray:
        return self.chain.timesteps

    @property
    def start(self) -> int:
        """t*: the first (largest) timestep, where x_t is built from the noisy image."""
        return int(self.chain.timesteps[-1])

    @property
    def last(self) -> int:
        """τ_0: the timestep of the last UNet call, whose x̂0 is the clean image (0 for K >= 2, t* for K = 1)."""
        return int(self.chain.timesteps[0])

    @property
    def channels_used(self) -> int:
        """UNet output channels the chain reads: ε (3), and the learned variance (3 more) where it has steps left."""
        return 6 if self.variance == "learned_range" and len(self.chain.timesteps) > 1 else 3


def denoise_chain(
    t: int, steps: int | None, *, variance: VarianceMode = "learned_range", schedule: Schedule = LINEAR
) -> DenoiseChain:
    """The respaced chain from ``t`` down to 0 in ``steps`` steps (None: every timestep), checked."""
    if variance not in ("learned_range", "fixed_small"):
        raise ValueError(f"variance must be 'learned_range' or 'fixed_small', got {variance!r}")
    return DenoiseChain(_chain(spaced_timesteps(t, steps, schedule), schedule), variance)


def run_chain(
    chain: DenoiseChain,
    x: torch.Tensor,
    out: torch.Tensor,
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: NoiseFn,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From x_t* and the UNet's output there, the ancestral steps down to the chain's last timestep τ_0: returns x
    and the UNet's output at τ_0 (``denoiser_output`` of them is the clean image, exactly as after one step) and
    (B,) bool, whether every output the chain read was finite.

    Every runtime runs this loop: in process with the denoiser module, served with ``unet`` asking the served
    denoiser. One step (K = 1) returns x and ``out`` unchanged.
    """
    valid = finite_samples(out[:, :chain.channels_used])
    for k in range(len(chain.timesteps) - 1, 0, -1):
        x = reverse_step(chain, k, x, out, noise)
        out = unet(x, _timesteps_like(x, int(chain.timesteps[k - 1])))
        valid &= finite_samples(out[:, :chain.channels_used])
    return x, out, valid


def reverse_step(chain: DenoiseChain, k: int, x: torch.Tensor, out: torch.Tensor, noise: NoiseFn) -> torch.Tensor:
    """One ancestral step, k >= 1: x at timestep τ_k and the UNet's output there -> x at τ_(k-1), the posterior mean
    c1·x̂0 + c2·x plus exp(½ log v)·z with z = ``noise(τ_k, x.shape)``. (The last step, to x̂0 at τ_0, adds no
    noise: it is ``denoiser_output``.)"""
    if not 1 <= k < len(chain.timesteps):
        raise ValueError(f"reverse steps run at k in [1, {len(chain.timesteps) - 1}], got {k}")
    if chain.variance == "learned_range" and out.shape[1] < 6:
        raise ValueError("variance 'learned_range' needs a learn_sigma UNet (6 output channels)")
    c = chain.chain
    x0 = predict_x0(x, out[:, :3].to(x.dtype), float(c.alpha_bar[k]))
    mean = _f32(c.mean_coef_x0[k]) * x0 + _f32(c.mean_coef_xt[k]) * x
    std = torch.exp(0.5 * _log_variance(c, k, out, chain.variance).to(x.dtype))
    return mean + std * noise(int(c.timesteps[k]), x.shape).to(device=x.device, dtype=x.dtype)


def _log_variance(chain: _Chain, k: int, out: torch.Tensor, variance: VarianceMode) -> torch.Tensor:
    """log of the step-k ancestral variance: learned range (from out[:, 3:6]) or the fixed posterior one."""
    min_log = _f32(chain.posterior_log_variance_clipped[k])
    if variance == "fixed_small":
        return torch.full_like(out[:, :3], min_log)
    frac = (out[:, 3:6] + 1) / 2
    return frac * _f32(chain.log_beta[k]) + (1 - frac) * min_log
