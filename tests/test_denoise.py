"""DenoiseCertify's denoising step: schedule, t* rules, resize noise factor, x̂0 parity, one and multi step."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from certseg.engine.maths import denoise as dn
from certseg.engine.maths import noise_factors
from certseg.engine.maths.stages import resize
from certseg.engine.models.adm import build_adm

SIGMAS = (0.25, 0.5, 1.0)


def independent_alpha_bar() -> np.ndarray:
    """ᾱ by an explicit running product (not the module's cumprod)."""
    values, running = [], 1.0
    for beta in np.linspace(1e-4, 0.02, 1000):
        running *= 1.0 - float(beta)
        values.append(running)
    return np.array(values)


def schedule_table(golden: Path) -> list[tuple[int, float, float]]:
    """Rows (t, ᾱ, sqrt((1-ᾱ)/ᾱ)) of the "Schedule values" table in golden/README.md."""
    text = (golden / "README.md").read_text()
    section = text.split("## Schedule values", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|", section, flags=re.MULTILINE)
    return [(int(t), float(ab), float(std)) for t, ab, std in rows]


def test_linear_alpha_bar() -> None:
    alpha_bar = dn.linear_alpha_bar()
    assert alpha_bar.dtype == np.float64 and alpha_bar.shape == (1000,)
    np.testing.assert_allclose(alpha_bar, independent_alpha_bar(), rtol=1e-13, atol=0)
    alpha_bar[:] = 0  # a copy: callers cannot corrupt the schedule
    assert dn.linear_alpha_bar()[0] == 1 - 1e-4


def test_schedule_matches_readme_table(golden: Path) -> None:
    rows = schedule_table(golden)
    assert [t for t, _, _ in rows] == [73, 144, 145, 258, 259, 396]
    alpha_bar = dn.linear_alpha_bar()
    for t, ab, std in rows:
        assert alpha_bar[t] == pytest.approx(ab, rel=1e-14)
        assert dn.timestep_std(alpha_bar[t]) == pytest.approx(std, rel=1e-13)


def test_authors_rule() -> None:
    alpha_bar = independent_alpha_bar()
    for sigma, expected in zip(SIGMAS, (73, 144, 258), strict=True):
        independent = int(np.argmin(np.abs(alpha_bar - 1 / (1 + sigma**2))))
        choice = dn.select_timestep(sigma, "authors", image_size=(1024, 2048))
        assert choice.t == independent == expected
        assert choice.rule == "authors" and choice.alpha_bar == pytest.approx(alpha_bar[expected], rel=1e-13)


@pytest.mark.parametrize("image_size", [None, (1024, 2048), (480, 480), (256, 256)])
def test_dds_2sigma_reproduces_dds_published_numbers_at_any_size(image_size: Any) -> None:
    """DDS (Carlini et al.) resized nothing: its t* are 145, 259, 396, whatever the image size here."""
    std = np.sqrt((1 - independent_alpha_bar()) / independent_alpha_bar())
    for sigma, expected in zip(SIGMAS, (145, 259, 396), strict=True):
        independent = int(np.flatnonzero(std >= 2 * sigma)[0])
        choice = dn.select_timestep(sigma, "dds-2sigma", image_size=image_size)
        assert choice.t == independent == expected
        assert choice.rule == "dds-2sigma"
        # the record still states the noise that actually reaches the denoiser
        factor = 1.0 if image_size is None else dn.resize_noise_factor(image_size, 256)
        assert choice.noise_factor == factor
        assert choice.effective_sigma_model_space == pytest.approx(2 * sigma * factor, rel=1e-12)


@pytest.mark.parametrize(
    ("image_size", "expected"), [(None, (145, 259, 396)), ((1024, 2048), (73, 145, 259)), ((480, 480), (98, 186, 314))]
)
def test_dds_resized_applies_the_criterion_after_the_resize(image_size: Any, expected: tuple[int, ...]) -> None:
    std = np.sqrt((1 - independent_alpha_bar()) / independent_alpha_bar())
    for sigma, want in zip(SIGMAS, expected, strict=True):
        factor = 1.0 if image_size is None else dn.resize_noise_factor(image_size, 256)
        choice = dn.select_timestep(sigma, "dds-resized", image_size=image_size)
        assert choice.t == int(np.flatnonzero(std >= 2 * sigma * factor)[0]) == want


def test_bare_dds_is_no_rule() -> None:
    """The old "dds" applied the resize factor, unlike DDS: it is gone rather than silently changed."""
    with pytest.raises(ValueError, match="dds-2sigma, dds-resized"):
        dn.select_timestep(0.25, "dds")


@pytest.mark.parametrize(
    ("image_size", "antialias", "expected"),
    [
        (None, False, (144, 258, 396)),  # no resize: the noise is 2σ in model space
        ((1024, 2048), False, (73, 144, 258)),  # Cityscapes squash halves it: the authors' numbers
        ((480, 480), False, (97, 186, 314)),  # Pascal-Context: factor 0.664, the authors' rule is off
        ((1024, 2048), True, (14, 32, 68)),  # antialiasing removes far more noise
    ],
)
def test_principled_rule(image_size: Any, antialias: bool, expected: tuple[int, ...]) -> None:
    std = np.sqrt((1 - independent_alpha_bar()) / independent_alpha_bar())
    for sigma, want in zip(SIGMAS, expected, strict=True):
        choice = dn.select_timestep(sigma, image_size=image_size, antialias=antialias)
        factor = 1.0 if image_size is None else dn.resize_noise_factor(image_size, 256, antialias=antialias)
        assert choice.rule == "principled" and choice.noise_factor == factor
        assert choice.effective_sigma_model_space == pytest.approx(2 * sigma * factor, rel=1e-12)
        assert choice.t == int(np.argmin(np.abs(std - 2 * sigma * factor))) == want
        assert choice.timestep_std == pytest.approx(std[want], rel=1e-12)


def test_timestep_choice_is_frozen_and_validated() -> None:
    choice = dn.select_timestep(0.5)
    with pytest.raises(AttributeError):
        choice.t = 1  # type: ignore[misc]
    assert dn.select_timestep(0.0).t == 0
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            dn.select_timestep(bad)
    with pytest.raises(ValueError, match="rule"):
        dn.select_timestep(0.5, "nearest")
    with pytest.raises(ValueError):
        dn.select_timestep(1000.0, "dds-2sigma")


def test_noise_factor_reference_measurements() -> None:
    """The published reference measurement: 0.4996 for 1024x2048 -> 256 (exactly 0.5), about 0.66 for 480 -> 256."""
    assert dn.resize_noise_factor((1024, 2048), (256, 256)) == pytest.approx(0.4996, abs=1e-3)
    assert dn.resize_noise_factor((1024, 2048), 256) == pytest.approx(0.5, abs=1e-12)
    assert dn.resize_noise_factor(480, 256) == pytest.approx(0.66, abs=0.01)
    assert dn.resize_noise_factor(256, 256) == 1.0
    assert dn.resize_noise_factor((1024, 2048), 256, antialias=True) < 0.2


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(("in_size", "out_size"), [((13, 17), (6, 9)), ((10, 7), (16, 5))])
def test_noise_factor_equals_full_operator(in_size: tuple, out_size: tuple, antialias: bool) -> None:
    """The separable computation equals the RMS row norm of the whole 2-D operator, built from one-hot images."""
    n = in_size[0] * in_size[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *in_size)
    operator = resize(basis, out_size, antialias=antialias).reshape(n, -1)  # column b of A in row b
    exact = float(torch.sqrt((operator**2).sum(dim=0).mean()))
    assert dn.resize_noise_factor(in_size, out_size, antialias=antialias) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(("in_size", "out_size"), [((96, 160), (32, 32)), ((60, 60), (32, 32))])
def test_noise_factor_against_monte_carlo(in_size: tuple, out_size: tuple, antialias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, *in_size, generator=generator)
    measured = resize(noise, out_size, antialias=antialias).std().item()
    assert dn.resize_noise_factor(in_size, out_size, antialias=antialias) == pytest.approx(measured, rel=0.02)


def test_stage_functions_keep_dtype_and_values() -> None:
    x = torch.rand(2, 3, 8, 8, dtype=torch.float16)
    for fn in (dn.to_model_space, dn.from_model_space):
        assert fn(x).dtype == torch.float16
    assert dn.scale_for_timestep(x, 0.5).dtype == torch.float16
    assert dn.predict_x0(x, x, 0.5).dtype == torch.float16
    x32 = torch.rand(2, 3, 8, 8)
    assert torch.equal(dn.from_model_space(dn.to_model_space(x32)), x32)
    coefficient = torch.tensor(np.sqrt(0.3), dtype=torch.float64).float()
    assert torch.equal(dn.scale_for_timestep(x32, 0.3), x32 * coefficient)
    assert dn.predict_x0(10 * x32, x32, 0.3).max() <= 1 and dn.predict_x0(-10 * x32, x32, 0.3).min() >= -1


@pytest.fixture(scope="module")
def adm_golden(golden: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = json.loads((golden / "adm_small.json").read_text())
    with np.load(golden / "adm_small.npz") as data:
        return config, {name: data[name] for name in data.files}


def test_golden_pred_xstart(adm_golden: tuple[dict[str, Any], dict[str, np.ndarray]]) -> None:
    """Official p_mean_variance pred_xstart (x as x_t at the golden timesteps) from the golden eps."""
    _, npz = adm_golden
    x, eps = torch.from_numpy(npz["x"]), torch.from_numpy(npz["out"][:, :3])
    alpha_bar = dn.linear_alpha_bar()
    ours = torch.cat(
        [dn.predict_x0(x[i : i + 1], eps[i : i + 1], alpha_bar[t]) for i, t in enumerate(npz["timesteps"])]
    )
    assert (ours - torch.from_numpy(npz["pred_xstart"])).abs().max().item() <= 1e-5


def test_one_step_denoise_golden_end_to_end(adm_golden: tuple[dict[str, Any], dict[str, np.ndarray]]) -> None:
    """Feed the [0, 1] image whose x_t is the golden x: our UNet + one step gives (pred_xstart + 1) / 2."""
    config, npz = adm_golden
    unet = build_adm(config["create_model_kwargs"]).eval()
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in npz.items() if "." in k}, strict=True)
    size = int(config["create_model_kwargs"]["image_size"])
    alpha_bar = dn.linear_alpha_bar()
    for i, t in enumerate(npz["timesteps"]):
        x_t = torch.from_numpy(npz["x"][i : i + 1]).double()
        noisy01 = ((x_t / np.sqrt(alpha_bar[t]) + 1) / 2).float()
        with torch.no_grad():
            denoised = dn.one_step_denoise(unet, noisy01, int(t), denoiser_size=size)
        want = (torch.from_numpy(npz["pred_xstart"][i : i + 1]) + 1) / 2
        assert denoised.shape == noisy01.shape
        # the [0, 1] round trip re-rounds x_t in float32; x̂0 scales that by sqrt(1/ᾱ)
        assert (denoised - want).abs().max().item() <= 1e-5 * max(1.0, np.sqrt(1 / alpha_bar[t]))


class RecordingUNet(torch.nn.Module):
    """A cheap stand-in: eps = a·x_t, variance values v; records what it was called with."""

    def __init__(self, eps_scale: float = 0.1, variance_value: float = 0.0):
        super().__init__()
        self.eps_scale, self.variance_value = eps_scale, variance_value
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), timesteps.clone()))
        return torch.cat([self.eps_scale * x, torch.full_like(x, self.variance_value)], dim=1)


