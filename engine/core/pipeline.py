"""Algorithm 1 end to end for one image: selection samples → guess, estimation samples → agreements → certificate.

The runtime is anything that answers the sampling contract (``certseg.engine.core.sampling.Runtime``), so the
same orchestration serves in-process torch, ONNX Runtime and Triton servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from certseg.engine.choices import Fwer, NonFinitePolicy, choice
from certseg.engine.core.certify import Certificate, certify, radius, validate_parameters
from certseg.engine.core.contract import Runtime
from certseg.engine.core.counting import AgreementCounter, InvalidTally, ModeCounter
from certseg.engine.errors import CertsegError, InputError
from certseg.engine.seeds import new_root_seed

Progress = Callable[[int], None]
"""Called with the number of samples just finished (for progress bars)."""


class NonFiniteOutputError(CertsegError, RuntimeError):
    """The models produced NaN/Inf outputs and the policy is to stop rather than let those pixels abstain."""


@dataclass(frozen=True)
class CertifiedSegmentation:
    """A certified label map and everything needed to re-make it."""

    certificate: Certificate
    labels: np.ndarray
    num_classes: int
    sigma: float
    radius: float
    n0: int
    n: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    non_finite: dict[str, Any] = field(default_factory=dict)
    """The policy and how many samples / (sample, pixel) pairs of selection and estimation were invalid."""

    @property
    def abstain_label(self) -> int:
        return self.num_classes

    @property
    def guess(self) -> np.ndarray:
        return self.certificate.guess

    @property
    def abstain_fraction(self) -> float:
        return self.certificate.abstain_fraction


def validate_image(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) float32 image in [0, 1] pixel space, C = 3 (RGB) or 1 (grayscale, certified as such)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InputError(f"the image must be a (3, H, W) RGB or (1, H, W) gray array, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise InputError(f"the image must be float in [0, 1], got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputError("the image holds NaN or infinite values")
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
        raise InputError(f"the image must lie in [0, 1], got values in [{image.min():.3g}, {image.max():.3g}]")
    return image


def certified_space(channels: int) -> dict[str, Any]:
    """Where the L2 radius holds: the image's own [0, 1] pixel space, one noise draw per pixel and channel."""
    name = {1: "grayscale", 3: "rgb"}[channels]
    return {"channels": channels, "name": name, "range": [0.0, 1.0],
            "note": "perturbations of norm <= R in this space; gray is replicated to RGB after the noise"
            if channels == 1 else "perturbations of norm <= R in this space"}


def certify_image(
    runtime: Runtime,
    image: np.ndarray,
    *,
    num_classes: int,
    sigma: float,
    n0: int = 10,
    n: int = 100,
    tau: float = 0.75,
    alpha: float = 0.001,
    fwer: Fwer | str = Fwer.holm,
    seed: int | None = None,
    progress: Progress | None = None,
    non_finite: NonFinitePolicy | str = NonFinitePolicy.abstain,
) -> CertifiedSegmentation:
    """SegCertify's CERTIFY for one image: samples [0, n0) select, samples [n0, n0+n) estimate.

    Labels equal to ``num_classes`` mark non-finite model outputs; ``non_finite`` says what they do. The runtime
    may yield numpy arrays or torch tensors on any device: tensors are counted on their device and only the final
    counts come back (``certseg.engine.core.counting``), with the same certificate either way.
    """
    image = validate_image(image)
    shape = tuple(image.shape[1:])
    validate_parameters(n0=n0, n=n, tau=tau, alpha=alpha, num_pixels=int(np.prod(shape)), fwer=fwer, sigma=sigma)
    policy = choice(NonFinitePolicy, non_finite, "non_finite", InputError)
    seed = new_root_seed() if seed is None else int(seed)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    selection = ModeCounter(num_classes, shape, max_samples=n0)
    for labels in runtime.labels(image, sigma=sigma, seed=seed, start=0, count=n0):
        selection.update(labels)
        _check_policy(policy, selection.invalid, selection.num_samples)
        if progress:
            progress(len(labels))
    guess = selection.mode()
    timings["selection"] = time.perf_counter() - started

    started = time.perf_counter()
    estimation = AgreementCounter(guess, max_samples=n, num_classes=num_classes, device_guess=selection.guess_tensor)
    for labels in runtime.labels(image, sigma=sigma, seed=seed, start=n0, count=n):
        estimation.update(labels)
        _check_policy(policy, estimation.invalid, n0 + estimation.num_samples)
        if progress:
            progress(len(labels))
    if selection.num_samples != n0 or estimation.num_samples != n:
        raise RuntimeError(
            f"the runtime returned {selection.num_samples}/{n0} selection and {estimation.num_samples}/{n} "
            "estimation samples"
        )
    timings["estimation"] = time.perf_counter() - started

    started = time.perf_counter()
    certificate = certify(guess, estimation.agree, n, tau=tau, alpha=alpha, fwer=fwer)
    timings["certify"] = time.perf_counter() - started
    return CertifiedSegmentation(
        certificate=certificate,
        labels=certificate.labels(abstain_label=num_classes),
        num_classes=num_classes,
        sigma=float(sigma),
        radius=radius(sigma, tau),
        n0=n0,
        n=n,
        seed=seed,
        timings=timings,
        non_finite={
            "policy": policy.value,
            "selection_samples": selection.invalid.samples,
            "selection_pixel_samples": selection.invalid.pixel_samples,
            "estimation_samples": estimation.invalid.samples,
            "estimation_pixel_samples": estimation.invalid.pixel_samples,
        },
    )


def _check_policy(policy: NonFinitePolicy, tally: InvalidTally, samples_so_far: int) -> None:
    if policy == NonFinitePolicy.fail and tally.samples:
        raise NonFiniteOutputError(
            f"the models produced non-finite (NaN/Inf) outputs in {tally.samples} of the first {samples_so_far} "
            f"samples ({tally.pixel_samples} pixels); stopped (--non-finite fail). Check the weights and the "
            "precision (fp16 overflows); --non-finite abstain lets those pixels abstain instead"
        )
