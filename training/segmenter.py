"""Training the small HRNetV2 segmenter on procedural scenes, clean or with Gaussian noise augmentation.

Training scenes come only from the generator's training seed range, validation only from held-out seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from certseg.engine.maths.stages import normalize_imagenet
from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import WEIGHTS_DIR
from certseg.training import scenes
from certseg.training.architectures import SCENE_SIZE, SMALL_HRNET
from certseg.training.learning_rate import cosine_learning_rate
from certseg.training.progress import progress_bar
from certseg.training.scene_pool import random_batch, scene_pool
from certseg.training.shipped_weights import save_shipped_model

VALIDATION_SIGMAS = (0.25, 0.5)
"""Noise levels the validation scores are measured at, besides clean images."""


@torch.no_grad()
def segmenter_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma: float,
                       seed: int) -> dict[str, float]:
    """Pixel accuracy and mIoU on held-out scenes, optionally under Gaussian noise σ (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = scenes.NUM_CLASSES
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(images), 16):
        x = images[start:start + 16].float() / 255
        y = labels[start:start + 16].long()
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
        logits = model(normalize_imagenet(x))
        prediction = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        confusion += torch.bincount(y.ravel() * num_classes + prediction.ravel(), minlength=num_classes**2).view(
            num_classes, num_classes)
    true_positives = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - true_positives
    iou = torch.where(union > 0, true_positives / union.clamp(min=1), torch.zeros_like(true_positives))
    return {"accuracy": float(true_positives.sum() / confusion.sum()), "mean_iou": float(iou.mean())}


def train_segmenter(
    name: str, *, command: str, train_sigma: float = 0.0, iterations: int = 1500, batch: int = 16, lr: float = 3e-3,
    pool_size: int = 3000, validation_images: int = 40, seed: int = 0, threads: int = 2,
    default_for: list[str] | None = None, weights_dir: Path = WEIGHTS_DIR,
) -> dict[str, Any]:
    """Train, validate on held-out scenes (clean and at ``VALIDATION_SIGMAS``), save as ``name`` in
    ``weights_dir`` with ``command`` recorded; returns the validation scores."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    pool = scene_pool(scenes.TRAIN_SEEDS[seed * 100_000: seed * 100_000 + pool_size], SCENE_SIZE)
    held_out = scene_pool([scenes.held_out_seed(j) for j in range(validation_images)], SCENE_SIZE)
    model = build_hrnet(SMALL_HRNET, scenes.NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar() as bar:
        task = bar.add_task(f"training {name}", total=iterations, status="")
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_learning_rate(step, iterations, lr)
            images, labels = random_batch(pool, generator, batch)
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
    for sigma in VALIDATION_SIGMAS:
        validation[f"sigma_{sigma}"] = segmenter_accuracy(model, *held_out, sigma=sigma, seed=1)
    config = {"model_cfg": SMALL_HRNET, "num_classes": scenes.NUM_CLASSES}
    training = {
        "command": command, "seed": seed, "iterations": iterations, "batch": batch, "lr": lr,
        "train_sigma": train_sigma, "scene_size": list(SCENE_SIZE), "pool_size": pool_size,
        "generator_version": scenes.GENERATOR_VERSION, "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    save_shipped_model(name, "segmenter", "hrnet", model, config, training,
                       {"held_out_images": validation_images} | validation, default_for or [], weights_dir=weights_dir,
                       classes=list(scenes.CLASSES), palette=scenes.PALETTE.tolist())
    return validation
