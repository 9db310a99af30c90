"""Train the small default models on procedural scenes: reproducible, seeded, CPU-friendly.

    python -m certseg.bench.train segmenter --name procedural-hrnet-clean
    python -m certseg.bench.train segmenter --name procedural-hrnet-noise025 --train-sigma 0.25
    python -m certseg.bench.train denoiser --name procedural-adm

Each writes ``engine/weights/<name>.safetensors`` (self-describing: the builder config travels in the file's
metadata, so it loads through exactly the code path of any checkpoint) and its entry in ``manifest.json``
(config, command, seed, generator version, validation scores). Training scenes come only from the
generator's training seed range; validation only from held-out seeds.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certseg.bench.datasets import procedural
from certseg.engine.denoise import denoiser_input, linear_alpha_bar, predict_x0
from certseg.engine.digest import file_sha256
from certseg.engine.models.adm import build_adm
from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import MANIFEST, WEIGHTS_DIR, save_model
from certseg.engine.stages import normalize_imagenet, resize

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

SCENE_SIZE = (128, 256)
"""Resolution of the default procedural scenes (H, W): 2:1 like Cityscapes, small enough for CPU certification."""

SMALL_HRNET: dict[str, Any] = {
    "NAME": "seg_hrnet",
    "ALIGN_CORNERS": False,
    "EXTRA": {
        "FINAL_CONV_KERNEL": 1,
        "STAGE1": {"NUM_MODULES": 1, "NUM_RANCHES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1],
                   "NUM_CHANNELS": [32], "FUSE_METHOD": "SUM"},
        "STAGE2": {"NUM_MODULES": 1, "NUM_BRANCHES": 2, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2],
                   "NUM_CHANNELS": [16, 32], "FUSE_METHOD": "SUM"},
        "STAGE3": {"NUM_MODULES": 1, "NUM_BRANCHES": 3, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2, 2],
                   "NUM_CHANNELS": [16, 32, 64], "FUSE_METHOD": "SUM"},
        "STAGE4": {"NUM_MODULES": 1, "NUM_BRANCHES": 4, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2, 2, 2],
                   "NUM_CHANNELS": [16, 32, 64, 128], "FUSE_METHOD": "SUM"},
    },
}
"""HRNetV2 structure (4 branches, fusion, 1/4-resolution head) at a width that trains on 2 CPU cores."""

SMALL_ADM: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2,2,2",
    "attention_resolutions": "16",
    "num_head_channels": 32,
    "learn_sigma": False,
    "class_cond": False,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "dropout": 0.0,
    "use_fp16": False,
    "use_new_attention_order": False,
}
"""The guided-diffusion UNet at 64x64: ε-prediction only (the certifier uses ε; no learned variance)."""


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"))


def scene_pool(seeds: range | list[int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) uint8 and labels (N, H, W) uint8 rendered once; training draws batches from it."""
    images = np.empty((len(seeds), 3, *size), dtype=np.uint8)
    labels = np.empty((len(seeds), *size), dtype=np.uint8)
    with _progress() as bar:
        task = bar.add_task("rendering scenes", total=len(seeds), status="")
        for i, seed in enumerate(seeds):
            scene = procedural.generate_scene(int(seed), *size)
            images[i] = np.round(scene.image * 255)
            labels[i] = scene.labels
            bar.advance(task)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _batch(pool: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, size: int):
    """A random batch with horizontal flips: images float [0, 1], labels int64."""
    index = torch.randint(len(pool[0]), (size,), generator=generator)
    images = pool[0][index].float() / 255
    labels = pool[1][index].long()
    flip = torch.rand(size, generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    labels[flip] = labels[flip].flip(-1)
    return images, labels


def _cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _write_manifest_entry(name: str, entry: dict[str, Any]) -> None:
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"models": {}}
    manifest["models"][name] = entry
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _command_line() -> str:
    return "python -m certseg.bench.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@torch.no_grad()
def segmenter_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma: float,
                       seed: int) -> dict[str, float]:
    """Pixel accuracy and mIoU on held-out scenes, optionally under Gaussian noise σ (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = procedural.NUM_CLASSES
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(images), 16):
        x = images[start:start + 16].float() / 255
        y = labels[start:start + 16].long()
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
        logits = model(normalize_imagenet(x))
        pred = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        confusion += torch.bincount(y.ravel() * num_classes + pred.ravel(), minlength=num_classes**2).view(
            num_classes, num_classes)
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum() / confusion.sum()), "mean_iou": float(iou.mean())}


@app.command()
def segmenter(
    name: Annotated[str, typer.Option(help="model name (file engine/weights/<name>.safetensors)")],
    train_sigma: Annotated[float, typer.Option(help="Gaussian noise σ added to training inputs (0 = clean)")] = 0.0,
    iterations: int = 1500,
    batch: int = 16,
    lr: float = 3e-3,
    pool_size: int = 3000,
    validation_images: int = 40,
    seed: int = 0,
    threads: int = 2,
    default_for: Annotated[list[str] | None, typer.Option(help="methods that use it by default")] = None,
) -> None:
    """Train the small HRNetV2 on procedural scenes (clean, or with Gaussian noise augmentation)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    pool = scene_pool(procedural.TRAIN_SEEDS[seed * 100_000: seed * 100_000 + pool_size], SCENE_SIZE)
    held_out = scene_pool([procedural.held_out_seed(j) for j in range(validation_images)], SCENE_SIZE)
    model = build_hrnet(SMALL_HRNET, procedural.NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with _progress() as bar:
        task = bar.add_task(f"training {name}", total=iterations, status="")
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, iterations, lr)
            images, labels = _batch(pool, generator, batch)
            if train_sigma > 0:
                images = images + train_sigma * torch.randn(images.shape, generator=generator)
            logits = model(normalize_imagenet(images))
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
    model.eval()
    validation = {"clean": segmenter_accuracy(model, *held_out, sigma=0.0, seed=1)}
    for sigma in (0.25, 0.5):
        validation[f"sigma_{sigma}"] = segmenter_accuracy(model, *held_out, sigma=sigma, seed=1)
    config = {"model_cfg": SMALL_HRNET, "num_classes": procedural.NUM_CLASSES}
    training = {
        "command": _command_line(), "seed": seed, "iterations": iterations, "batch": batch, "lr": lr,
        "train_sigma": train_sigma, "scene_size": list(SCENE_SIZE), "pool_size": pool_size,
        "generator_version": procedural.GENERATOR_VERSION, "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    _save(name, "segmenter", "hrnet", model, config, training, {"held_out_images": validation_images} | validation,
          default_for or [], classes=list(procedural.CLASSES), palette=procedural.PALETTE.tolist())
    typer.echo(json.dumps(validation, indent=2))


