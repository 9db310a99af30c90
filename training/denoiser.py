"""Training the small ADM-architecture denoiser: ε-prediction on the linear schedule at the squashed size.

The clean image is exactly what the denoiser sees at inference (2x - 1, squashed without antialias), and the
timesteps are weighted toward the t* range DenoiseCertify uses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from certseg.engine.maths.denoise import denoiser_input, linear_alpha_bar, predict_x0, select_timestep
from certseg.engine.maths.stages import resize
from certseg.engine.models.adm import build_adm
from certseg.engine.models.registry import WEIGHTS_DIR
from certseg.training import scenes
from certseg.training.architectures import SCENE_SIZE, SMALL_ADM
from certseg.training.learning_rate import cosine_learning_rate
from certseg.training.progress import progress_bar
from certseg.training.scene_pool import random_batch, scene_pool
from certseg.training.shipped_weights import save_shipped_model

VALIDATION_SIGMAS = (0.25, 0.5, 1.0)
"""Noise levels the validation PSNRs are measured at (each at its principled t*)."""


def denoiser_size() -> tuple[int, int]:
    return (int(SMALL_ADM["image_size"]),) * 2


def _sample_timesteps(generator: torch.Generator, size: int, focus: tuple[int, int]) -> torch.Tensor:
    """Timesteps weighted toward the t* range used in certification (3/4), the rest uniform over [0, 1000)."""
    focused = torch.randint(focus[0], focus[1] + 1, (size,), generator=generator)
    anywhere = torch.randint(0, 1000, (size,), generator=generator)
    return torch.where(torch.rand(size, generator=generator) < 0.75, focused, anywhere)


@torch.no_grad()
def denoiser_psnr(model: torch.nn.Module, images: torch.Tensor, sigma: float, t: int, seed: int) -> dict[str, float]:
    """PSNR (in [0,1] space, at the denoiser's size) of the noisy input and of the one-step estimate."""
    generator = torch.Generator().manual_seed(seed)
    size = denoiser_size()
    clean = resize(images.float() / 255, size)
    noisy_full = images.float() / 255 + sigma * torch.randn(images.shape, generator=generator)
    x_t = denoiser_input(noisy_full, t, denoiser_size=size)
    alpha_bar = float(linear_alpha_bar()[t])
    eps = model(x_t, torch.full((len(x_t),), t, dtype=torch.int64))
    estimate = (predict_x0(x_t, eps[:, :3], alpha_bar) + 1) / 2
    noisy_small = resize(noisy_full, size)

    def psnr(x: torch.Tensor) -> float:
        return float(10 * torch.log10(1.0 / ((x - clean) ** 2).mean()))

    return {"t": t, "psnr_noisy": psnr(noisy_small), "psnr_denoised": psnr(estimate),
            "psnr_gain_db": psnr(estimate) - psnr(noisy_small)}


def train_denoiser(
    name: str, *, command: str, iterations: int = 1200, batch: int = 24, lr: float = 2e-3, pool_size: int = 3000,
    validation_images: int = 40, seed: int = 0, threads: int = 2, t_min: int = 10, t_max: int = 300,
    default_for: list[str] | None = None, weights_dir: Path = WEIGHTS_DIR,
) -> dict[str, Any]:
    """Train, validate the one-step PSNR gain on held-out scenes, save as ``name`` in ``weights_dir`` with
    ``command`` recorded; returns the validation scores."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    size = denoiser_size()
    first_seed = seed * 100_000 + 50_000  # beside the segmenters' seeds of the same training seed
    pool = scene_pool(scenes.TRAIN_SEEDS[first_seed: first_seed + pool_size], SCENE_SIZE)
    held_out = scene_pool([scenes.held_out_seed(j) for j in range(validation_images)], SCENE_SIZE)
    model = build_adm(SMALL_ADM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    alpha_bar = torch.from_numpy(linear_alpha_bar()).float()
    model.train()
    with progress_bar() as bar:
        task = bar.add_task(f"training {name}", total=iterations, status="")
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_learning_rate(step, iterations, lr)
            images, _ = random_batch(pool, generator, batch)
            x0 = resize(2 * images - 1, size)
            t = _sample_timesteps(generator, batch, (t_min, t_max))
            eps = torch.randn(x0.shape, generator=generator)
            alpha_bar_t = alpha_bar[t].view(-1, 1, 1, 1)
            x_t = alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps
            loss = F.mse_loss(model(x_t, t)[:, :3], eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.4f}")
    model.eval()
    validation: dict[str, Any] = {"held_out_images": validation_images}
    for sigma in VALIDATION_SIGMAS:
        t_star = select_timestep(sigma, "principled", image_size=SCENE_SIZE, denoiser_size=size).t
        validation[f"sigma_{sigma}"] = denoiser_psnr(model, held_out[0], sigma, t_star, seed=2)
    training = {
        "command": command, "seed": seed, "iterations": iterations, "batch": batch, "lr": lr,
        "t_focus": [t_min, t_max], "scene_size": list(SCENE_SIZE), "pool_size": pool_size,
        "generator_version": scenes.GENERATOR_VERSION, "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    save_shipped_model(name, "denoiser", "adm", model, {"create_model_kwargs": SMALL_ADM}, training, validation,
                       default_for or [], weights_dir=weights_dir)
    return validation
