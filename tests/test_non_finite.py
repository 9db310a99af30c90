"""Non-finite model outputs fail closed: a NaN/Inf never counts as an agreement, in every runtime.

The stub segmenter below is perfect (it always answers the same map) except that its score for the true class at
one pixel becomes +Inf in the one sample whose noisy input there is the largest. argmax alone would still pick the
true class there (so the old code counted it as an agreement); the engine must not. The stub denoiser predicts an
infinite ε, which x̂0's clamp would quietly turn into a finite image. Both are exported to ONNX, so the same
files run in-process on ONNX Runtime and behind the bundled tritonserver.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from certseg.engine.commands.cli import app
from certseg.engine.core.certify import min_samples_to_certify
from certseg.engine.core.pipeline import NonFiniteOutputError, certify_image
from certseg.engine.core.sampling import NoiseSource
from certseg.engine.errors import CheckpointError
from certseg.engine.files.images import read_image
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.maths.stages import add_noise, finite_samples, label_dtype, labels_from_logits, normalize_imagenet
from certseg.engine.models.registry import load_model, save_model
from certseg.engine.runtimes.session import Session, Settings
from certseg.engine.runtimes.torch_runtime import torch_runtime

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "street.png"
SIGMA, TAU, ALPHA, SEED = 0.25, 0.75, 0.001, 7
HEIGHT, WIDTH, NUM_CLASSES, DENOISER_SIZE = 16, 32, 4, 16
N0 = 4
N = min_samples_to_certify(TAU, ALPHA, HEIGHT * WIDTH, "bonferroni")
"""The fewest samples that can certify: a pixel certifies only with all n agreeing, so one lost agreement shows."""


# ------------------------------------------------------------------------------------------------ the stage


def reference_invalid(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Independently: a pixel is invalid where any class score of the upsampled logits is non-finite."""
    upsampled = F.interpolate(logits.double(), size=size, mode="bilinear", align_corners=False)
    return ~torch.isfinite(upsampled).all(dim=1)


@pytest.mark.parametrize("size", [(6, 10), (12, 20), (17, 23)])
def test_non_finite_scores_give_the_invalid_label_exactly_where_they_reach(size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_CLASSES, 6, 10, generator=generator)
    logits[0, 2, 1, 3] = float("nan")
    logits[1, 0, 4, 7] = float("inf")
    logits[1, 3, 0, 0] = float("-inf")
    labels = labels_from_logits(logits, size)
    invalid = reference_invalid(logits, size)
    assert invalid[0].any() and invalid[1].any() and not invalid[2].any()
    np.testing.assert_array_equal((labels == NUM_CLASSES).numpy(), invalid.numpy())
    finite = ~invalid
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)
    assert torch.equal(labels[finite].long(), expected[finite])
    assert int(labels[finite].max()) < NUM_CLASSES


def test_finite_samples_flags_exactly_the_samples_holding_a_nan_or_inf() -> None:
    values = torch.randn(5, 6, 8, 8)
    values[1, 0, 2, 2] = float("nan")
    values[2, 5, 0, 0] = float("inf")  # outside the 3 channels that feed x̂0
    values[3, 2, 7, 7] = float("-inf")
    expected = torch.isfinite(values[:, :3]).flatten(1).all(dim=1)
    assert torch.equal(finite_samples(values[:, :3]), expected) and expected.tolist() == [True, False, True, False,
                                                                                           True]
    large_half = (torch.randn(2, 3, 256, 256) * 200).half()  # sums beyond fp16's range must not count as Inf
    assert finite_samples(large_half).all()