def test_one_step_denoise_stages() -> None:
    noisy = torch.rand(2, 3, 40, 60)
    unet = RecordingUNet()
    t = 144
    out = dn.one_step_denoise(unet, noisy, t, denoiser_size=32, out_size=(20, 30))
    ((x_t, timesteps),) = unet.calls
    alpha_bar = dn.linear_alpha_bar()[t]
    expected_x_t = dn.scale_for_timestep(resize(2 * noisy - 1, (32, 32)), alpha_bar)
    assert torch.equal(x_t, expected_x_t)
    assert timesteps.dtype == torch.int64 and timesteps.tolist() == [t, t]
    x0 = dn.predict_x0(x_t, 0.1 * x_t, alpha_bar)
    assert torch.equal(out, resize((x0 + 1) / 2, (20, 30)))
    assert dn.one_step_denoise(unet, noisy, t, denoiser_size=32).shape == noisy.shape
    with pytest.raises(ValueError):
        dn.one_step_denoise(unet, noisy, 1000)


def test_spaced_timesteps() -> None:
    assert dn.spaced_timesteps(5).tolist() == [0, 1, 2, 3, 4, 5]
    assert dn.spaced_timesteps(258, 1).tolist() == [258]
    assert dn.spaced_timesteps(258, 3).tolist() == [0, 129, 258]
    assert len(set(dn.spaced_timesteps(100, 101).tolist())) == 101
    with pytest.raises(ValueError):
        dn.spaced_timesteps(10, 12)