def _timestep_sampler(generator: torch.Generator, size: int, focus: tuple[int, int]) -> torch.Tensor:
    """Timesteps weighted toward the t* range used in certification (3/4), the rest uniform over [0, 1000)."""
    focused = torch.randint(focus[0], focus[1] + 1, (size,), generator=generator)
    anywhere = torch.randint(0, 1000, (size,), generator=generator)
    return torch.where(torch.rand(size, generator=generator) < 0.75, focused, anywhere)


@torch.no_grad()
def denoiser_psnr(model: torch.nn.Module, images: torch.Tensor, sigma: float, t: int, seed: int) -> dict[str, float]:
    """PSNR (in [0,1] space, at the denoiser's size) of the noisy input and of the one-step estimate."""
    generator = torch.Generator().manual_seed(seed)
    size = (int(SMALL_ADM["image_size"]),) * 2
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


@app.command()
def denoiser(
    name: Annotated[str, typer.Option(help="model name (file engine/weights/<name>.safetensors)")],
    iterations: int = 1200,
    batch: int = 24,
    lr: float = 2e-3,
    pool_size: int = 3000,
    validation_images: int = 40,
    seed: int = 0,
    threads: int = 2,
    t_min: int = 10,
    t_max: int = 300,
    default_for: Annotated[list[str] | None, typer.Option(help="methods that use it by default")] = None,
) -> None:
    """Train the small ADM-architecture denoiser: ε-prediction on the linear schedule at the squashed size."""
    from certseg.engine.denoise import select_timestep

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    size = (int(SMALL_ADM["image_size"]),) * 2
    pool = scene_pool(procedural.TRAIN_SEEDS[seed * 100_000 + 50_000: seed * 100_000 + 50_000 + pool_size],
                      SCENE_SIZE)
    held_out = scene_pool([procedural.held_out_seed(j) for j in range(validation_images)], SCENE_SIZE)
    model = build_adm(SMALL_ADM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    alpha_bar = torch.from_numpy(linear_alpha_bar()).float()
    model.train()
    with _progress() as bar:
        task = bar.add_task(f"training {name}", total=iterations, status="")
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, iterations, lr)
            images, _ = _batch(pool, generator, batch)
            # The clean image exactly as the denoiser sees it at inference: 2x - 1, squashed without antialias.
            x0 = resize(2 * images - 1, size)
            t = _timestep_sampler(generator, batch, (t_min, t_max))
            eps = torch.randn(x0.shape, generator=generator)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            loss = F.mse_loss(model(x_t, t)[:, :3], eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.4f}")
    model.eval()
    validation: dict[str, Any] = {"held_out_images": validation_images}
    for sigma in (0.25, 0.5, 1.0):
        t_star = select_timestep(sigma, "principled", image_size=SCENE_SIZE, denoiser_size=size).t
        validation[f"sigma_{sigma}"] = denoiser_psnr(model, held_out[0], sigma, t_star, seed=2)
    training = {
        "command": _command_line(), "seed": seed, "iterations": iterations, "batch": batch, "lr": lr,
        "t_focus": [t_min, t_max], "scene_size": list(SCENE_SIZE), "pool_size": pool_size,
        "generator_version": procedural.GENERATOR_VERSION, "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    _save(name, "denoiser", "adm", model, {"create_model_kwargs": SMALL_ADM}, training, validation,
          default_for or [])
    typer.echo(json.dumps(validation, indent=2))


def _save(name: str, role: str, family: str, model: torch.nn.Module, config: dict, training: dict,
          validation: dict, defaults: list[str], **extra: Any) -> None:
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    path = WEIGHTS_DIR / f"{name}.safetensors"
    description = {"name": name, "role": role, "family": family, "config": config, **extra}
    save_model(path, model, description)
    _write_manifest_entry(name, {
        "file": path.name, "role": role, "family": family, "defaults": defaults, "config": config,
        "training": training, "validation": validation, "sha256": file_sha256(path),
        "parameters": sum(p.numel() for p in model.parameters()), **extra,
    })


if __name__ == "__main__":
    app()
