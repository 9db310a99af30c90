"""What the GPU suite measures: the full-size profile (ADM-256 + HRNetV2-W48 at 1024×2048) and a tiny dry run.

No checkpoint is on the GPU machine, so the models get random weights: the cost of a forward pass does not depend
on them. The zero-initialised output convs of the ADM are given random values too, so its ε is not identically 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.engine.choices import Method
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.maths.stages import segmenter_input
from certseg.engine.models.adm import ADM_256_UNCOND, build_adm
from certseg.engine.models.fold_batchnorm import fold_batchnorm
from certseg.engine.models.hrnet import HRNET_W18, HRNET_W48, build_hrnet

TINY_ADM: dict[str, Any] = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
    "attention_resolutions": "8", "num_head_channels": 32, "learn_sigma": True, "resblock_updown": True,
    "use_scale_shift_norm": True, "use_fp16": False,
}
"""The official ADM's blocks (scale-shift norm, up/down resblocks, attention, learn_sigma) at tiny widths."""


def tiny_hrnet(width: int = 8) -> dict[str, Any]:
    """HRNetV2's four stages and fusions, one module of one block per branch, ``width`` channels on branch 0."""
    cfg = copy.deepcopy(HRNET_W18)
    for stage, branches in (("STAGE2", 2), ("STAGE3", 3), ("STAGE4", 4)):
        cfg["EXTRA"][stage].update(NUM_MODULES=1, NUM_BLOCKS=[1] * branches,
                                   NUM_CHANNELS=[width * 2**i for i in range(branches)])
    cfg["EXTRA"]["STAGE1"].update(NUM_BLOCKS=[1], NUM_CHANNELS=[16])
    return cfg



@dataclass(frozen=True)
class Profile:
    """One suite configuration: models, image, Algorithm 1's parameters, what to measure and how."""

    name: str
    image_size: tuple[int, int]
    denoiser_kwargs: dict[str, Any]
    denoiser_size: tuple[int, int]
    segmenter_cfg: dict[str, Any]
    num_classes: int
    n0: int
    n: int
    batch: int
    precisions: tuple[str, ...]
    compile_backend: str
    """``inductor`` on a GPU; ``eager`` in the dry run (dynamo's tracing and the wiring, no code generation)."""
    compile_modes: tuple[str, ...]
    images: int
    """Certified images per measured configuration, after one warm-up image and before one stage-split image."""
    sigma: float = 0.25
    alpha: float = 0.001
    tau: float = 0.75
    seed: int = 20250101
    methods: tuple[str, ...] = (Method.denoisecertify.value, Method.segcertify.value)
    labels: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "image_size": list(self.image_size), "denoiser_size": list(self.denoiser_size),
                "num_classes": self.num_classes, "n0": self.n0, "n": self.n, "batch": self.batch,
                "sigma": self.sigma, "alpha": self.alpha, "tau": self.tau, "seed": self.seed,
                "precisions": list(self.precisions), "compile_backend": self.compile_backend,
                "compile_modes": list(self.compile_modes), "images_per_config": self.images, **self.labels}


FULL = Profile(
    name="full", image_size=(1024, 2048), denoiser_kwargs=ADM_256_UNCOND, denoiser_size=(256, 256),
    segmenter_cfg=HRNET_W48, num_classes=19, n0=10, n=100, batch=10,
    precisions=("fp16", "bf16", "fp32"), compile_backend="inductor", compile_modes=("default", "reduce-overhead"),
    images=2, labels={"denoiser": "ADM-256 uncond (guided-diffusion), random weights",
                      "segmenter": "HRNetV2-W48 Cityscapes, random weights"},
)
"""Issue 12's configuration: batch 10 divides n0 = 10 and n = 100, so every batch has one shape (CUDA graphs)."""

DRY_RUN = Profile(
    name="dry-run", image_size=(32, 64), denoiser_kwargs=TINY_ADM, denoiser_size=(16, 16),
    segmenter_cfg=tiny_hrnet(), num_classes=19, n0=4, n=52, batch=13,
    precisions=("fp32", "bf16"), compile_backend="eager", compile_modes=("default",), images=1,
    labels={"denoiser": "tiny ADM (the official blocks, 32 channels), random weights",
            "segmenter": "tiny HRNetV2 (four stages, 8 channels), random weights"},
)
"""CPU, well under a minute: the same code path and keys with tiny models and image (n = 52: 51 is the least that
can certify 2048 pixels at α = 0.001 with Holm; batch 13 gives batches of two shapes, 4 and 13). 32×64 is the
least size whose calibrated random HRNet answers many classes (its lowest branch is then 1×2 pixels)."""


def randomise_zero_init(module: nn.Module, generator: torch.Generator) -> None:
    """Give every all-zero weight (the ADM's ``zero_module`` convs) random values of fan-in scale."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1 and not parameter.any():
                noise = torch.randn(parameter.shape, generator=generator, device=generator.device)
                parameter.copy_(noise / parameter[0].numel() ** 0.5)


def calibrate_batchnorm(segmenter: nn.Module, images01: torch.Tensor) -> None:
    """Set the BatchNorm statistics to those of ``images01``'s features (one pass, no gradients).

    A random network with the initial statistics (mean 0, variance 1) answers one class everywhere; with its
    features normalised its labels follow the image, as a trained model's do, so the counts are not degenerate.
    """
    norms = [m for m in segmenter.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this pass's statistics
    segmenter.train()
    with torch.no_grad():
        segmenter(segmenter_input(images01, images01.shape[-2:]))
    segmenter.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def build_models(profile: Profile, device: torch.device | str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(denoiser, segmenter) in eval mode on ``device``, initialised there from ``seed`` (reproducible per device),
    the segmenter's BatchNorm statistics calibrated on noisy copies of the suite's image, then folded and its head
    factored (as certify runs it; on ``meta``, where FLOPs are counted, the official order)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        denoiser = build_adm(profile.denoiser_kwargs).eval()
        segmenter = build_hrnet(profile.segmenter_cfg, profile.num_classes).eval()
    if device.type != "meta":
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        randomise_zero_init(denoiser, generator)
        clean = torch.as_tensor(suite_image(profile), device=device)[None]
        noise = torch.randn((4, *clean.shape[1:]), generator=generator, device=device)
        calibrate_batchnorm(segmenter, (clean + profile.sigma * noise).clamp(0, 1))
        fold_batchnorm(segmenter)  # as certify's sessions run their torch models (Settings.fold_batchnorm)
        segmenter.factor_head()  # and factor its head (Settings.factor_head)
    return denoiser, segmenter


def make_pipeline(profile: Profile, method: str, denoiser: nn.Module, segmenter: nn.Module) -> LabelPipeline:
    spec = make_spec(method, profile.sigma, profile.image_size, denoiser_size=profile.denoiser_size)
    return LabelPipeline(spec, segmenter, denoiser if method == Method.denoisecertify else None).eval()


def suite_image(profile: Profile) -> np.ndarray:
    """A fixed (3, H, W) image in [0, 1]: smooth regions and edges, so labels vary as in a street scene."""
    height, width = profile.image_size
    rng = np.random.default_rng(profile.seed)
    blocks = rng.random((3, max(1, height // 16), max(1, width // 16)), dtype=np.float32)
    image = np.repeat(np.repeat(blocks, 16, axis=1), 16, axis=2)[:, :height, :width]
    return np.clip(image + 0.05 * rng.standard_normal(image.shape, dtype=np.float32), 0.0, 1.0)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