def seeded_noise(seed: int):
    """A NoiseFn from one explicit generator (the engine passes ``sampling.ReverseNoise`` instead)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda timestep, shape: torch.randn(tuple(shape), generator=generator)


def test_multi_step_one_step_equals_one_step_denoise() -> None:
    noisy = torch.rand(1, 3, 24, 24)
    multi = dn.multi_step_denoise(RecordingUNet(), noisy, 73, noise=seeded_noise(0), steps=1, denoiser_size=16)
    single = dn.one_step_denoise(RecordingUNet(), noisy, 73, denoiser_size=16)
    assert (multi - single).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_multi_step_two_steps_against_ddpm_posterior(variance: str) -> None:
    """Chain [0, t]: one ancestral step (DDPM posterior of the respaced chain, unit noise), then x̂0 at t = 0."""
    t, v = 100, 0.3
    noisy = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    unet = RecordingUNet(eps_scale=0.05, variance_value=v)
    got = dn.multi_step_denoise(
        unet, noisy, t, noise=lambda step, shape: torch.ones(shape), steps=2, variance=variance, denoiser_size=16
    )
    assert [int(ts[0]) for _, ts in unet.calls] == [t, 0]

    ab = independent_alpha_bar()
    ab_t, ab_0 = ab[t], ab[0]
    beta = 1 - ab_t / ab_0  # the respaced step t -> 0
    x_t = np.sqrt(ab_t) * (2 * noisy.numpy() - 1)
    x0 = np.clip((x_t - np.sqrt(1 - ab_t) * 0.05 * x_t) / np.sqrt(ab_t), -1, 1)
    mean = beta * np.sqrt(ab_0) / (1 - ab_t) * x0 + (1 - ab_0) * np.sqrt(1 - beta) / (1 - ab_t) * x_t
    posterior_var = beta * (1 - ab_0) / (1 - ab_t)
    frac = (v + 1) / 2
    log_var = np.log(posterior_var)
    if variance == "learned_range":
        log_var = frac * np.log(beta) + (1 - frac) * log_var
    x_1 = mean + np.exp(0.5 * log_var)
    final = np.clip((x_1 - np.sqrt(1 - ab_0) * 0.05 * x_1) / np.sqrt(ab_0), -1, 1)
    np.testing.assert_allclose(got.numpy(), (final + 1) / 2, atol=2e-6)


def test_multi_step_noise_is_explicit_and_reproducible() -> None:
    noisy = torch.rand(2, 3, 16, 16)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        return dn.multi_step_denoise(RecordingUNet(), noisy, 20, noise=seeded_noise(seed), denoiser_size=16)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    unet = RecordingUNet()
    dn.multi_step_denoise(unet, noisy, 20, noise=seeded_noise(0), denoiser_size=16)
    assert [int(ts[0]) for _, ts in unet.calls] == list(range(20, -1, -1))


def test_multi_step_learned_range_needs_six_channels() -> None:
    def three_channel(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return 0.1 * x

    noisy = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma"):
        dn.multi_step_denoise(three_channel, noisy, 5, noise=seeded_noise(0), denoiser_size=8)
    out = dn.multi_step_denoise(
        three_channel, noisy, 5, noise=seeded_noise(0), variance="fixed_small", denoiser_size=8
    )
    assert out.shape == noisy.shape


def dense_axis_row_sq_norms(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """Reference: the whole 1-D operator from the n_in one-hot bases (n_in² values), squared row norms."""
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, :, None].expand(n_in, 1, n_in, 2).contiguous()
    operator = resize(basis, (n_out, 2), antialias=antialias)[:, 0, :, 0]  # (n_in, n_out)
    return (operator**2).sum(dim=0).numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(("n_in", "n_out"), [(2048, 256), (1024, 256), (480, 256), (999, 37), (1500, 7), (50, 300),
                                             (257, 256), (3, 1)])
def test_axis_norms_equal_the_dense_operator(n_in: int, n_out: int, antialias: bool) -> None:
    """Downscaling by up to 214x (wide antialiased windows), upscaling and near-identity ratios."""
    expected = dense_axis_row_sq_norms(n_in, n_out, antialias)
    np.testing.assert_allclose(dn._axis_row_sq_norms(n_in, n_out, antialias), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("side", [3000, 20000])
def test_noise_factor_memory_is_linear_in_the_side(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No resize call gets more than a fixed number of values (the old n×n identity: 2·side² of them)."""
    largest = []

    def recording_resize(images: torch.Tensor, size: Any, antialias: bool = False) -> torch.Tensor:
        largest.append(images.numel())
        return resize(images, size, antialias=antialias)

    monkeypatch.setattr(dn, "resize", recording_resize)
    for antialias in (False, True):
        factor = dn._resize_noise_factor.__wrapped__((side, side), (256, 256), antialias)
        assert 0 < factor < 1
    assert max(largest) <= 1 << 22


