"""Multi-step denoising (``--denoise-steps K``): each sample's reverse-process noise comes from its own streams,
so its K-step output does not depend on the batch it travels in or on how the samples are split; a non-finite
UNet output at any step abstains the sample; the option works end to end and refuses bad values in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from certseg.engine.core.sampling import LocalRuntime, NoiseSource, ReverseNoise, reverse_stream
from certseg.engine.errors import InputError
from certseg.engine.files.images import read_image
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.models.registry import shipped_models

REPO = Path(__file__).resolve().parents[1]
SEED = 21
SIZE = (16, 32)
CLASSES = 6


class ElementwiseUNet(nn.Module):
    """ε = 0.3·x_t: every output value depends on its own input value only, so batching cannot change a bit."""

    def __init__(self, nan_at: dict[int, int] | None = None) -> None:
        super().__init__()
        self.nan_at = nan_at or {}
        """timestep -> the batch row whose ε is NaN at that timestep."""
        self.timesteps: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        step = int(timesteps[0])
        self.timesteps.append(step)
        eps = 0.3 * x
        if step in self.nan_at:
            eps[self.nan_at[step]] = float("nan")
        return eps


class ElementwiseSegmenter(nn.Module):
    """Six per-pixel scores from the three channels (x and -x): the argmax is a function of the pixel alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


def pipeline(steps: int, unet: nn.Module | None = None) -> LabelPipeline:
    spec = make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16), denoise_steps=steps)
    return LabelPipeline(spec, ElementwiseSegmenter(), unet or ElementwiseUNet()).eval()


def noisy_batch(start: int, count: int) -> torch.Tensor:
    image = torch.full((3, *SIZE), 0.5)
    return (image + 0.25 * NoiseSource(SEED).batch(start, count, (3, *SIZE))).clamp(0, 1)


def test_reverse_noise_is_each_samples_own_stream_disjoint_from_its_input_noise() -> None:
    """Sample i's noise for the step leaving τ is Philox(SeedSequence(s, spawn_key=(i, 1, τ))), an independent
    reference built here from numpy alone; it is not the input draw, nor another step's or sample's."""
    shape = (3, 4, 5)
    got = ReverseNoise(NoiseSource(SEED), 7, 3)(40, (3, *shape))
    for offset in range(3):
        sequence = np.random.SeedSequence(SEED, spawn_key=(7 + offset, 1, 40))
        expected = np.random.Generator(np.random.Philox(sequence)).standard_normal(shape, dtype=np.float32)
        assert np.array_equal(got[offset].numpy(), expected)
    source = NoiseSource(SEED)
    input_noise = source.sample(7, shape)
    assert input_noise.equal(source.sample(7, shape, stream=()))
    assert not input_noise.equal(got[0])
    assert not got[0].equal(source.sample(7, shape, stream=reverse_stream(39)))
    assert not got[0].equal(got[1])
    torch_source = NoiseSource(SEED, "torch")
    seed64 = int(np.random.SeedSequence(SEED, spawn_key=(8, 1, 40)).generate_state(1, np.uint64)[0])
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed64))
    assert torch.equal(ReverseNoise(torch_source, 8, 1)(40, (1, *shape))[0], expected)
    with pytest.raises(ValueError, match="batch of 2"):
        ReverseNoise(source, 0, 3)(40, (2, *shape))


def test_k_step_output_of_a_sample_is_the_same_alone_in_a_batch_of_16_and_split() -> None:
    steps = 5
    batched = pipeline(steps).clean_images(noisy_batch(0, 16), ReverseNoise(NoiseSource(SEED), 0, 16))
    for index in (0, 6, 15):
        alone = pipeline(steps).clean_images(noisy_batch(index, 1), ReverseNoise(NoiseSource(SEED), index, 1))
        assert torch.equal(alone[0], batched[index])
    image = np.full((3, *SIZE), 0.5, dtype=np.float32)

    def labels(batch: int, start: int, count: int) -> np.ndarray:
        runtime = LocalRuntime(pipeline(steps), batch_size=batch)
        return np.concatenate(list(runtime.labels(image, sigma=0.25, seed=SEED, start=start, count=count)))

    whole = labels(16, 0, 16)
    assert np.array_equal(np.concatenate([labels(3, 0, 9), labels(16, 9, 7)]), whole)  # two requests, other batches
    assert np.array_equal(labels(1, 4, 1)[0], whole[4])


def test_two_samples_of_a_batch_get_different_reverse_noise() -> None:
    same = noisy_batch(0, 1).expand(2, -1, -1, -1).contiguous()
    clean = pipeline(4).clean_images(same, ReverseNoise(NoiseSource(SEED), 0, 2))
    assert not torch.equal(clean[0], clean[1])
    one_step = pipeline(1).clean_images(same)
    assert torch.equal(one_step[0], one_step[1])  # one step adds no noise: only the reverse noise differs


