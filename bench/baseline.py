"""The authors-style certifier, kept only to measure speedups side by side in one run (``--baseline``).

How the published code works, minus its bugs: one sample at a time (batch 1), fp32 eager PyTorch, per-class
count maps over all K classes, one exact binomial test per pixel in a Python loop (``scipy.stats.binomtest``)
and statsmodels' ``multipletests`` for Holm / Bonferroni. It draws exactly the engine's per-sample noise
(``NoiseSource(seed).sample(i)``) and runs the same ``LabelPipeline`` on the same weights, as published: the
bench gives it the models with BatchNorm unfolded and HRNet's head in the official order
(``bench.run._Sessions.baseline``), which the engine rewrites by default (``Settings.fold_batchnorm``,
``factor_head``). Its certificate equals the engine's up to the float rounding those rewrites change (at fp32
they changed no certificate measured); only the time differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from certseg.bench.timing import StageTimer
from certseg.engine.choices import Fwer, NoiseBackend, choice
from certseg.engine.core.pipeline import validate_image
from certseg.engine.core.sampling import NoiseSource, ReverseNoise
from certseg.engine.errors import InputError
from certseg.engine.labels import label_numpy_dtype
from certseg.engine.maths.label_pipeline import LabelPipeline
from certseg.engine.maths.stages import add_noise, to_rgb


@dataclass(frozen=True)
class BaselineResult:
    labels: np.ndarray
    """Certified map: the guess where certified, K (abstain) elsewhere."""
    guess: np.ndarray
    agree: np.ndarray
    certified: np.ndarray
    num_classes: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def abstain_fraction(self) -> float:
        return float(1.0 - self.certified.mean())


def _multipletests() -> Callable:
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        raise InputError("the authors-style baseline (--baseline) needs statsmodels: pip install statsmodels") from None
    return multipletests


def per_pixel_pvalues(agree: np.ndarray, n: int, tau: float) -> np.ndarray:
    """One exact one-sided binomial test per pixel, in a Python loop, as the published code does."""
    from scipy.stats import binomtest

    flat = agree.ravel()
    out = np.empty(flat.size, dtype=np.float64)
    for i, k in enumerate(flat.tolist()):
        out[i] = binomtest(k, n, tau, alternative="greater").pvalue
    return out.reshape(agree.shape)


def authors_certify(
    pipeline: LabelPipeline,
    image: np.ndarray,
    *,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    tau: float,
    alpha: float,
    seed: int,
    fwer: Fwer | str = Fwer.holm,
    noise_backend: NoiseBackend | str = NoiseBackend.numpy_philox,
    device: torch.device | str = "cpu",
    timer: StageTimer | None = None,
    progress: Callable[[int], None] | None = None,
) -> BaselineResult:
    """Algorithm 1 the slow way: batch 1, fp32 eager, count maps, per-pixel p-values, statsmodels FWER."""
    multipletests = _multipletests()
    fwer = choice(Fwer, fwer, "fwer")  # statsmodels names the two procedures as certseg does
    timer = timer or StageTimer(device)
    image = validate_image(image)
    pipeline = pipeline.to(device).eval()
    clean = torch.as_tensor(image, device=device).unsqueeze(0)
    source = NoiseSource(int(seed), noise_backend)
    height, width = image.shape[1:]

    def counts_over(first: int, count: int) -> np.ndarray:
        counts = np.zeros((num_classes, height, width), dtype=np.int64)
        for index in range(first, first + count):
            started = timer.now()
            noisy = to_rgb(add_noise(clean, source.sample(index, clean.shape[1:], device).unsqueeze(0), sigma))
            timer.add("noise", timer.now() - started)
            with torch.no_grad():
                labels = timer.timed_call(pipeline, noisy, ReverseNoise(source, index, 1, device))
            started = timer.now()
            label_map = labels[0].cpu().numpy()
            timer.add("transfer", timer.now() - started)
            started = timer.now()
            for c in range(num_classes):
                counts[c] += label_map == c
            timer.add("count", timer.now() - started)
            if progress:
                progress(1)
        return counts

    timings: dict[str, float] = {}
    started = time.perf_counter()
    guess = counts_over(0, n0).argmax(axis=0)
    timings["selection"] = time.perf_counter() - started
    started = time.perf_counter()
    agree = np.take_along_axis(counts_over(n0, n), guess[None], axis=0)[0]
    timings["estimation"] = time.perf_counter() - started
    started = time.perf_counter()
    pvalues = per_pixel_pvalues(agree, n, tau)
    certified = multipletests(pvalues.ravel(), alpha=alpha, method=fwer.value)[0].reshape(guess.shape)
    timings["certify"] = time.perf_counter() - started
    timer.add("certify", timings["certify"])
    labels = guess.astype(label_numpy_dtype(num_classes))
    labels[~certified] = num_classes
    return BaselineResult(labels=labels, guess=guess, agree=agree, certified=certified, num_classes=num_classes,
                          timings=timings)