def independent_cosine_alpha_bar(steps: int) -> np.ndarray:
    """Nichol & Dhariwal's ᾱ(u) = f(u)/f(0), f(u) = cos²((u + s)/(1 + s)·π/2), s = 0.008, at u = (t + 1)/T for
    the 0-based UNet timestep t, written out from the paper's formula in Python floats (no clipping applied)."""
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([f((t + 1) / steps) / f(0.0) for t in range(steps)])


@pytest.mark.parametrize("steps", [1000, 4000])
def test_cosine_alpha_bar_is_nichol_and_dhariwals_formula(steps: int) -> None:
    alpha_bar = dn.Schedule("cosine", steps).alpha_bar()
    reference = independent_cosine_alpha_bar(steps)
    # Every step but the last has β < 0.999, where the running product telescopes to the formula.
    np.testing.assert_allclose(alpha_bar[:-1], reference[:-1], rtol=1e-9, atol=0)
    assert np.all(np.diff(alpha_bar) < 0) and 0 < alpha_bar[-1] < alpha_bar[-2]
    # The last β is clipped: 1 - ᾱ_T/ᾱ_(T-1) would be 1 (f(1) = cos²(π/2) ≈ 0), and is 0.999 instead.
    assert 1 - alpha_bar[-1] / alpha_bar[-2] == pytest.approx(0.999, rel=1e-12)
    assert reference[-1] < 1e-30
    np.testing.assert_allclose(dn.cosine_alpha_bar(steps), alpha_bar, rtol=0, atol=0)


