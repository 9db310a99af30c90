"""Benchmark of the certify step alone (p-values + FWER) on a Cityscapes-sized map, against the baselines.

Run: ``python -m certseg.bench.certify_step [--height 1024 --width 2048 --classes 19 --n 100 --repeats 5]``.
Everything is measured in one run on the same arrays, so the ratios are comparable:
- certseg: ``certseg.engine.core.certify.certify`` (p-value table + Holm threshold from the histogram of k);
- scipy + statsmodels, vectorised: ``binom.sf`` on every pixel + ``multipletests(method="holm")``;
- the published per-pixel loop (one exact test per pixel), timed on a subsample and extrapolated.
The decisions of the first two are checked to be identical. The per-pixel radius map
(``certseg.engine.core.radius.radius_map``, a Clopper–Pearson table over k) is timed on the same counts, against
scipy's exact interval pixel by pixel (on a subsample, extrapolated, values checked equal).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from scipy.stats import binom, binomtest, norm

from certseg.bench.machine import cpu_name
from certseg.engine.core.certify import certify
from certseg.engine.core.radius import radius_map


def synthetic_counts(height: int, width: int, num_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A guess map and agreement counts shaped like a real certification (most pixels near k = n)."""
    rng = np.random.default_rng(seed)
    guess = rng.integers(0, num_classes, size=(height, width), dtype=np.uint8)
    reliability = rng.choice([0.6, 0.9, 0.97, 0.995, 1.0], p=[0.05, 0.1, 0.15, 0.3, 0.4], size=(height, width))
    agree = rng.binomial(n, reliability).astype(np.uint16)
    return guess, agree


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def run(
    height: int = 1024,
    width: int = 2048,
    num_classes: int = 19,
    n: int = 100,
    tau: float = 0.75,
    alpha: float = 1e-3,
    repeats: int = 5,
    loop_pixels: int = 2000,
    seed: int = 0,
) -> dict:
    guess, agree = synthetic_counts(height, width, num_classes, n, seed)
    result = certify(guess, agree, n, tau=tau, alpha=alpha, fwer="holm")
    ours = best_time(lambda: certify(guess, agree, n, tau=tau, alpha=alpha, fwer="holm"), repeats)
    report: dict = {
        "pixels": height * width,
        "classes": num_classes,
        "n": n,
        "tau": tau,
        "alpha": alpha,
        "certified_fraction": float(result.certified.mean()),
        "certseg_s": ours,
        "machine": cpu_name(),
    }
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:  # statsmodels is a dev dependency only
        multipletests = None
    if multipletests is not None:
        def vectorised() -> np.ndarray:
            return multipletests(binom.sf(agree.ravel().astype(np.int64) - 1, n, tau), alpha=alpha, method="holm")[0]

        reject = vectorised()
        report["scipy_statsmodels_s"] = best_time(vectorised, max(1, repeats // 2))
        report["decisions_identical"] = bool(np.array_equal(reject, result.certified.ravel()))
        report["speedup_vs_scipy_statsmodels"] = report["scipy_statsmodels_s"] / ours
    sigma = 0.25
    radii = radius_map(agree, n, sigma=sigma, alpha=alpha).radius
    report["radius_map_s"] = best_time(lambda: radius_map(agree, n, sigma=sigma, alpha=alpha), repeats)
    # The same radii pixel by pixel from scipy's exact interval, timed on a sample and extrapolated.
    level = alpha / agree.size
    sample = agree.ravel()[:loop_pixels]
    started = time.perf_counter()
    lows = [binomtest(int(k), n, alternative="greater").proportion_ci(1 - level).low for k in sample]
    report["radius_per_pixel_scipy_s_extrapolated"] = (time.perf_counter() - started) / loop_pixels * agree.size
    expected = np.where(np.asarray(lows) > 0.5, sigma * norm.ppf(np.maximum(lows, 0.5)), np.nan)
    report["radius_map_matches_scipy"] = bool(np.allclose(radii.ravel()[:loop_pixels], expected, rtol=2e-5,
                                                          equal_nan=True))
    flat = agree.ravel()
    started = time.perf_counter()
    for k in flat[:loop_pixels]:
        binomtest(int(k), n, tau, alternative="greater")
    per_pixel = (time.perf_counter() - started) / loop_pixels
    report["per_pixel_loop_s_extrapolated"] = per_pixel * flat.size
    report["speedup_vs_per_pixel_loop"] = report["per_pixel_loop_s_extrapolated"] / ours
    return report


def main(
    height: int = 1024,
    width: int = 2048,
    classes: int = 19,
    n: int = 100,
    repeats: int = 5,
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
) -> None:
    """Time the certify step on an H x W map (default 1024 x 2048, 19 classes, n = 100, Holm)."""
    report = run(height, width, classes, n, repeats=repeats)
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    typer.run(main)