def test_the_chain_visits_the_spaced_timesteps_and_draws_noise_for_all_but_the_last() -> None:
    unet, asked = ElementwiseUNet(), []
    source = NoiseSource(SEED)

    def noise(timestep: int, shape: tuple[int, ...]) -> torch.Tensor:
        asked.append(timestep)
        return ReverseNoise(source, 0, 2)(timestep, shape)

    spec_pipeline = pipeline(4, unet)
    spec_pipeline.clean_images(noisy_batch(0, 2), noise)
    visited = list(spec_pipeline.spec.denoise_timesteps)
    assert unet.timesteps == visited and visited[0] == spec_pipeline.spec.timestep.t and visited[-1] == 0
    assert asked == visited[:-1]
    record = spec_pipeline.spec.record()
    assert record["denoise_steps"] == 4 and record["denoise_timesteps"] == visited
    assert record["denoise_variance"] == "fixed_small"
    one = pipeline(1).spec.record()
    assert one["denoise_timesteps"] == [one["timestep"]["t"]] and one["denoise_variance"] is None


@pytest.mark.parametrize("step", ["first", "middle", "last"])
def test_a_non_finite_eps_at_any_step_abstains_that_sample_only(step: str) -> None:
    visited = pipeline(4).spec.denoise_timesteps
    timestep = {"first": visited[0], "middle": visited[1], "last": visited[-1]}[step]
    labels = pipeline(4, ElementwiseUNet(nan_at={timestep: 1}))(
        noisy_batch(0, 3), ReverseNoise(NoiseSource(SEED), 0, 3))
    assert (labels[1] == CLASSES).all()
    assert (labels[0] < CLASSES).all() and (labels[2] < CLASSES).all()


def test_k_step_needs_the_reverse_noise_and_a_k_that_fits() -> None:
    with pytest.raises(ValueError, match="reverse noise"):
        pipeline(3)(noisy_batch(0, 1))
    with pytest.raises(InputError, match="needs --method denoisecertify"):
        make_spec("segcertify", 0.25, SIZE, denoise_steps=2)
    t = make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16)).timestep.t
    make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16), denoise_steps=t + 1)
    with pytest.raises(InputError, match=f"more than the {t + 1} timesteps"):
        make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16), denoise_steps=t + 2)
    with pytest.raises(InputError, match=">= 1"):
        make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16), denoise_steps=0)


# ---------------------------------------------------------------- end to end

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)


def certseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "certseg.engine.commands.cli", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "crop.png"
    image = read_image(REPO / "examples" / "street.png")[:, :64, :128]
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    return path


@needs_shipped
@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_certify_with_denoise_steps_end_to_end(small_image: Path, tmp_path: Path, runtime: str) -> None:
    common = ["--n0", "4", "--n", "50", "--alpha", "0.01", "--seed", "3", "--threads", "1", "--quiet",
              "--runtime", runtime]
    for steps, folder in ((3, "a"), (3, "b"), (1, "one")):
        result = certseg("certify", str(small_image), "--denoise-steps", str(steps), "--out", str(tmp_path / folder),
                         "--batch", "4" if folder == "b" else "3", *common)
        assert result.returncode == 0, result.stderr
    a, b, one = (json.loads((tmp_path / f / "crop.json").read_text()) for f in ("a", "b", "one"))
    assert a["settings"]["denoise_steps"] == 3 and a["pipeline"]["denoise_steps"] == 3
    timesteps = a["pipeline"]["denoise_timesteps"]
    assert len(timesteps) == 3 and timesteps[0] == a["pipeline"]["timestep"]["t"] and timesteps[-1] == 0
    assert one["pipeline"]["denoise_timesteps"] == [one["pipeline"]["timestep"]["t"]]
    assert a["outputs"] == b["outputs"]  # the batch does not change the reverse noise (elementwise bits aside)
    assert a["outputs"] != one["outputs"]


@needs_shipped
@pytest.mark.parametrize(("args", "message"), [
    (["--denoise-steps", "0"], "--denoise-steps must be an integer >= 1"),
    (["--denoise-steps", "2", "--method", "segcertify"], "needs --method denoisecertify"),
    (["--denoise-steps", "5000"], "more than the"),
])
def test_a_bad_denoise_steps_is_one_line_and_nonzero_exit(small_image: Path, tmp_path: Path, args: list[str],
                                                        message: str) -> None:
    result = certseg("certify", str(small_image), "--out", str(tmp_path), "--quiet", "--threads", "1", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "crop.json").exists()
