"""Per-pixel radii against independent references and a null model whose true radii are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from certseg.engine.commands.cli import app
from certseg.engine.core.certify import certify
from certseg.engine.core.pipeline import certify_image
from certseg.engine.core.radius import certified_accuracy_at, lower_bound_table, radius_map, radius_table
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.files.images import abstain_look, read_image, read_labels
from certseg.engine.files.radius_outputs import colour_ramp, read_radius_npz
from certseg.engine.runtimes.session import Session, Settings

from segmenters import ThresholdSegmenter


@pytest.mark.parametrize("n, level", [(1, 0.3), (20, 0.05), (100, 1e-3 / 4096), (1000, 1e-9)])
def test_lower_bounds_equal_independent_references(n: int, level: float) -> None:
    table = lower_bound_table(n, level)
    assert table[0] == 0.0
    # Closed forms at the ends: P(Bin(n, p) >= n) = p^n and P(Bin(n, p) >= 1) = 1 - (1 - p)^n.
    assert table[n] == pytest.approx(level ** (1 / n), rel=1e-12)
    assert table[1] == pytest.approx(-np.expm1(np.log1p(-level) / n), rel=1e-9)
    for k in range(1, n + 1):
        # statsmodels' central Clopper–Pearson interval at 2·level has the same lower end ...
        assert table[k] == pytest.approx(proportion_confint(k, n, alpha=2 * level, method="beta")[0], rel=1e-10)
        # ... and scipy's exact binomial test inverts to it (a numerical root, to its tolerance).
        scipy_low = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=1 - level).low
        assert table[k] == pytest.approx(scipy_low, rel=2e-5), k


def test_radii_of_random_counts_equal_the_reference() -> None:
    rng = np.random.default_rng(0)
    n, sigma, alpha = 100, 0.25, 1e-3
    agree = rng.integers(0, n + 1, size=(37, 53))
    result = radius_map(agree, n, sigma=sigma, alpha=alpha)
    assert result.radius.dtype == np.float32 and result.radius.shape == agree.shape
    level = alpha / agree.size
    for k in np.unique(agree):
        low = binomtest(int(k), n, alternative="greater").proportion_ci(confidence_level=1 - level).low
        expected = sigma * norm.ppf(low) if low > 0.5 else np.nan
        np.testing.assert_allclose(result.radius[agree == k], np.float32(expected), rtol=1e-6)
    summary = result.summary()
    assert summary["num_pixels"] == agree.size and summary["n"] == n and summary["alpha"] == alpha
    assert summary["certified_percent"] == pytest.approx(100 * np.mean(~np.isnan(result.radius)))


def test_bonferroni_certificates_are_exactly_the_pixels_with_radius_at_least_r_tau() -> None:
    """The exact test and the Clopper–Pearson bound are dual: the map is Bonferroni's test at every τ."""
    rng = np.random.default_rng(1)
    n, sigma, alpha = 200, 0.5, 0.01
    agree = rng.integers(120, n + 1, size=(40, 40))
    radii = radius_map(agree, n, sigma=sigma, alpha=alpha).radius
    for tau in (0.6, 0.75, 0.85, 0.9):
        certified = certify(np.zeros_like(agree), agree, n, tau=tau, alpha=alpha, fwer="bonferroni").certified
        r_tau = sigma * norm.ppf(tau)
        by_radius = np.nan_to_num(radii, nan=-1.0) >= np.float32(r_tau) * (1 - 1e-6)
        np.testing.assert_array_equal(certified, by_radius)


def test_claimed_radii_exceed_the_true_ones_in_at_most_alpha_of_images() -> None:
    """Null model: class 1 where channel 0 of the noisy image passes a threshold t, so a pixel at level v has the
    exact robust radius t - v for class 0 and v - t for class 1. An image "fails" if any pixel claims more."""
    sigma, n0, n, alpha, trials = 0.25, 5, 100, 0.2, 300
    segmenter = ThresholdSegmenter(sigma, 0.5, level=0.5)  # threshold t = 0.5
    levels = np.linspace(0.5 - 2 * sigma, 0.5 + 2 * sigma, 64, dtype=np.float32).reshape(8, 8)
    image = np.repeat(levels[None], 3, axis=0)
    runtime = LocalRuntime(segmenter, batch_size=n0 + n)
    true_radius = {0: 0.5 - levels, 1: levels - 0.5}
    failures = 0
    claimed_any = 0
    for seed in range(trials):
        result = certify_image(runtime, image, num_classes=2, sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed)
        radii = radius_map(result.certificate.agree, n, sigma=sigma, alpha=alpha).radius
        truth = np.where(result.guess == 0, true_radius[0], true_radius[1])
        claimed = ~np.isnan(radii)
        claimed_any += claimed.sum()
        failures += bool((radii[claimed] > truth[claimed] + 1e-6).any())
    assert claimed_any > trials * 20  # the map does claim radii: the test has power to fail
    assert failures / trials <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / trials)