def test_linear_schedule_with_another_length_is_guided_diffusions() -> None:
    betas = np.linspace(0.5 * 1e-4, 0.5 * 0.02, 2000)  # get_named_beta_schedule("linear", 2000): scale 1000/T
    np.testing.assert_allclose(dn.Schedule("linear", 2000).alpha_bar(), np.cumprod(1 - betas), rtol=1e-13)
    assert dn.LINEAR.alpha_bar() is dn.Schedule().alpha_bar()  # the same cached values as linear_alpha_bar()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        dn.Schedule("sqrt")


def test_the_cosine_schedule_reaches_every_use_of_alpha_bar() -> None:
    """t* selection, x_t's scaling, x̂0 and the ancestral chain all take ᾱ from the schedule they are given; the
    linear default is what they used before."""
    cosine = dn.Schedule("cosine")
    alpha_bar = independent_cosine_alpha_bar(1000)
    alpha_bar[-1] = dn.cosine_alpha_bar()[-1]  # the clipped end, not reached by the rules below
    for sigma in SIGMAS:
        effective = 2 * sigma
        choice = dn.select_timestep(sigma, "principled", schedule=cosine)
        expected = int(np.argmin(np.abs(np.sqrt((1 - alpha_bar) / alpha_bar) - effective)))
        assert choice.t == expected and (choice.schedule, choice.num_timesteps) == ("cosine", 1000)
        assert choice.alpha_bar == pytest.approx(alpha_bar[expected], rel=1e-9)
        assert choice.t != dn.select_timestep(sigma, "principled").t  # the schedule changed t*
        assert dn.select_timestep(sigma, "authors", schedule=cosine).t == int(
            np.argmin(np.abs(alpha_bar - 1 / (1 + sigma**2))))
        assert choice.noise_schedule == cosine
    assert dn.select_timestep(0.25, "principled").noise_schedule == dn.LINEAR
    noisy, t = torch.rand(2, 3, 16, 16), 300
    unet = RecordingUNet()
    out = dn.one_step_denoise(unet, noisy, t, denoiser_size=16, schedule=cosine)
    ((x_t, _),) = unet.calls
    scale = np.float32(math.sqrt(alpha_bar[t]))
    assert torch.equal(x_t, (2 * noisy - 1) * float(scale))
    recip, recip_m1 = (float(np.float32(v)) for v in (math.sqrt(1 / alpha_bar[t]), math.sqrt(1 / alpha_bar[t] - 1)))
    assert torch.allclose(out, (torch.clamp(recip * x_t - recip_m1 * 0.1 * x_t, -1, 1) + 1) / 2, atol=1e-6)
    multi = dn.multi_step_denoise(RecordingUNet(), noisy, t, noise=seeded_noise(0), steps=1, denoiser_size=16,
                                  schedule=cosine)
    assert (multi - out).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        dn.denoiser_input(noisy, 60, denoiser_size=16, schedule=dn.Schedule("cosine", 50))


@pytest.mark.parametrize(("in_size", "out_size", "antialias"), [((1024, 2048), 256, False), ((480, 999), 37, True)])
def test_noise_factors_are_kept_bit_for_bit_and_read_back_without_measuring(
    in_size: tuple[int, int], out_size: int, antialias: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    noise_factors._noise_factor.cache_clear()
    measured = noise_factors.noise_factor(in_size, out_size, antialias)
    assert measured.hex() == dn.resize_noise_factor(in_size, out_size, antialias=antialias).hex()

    def measure_again(*args: object, **kwargs: object) -> float:
        raise AssertionError("measured again")

    noise_factors._noise_factor.cache_clear()
    monkeypatch.setattr(dn, "resize_noise_factor", measure_again)
    try:
        assert noise_factors.noise_factor(in_size, out_size, antialias).hex() == measured.hex()
    finally:
        noise_factors._noise_factor.cache_clear()