def test_invalid_samples_are_marked_whole_and_labels_keep_room_for_k() -> None:
    logits = torch.randn(3, NUM_CLASSES, 5, 5)
    labels = labels_from_logits(logits, (5, 5), torch.tensor([True, False, True]))
    assert bool((labels[1] == NUM_CLASSES).all()) and int(labels[[0, 2]].max()) < NUM_CLASSES
    assert label_dtype(255) == torch.uint8 and label_dtype(256) != torch.uint8
    wide = labels_from_logits(torch.full((1, 256, 2, 2), float("nan")), (2, 2))
    assert int(wide.max()) == 256  # K = 256 must not wrap around to class 0 in uint8


# ------------------------------------------------------------------------------------------------ the stubs


def perfect_map() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    return (rows // 4 + cols // 8) % NUM_CLASSES


class SpikeSegmenter(nn.Module):
    """Always ``perfect_map()``, except that the true class's score at ``pixel`` is +Inf where the (normalised)
    channel 0 there exceeds ``threshold``. ``threshold`` = +Inf: never."""

    def __init__(self, pixel: tuple[int, int] = (0, 0), threshold: float = float("inf")) -> None:
        super().__init__()
        target = perfect_map()
        self.register_buffer("scores", F.one_hot(target, NUM_CLASSES).permute(2, 0, 1).float() * 10)
        spot = torch.zeros(NUM_CLASSES, HEIGHT, WIDTH, dtype=torch.bool)
        spot[target[pixel], pixel[0], pixel[1]] = True
        self.register_buffer("spot", spot)
        self.threshold = threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        spike = self.spot & (images[:, :1] > self.threshold)
        return torch.where(spike, torch.full_like(self.scores, float("inf")), self.scores)


class InfiniteDenoiser(nn.Module):
    """ε = ∞·x_t: non-finite everywhere; clamping x̂0 would turn it into a finite, meaningless image."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float("inf")))

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return x_t * self.gain + 0 * timesteps.float()[:, None, None, None]


def small_image() -> np.ndarray:
    return np.ascontiguousarray(read_image(SAMPLE)[:, 40 : 40 + HEIGHT, 100 : 100 + WIDTH])


def spike_for(image: np.ndarray) -> tuple[tuple[int, int], float, int]:
    """(pixel, threshold, sample): a pixel where exactly one estimation sample's normalised channel 0 exceeds the
    threshold, computed with the pipeline's own float32 ops from the seeded noise."""
    clean = torch.from_numpy(image).unsqueeze(0)
    noise = NoiseSource(SEED).batch(0, N0 + N, clean.shape[1:])
    values = normalize_imagenet(add_noise(clean, noise, SIGMA))[:, 0].numpy()  # (samples, H, W)
    order = np.sort(values, axis=0)
    best = values.argmax(axis=0)
    for row, col in zip(*np.nonzero(best >= N0), strict=True):
        if order[-1, row, col] > order[-2, row, col]:
            threshold = float((np.float64(order[-1, row, col]) + order[-2, row, col]) / 2)
            return (int(row), int(col)), threshold, int(best[row, col])
    raise AssertionError("no pixel has a unique largest estimation sample")


def assert_spike_certificate(result, pixel: tuple[int, int], spiked_sample: int) -> None:
    """The spiked sample disagrees at that pixel only: it is the one pixel not certified."""
    assert spiked_sample >= N0
    agree = result.certificate.agree
    assert agree[pixel] == N - 1
    assert (np.delete(agree.ravel(), pixel[0] * WIDTH + pixel[1]) == N).all()
    certified = result.certificate.certified
    assert not certified[pixel] and certified.sum() == HEIGHT * WIDTH - 1
    np.testing.assert_array_equal(result.guess, perfect_map().numpy())
    assert result.non_finite["estimation_samples"] == 1 and result.non_finite["estimation_pixel_samples"] == 1
    assert result.non_finite["selection_samples"] == 0


def certify(runtime, image: np.ndarray):
    return certify_image(runtime, image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=N0, n=N, tau=TAU, alpha=ALPHA,
                         fwer="bonferroni", seed=SEED)


def spec(image: np.ndarray, method: str):
    return make_spec(method, SIGMA, image.shape[1:], denoiser_size=(DENOISER_SIZE, DENOISER_SIZE))


def test_an_infinite_score_in_one_sample_costs_that_pixel_its_certificate_torch() -> None:
    image = small_image()
    pixel, threshold, sample = spike_for(image)
    pipeline = LabelPipeline(spec(image, "segcertify"), SpikeSegmenter(pixel, threshold))
    assert_spike_certificate(certify(torch_runtime(pipeline, device=torch.device("cpu"), batch_size=8), image),
                             pixel, sample)


def test_an_infinite_denoiser_output_certifies_nothing_torch() -> None:
    image = small_image()
    pipeline = LabelPipeline(spec(image, "denoisecertify"), SpikeSegmenter(), InfiniteDenoiser())
    result = certify(torch_runtime(pipeline, device=torch.device("cpu"), batch_size=8), image)
    assert result.certificate.certified.sum() == 0 and (result.certificate.agree == 0).all()
    assert result.non_finite["selection_samples"] == N0 and result.non_finite["estimation_samples"] == N
    assert result.non_finite["estimation_pixel_samples"] == N * HEIGHT * WIDTH


def test_fail_policy_stops_at_the_first_non_finite_sample_with_one_line() -> None:
    image = small_image()
    pixel, threshold, sample = spike_for(image)
    pipeline = LabelPipeline(spec(image, "segcertify"), SpikeSegmenter(pixel, threshold))
    seen: list[int] = []
    with pytest.raises(NonFiniteOutputError, match=r"non-finite \(NaN/Inf\) outputs in 1 of the first") as error:
        certify_image(torch_runtime(pipeline, device=torch.device("cpu"), batch_size=1), image,
                      num_classes=NUM_CLASSES, sigma=SIGMA, n0=N0, n=N, seed=SEED, non_finite="fail",
                      progress=seen.append)
    assert "\n" not in str(error.value)
    assert sum(seen) == sample  # stopped at the spiked sample, before reporting it done


# ------------------------------------------------------------------------------------------------ shipped models


def with_nan(model, tensor: str):
    """A copy of a loaded model with one NaN in ``tensor`` (the cached original stays intact)."""
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        weight = module.state_dict()[tensor]
        weight[(0,) * weight.ndim] = float("nan")  # indexing, not view(): the cached model may be channels_last
    return dataclasses.replace(model, module=module)


@pytest.mark.parametrize("method, role, tensor", [
    ("segcertify", "segmenter", "last_layer.3.weight"),
    ("denoisecertify", "denoiser", "out.2.weight"),
])
def test_one_nan_weight_in_a_shipped_model_certifies_no_pixel(method: str, role: str, tensor: str) -> None:
    """The reported failure: one NaN weight made every pixel 'certified' as class 0."""
    image = np.ascontiguousarray(read_image(SAMPLE)[:, ::2, ::2])
    session = Session.open(Settings(method=method, n0=2, n=64, batch=33, precision="fp32", device="cpu"))
    model = getattr(session, role)
    assert tensor in model.module.state_dict()
    setattr(session, role, with_nan(model, tensor))
    result, record = session.certify(image, seed=3)
    assert result.certificate.certified.sum() == 0
    assert (result.labels == result.num_classes).all()
    assert record["non_finite"] == result.non_finite
    assert result.non_finite["policy"] == "abstain" and result.non_finite["estimation_samples"] == 64
    # The session's cached model is untouched: the same settings certify pixels again.
    healthy, _ = Session.open(Settings(method=method, n0=2, n=64, batch=33, device="cpu")).certify(image, seed=3)
    assert healthy.certificate.certified.sum() > 0


def test_checkpoints_with_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = load_model("procedural-hrnet-clean", "segmenter")
    broken = with_nan(model, "last_layer.3.weight")
    path = tmp_path / "nan.safetensors"
    save_model(path, broken.module, {"family": model.family, "config": model.config, "role": "segmenter"})
    with pytest.raises(CheckpointError, match=r"non-finite weights: tensor 'last_layer\.3\.weight'") as error:
        load_model(path, "segmenter")
    assert "\n" not in str(error.value)
    result = CliRunner().invoke(app, ["certify", str(SAMPLE), "--segmenter", str(path), "--method", "segcertify",
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "last_layer.3.weight" in lines[0] and "non-finite" in lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ ONNX and Triton


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], output: str) -> Path:
    axes = {name: {0: "batch"} for name in [*inputs, output]}
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=[output],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("non-finite-onnx")
    image = small_image()
    pixel, threshold, sample = spike_for(image)
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    x_t = torch.rand(2, 3, DENOISER_SIZE, DENOISER_SIZE)
    return {
        "spike": export(SpikeSegmenter(pixel, threshold), (images,), folder / "spike.onnx", ["images"], "logits"),
        "perfect": export(SpikeSegmenter(), (images,), folder / "perfect.onnx", ["images"], "logits"),
        "denoiser": export(InfiniteDenoiser(), (x_t, torch.tensor([5, 5])), folder / "denoiser.onnx",
                           ["x_t", "timesteps"], "eps"),
    }


def test_onnx_runtime_fails_closed_too(onnx_files: dict[str, Path]) -> None:
    from certseg.engine.runtimes.onnx_runtime import onnx_runtime

    image = small_image()
    pixel, _, sample = spike_for(image)
    spiked = certify(onnx_runtime(spec(image, "segcertify"), onnx_files["spike"], batch_size=8), image)
    assert_spike_certificate(spiked, pixel, sample)
    denoised = certify(onnx_runtime(spec(image, "denoisecertify"), onnx_files["perfect"], onnx_files["denoiser"],
                                    batch_size=8), image)
    assert denoised.certificate.certified.sum() == 0 and denoised.non_finite["estimation_samples"] == N


def test_the_bundled_triton_server_fails_closed_too(onnx_files: dict[str, Path],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("tritonclient.grpc")
    from certseg.engine.errors import ServerError
    from certseg.engine.runtimes.onnx_runtime import onnx_runtime
    from certseg.engine.runtimes.serve import TritonServer
    from certseg.engine.runtimes.triton_runtime import TritonRuntime
    from certseg.export.repository import ModelFiles, write_repository

    files = ModelFiles(segmenter=onnx_files["perfect"], denoiser=onnx_files["denoiser"],
                       segcertify_segmenter=onnx_files["spike"])
    repository = write_repository(files, tmp_path_factory.mktemp("non-finite-repo") / "repository", max_batch=8)
    image = small_image()
    pixel, _, sample = spike_for(image)
    try:
        server = TritonServer(repository, exit_timeout_s=0, ready_timeout_s=120)
        server.__enter__()
    except ServerError as error:
        pytest.skip(f"tritonserver cannot start on this machine: {error}")
    try:
        seg_spec, den_spec = spec(image, "segcertify"), spec(image, "denoisecertify")
        with TritonRuntime([server.grpc_address], "certseg_segcertify", seg_size=seg_spec.segmenter_size,
                           batch=8) as remote:
            spiked = certify(remote, image)
        assert_spike_certificate(spiked, pixel, sample)
        local = certify(onnx_runtime(seg_spec, onnx_files["spike"], batch_size=8), image)
        np.testing.assert_array_equal(spiked.certificate.agree, local.certificate.agree)
        with TritonRuntime([server.grpc_address], "certseg_denoisecertify", timestep=den_spec.timestep.t,
                           seg_size=den_spec.segmenter_size, batch=8) as remote:
            denoised = certify(remote, image)
        assert denoised.certificate.certified.sum() == 0 and denoised.non_finite["estimation_samples"] == N
    finally:
        server.__exit__(None, None, None)