def test_per_pixel_level_without_the_union_bound_would_fail_the_null_model() -> None:
    """The same null model with each pixel bounded at α instead of α/N fails often: the test above can fail."""
    n, alpha, pixels = 100, 0.2, 64
    p = norm.cdf(np.linspace(0, 3, pixels))  # true agreement probabilities of class 0
    rng = np.random.default_rng(5)
    naive = lower_bound_table(n, alpha)
    union = lower_bound_table(n, alpha / pixels)
    naive_fail = union_fail = 0
    for _ in range(300):
        k = rng.binomial(n, p)
        naive_fail += bool((naive[k] > p).any())
        union_fail += bool((union[k] > p).any())
    assert naive_fail / 300 > 2 * alpha and union_fail / 300 <= alpha


def test_radius_table_is_nan_below_half_and_increasing_in_k() -> None:
    table = radius_table(50, 0.25, 0.01, 100)
    finite = ~np.isnan(table)
    assert finite.any() and not finite[:26].any()
    assert np.all(np.diff(table[finite]) > 0)
    assert binom.sf(np.flatnonzero(finite)[0] - 1, 50, 0.5) <= 0.01 / 100  # first certified k rejects p <= 1/2


def test_certified_accuracy_curve_counts_correct_certified_pixels_at_each_radius() -> None:
    radii = np.array([np.nan, 0.05, 0.2, 0.3, 0.3, 1.2], dtype=np.float32)
    correct = np.array([True, True, True, False, True, True])
    valid = np.array([True, True, True, True, True, False])
    curve = certified_accuracy_at(radii, correct, valid, np.array([0.0, 0.1, 0.25, 0.3, 1.0]))
    np.testing.assert_allclose(curve, [3 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])


# ------------------------------------------------------------------------------------------------ the command


REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"
EXAMPLE_LABELS = REPO / "examples" / "street_labels.png"


def test_certify_radius_map_writes_the_radii_of_the_same_counts(tmp_path: Path) -> None:
    """The npz holds exactly the radii of the certificate's own counts; the picture is the image's size plus the
    colour bar; the JSON says what the bound used; a rerun without --radius-map leaves no stale radius files."""
    crop = tmp_path / "crop.png"
    with Image.open(EXAMPLE) as colour:
        colour.crop((0, 0, 96, 48)).save(crop)
    with Image.open(EXAMPLE_LABELS) as labels:
        labels.crop((0, 0, 96, 48)).save(tmp_path / "labels.png")
    args = ["certify", str(crop), "--method", "segcertify", "--n0", "4", "--n", "64", "--seed", "5", "--quiet",
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--radius-map", "--labels", str(tmp_path / "labels.png")])
    assert result.exit_code == 0, result.output
    radius, guess = read_radius_npz(tmp_path / "out" / "crop.radius.npz")
    session = Session.open(Settings(method="segcertify", n0=4, n=64))
    reference, _ = session.certify(read_image(crop), seed=5)
    expected = radius_map(reference.certificate.agree, 64, sigma=0.25, alpha=0.001)
    assert radius.dtype == np.float32 and radius.shape == (48, 96)
    np.testing.assert_array_equal(radius, expected.radius)
    np.testing.assert_array_equal(guess, reference.guess)
    assert np.isnan(radius).any() and (~np.isnan(radius)).any()
    report = json.loads((tmp_path / "out" / "crop.json").read_text())
    summary = report["radius_map"]
    assert (summary["sigma"], summary["n"], summary["alpha"], summary["num_pixels"]) == (0.25, 64, 0.001, 48 * 96)
    assert summary["radius_quantiles"]["q50"] == pytest.approx(float(np.nanmedian(radius)), rel=1e-6)
    target = read_labels(tmp_path / "labels.png")
    correct = (guess == target) & ~np.isnan(radius)
    assert summary["certified_accuracy_at"]["0"] == pytest.approx(correct.mean())
    assert {"radius_png", "radius_npz"} <= set(report["outputs"])
    with Image.open(tmp_path / "out" / "crop.radius.png") as picture:
        assert picture.size == (96, 48) and picture.mode == "RGB"  # lies over the image pixel for pixel
        drawn = np.asarray(picture)[:, :32]  # left of the colour-bar inset
    image = read_image(crop)
    abstain = np.isnan(radius[:, :32])
    look = np.clip(np.round(abstain_look(image)[:, :32]), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(drawn[abstain], np.repeat(look, 3, axis=2)[abstain])  # as in the overlay
    ramp = colour_ramp(radius[:, :32][~abstain] / summary["radius_attainable_max"])
    np.testing.assert_array_equal(drawn[~abstain], ramp)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert not (tmp_path / "out" / "crop.radius.npz").exists() and not (tmp_path / "out" / "crop.radius.png").exists()
    assert "radius_map" not in json.loads((tmp_path / "out" / "crop.json").read_text())


def test_certify_step_benchmark_runs_small_and_checks_itself() -> None:
    """The benchmark's own equality checks pass on a small map (the timings themselves are not asserted)."""
    from certseg.bench.certify_step import run

    report = run(height=32, width=48, num_classes=5, n=100, repeats=1, loop_pixels=40)
    assert report["decisions_identical"] and report["radius_map_matches_scipy"]
    assert report["radius_map_s"] > 0 and report["pixels"] == 32 * 48
