"""The chain around the models, against a hand composition of the stage functions; the torch runtime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from certseg.engine.core.pipeline import certify_image
from certseg.engine.maths.denoise import one_step_denoise, select_timestep
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.maths.stages import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalization
from certseg.engine.runtimes.torch_runtime import torch_runtime

SIZE = (32, 64)


@pytest.fixture
def models(small_adm_and_hrnet) -> tuple[torch.nn.Module, torch.nn.Module]:
    return small_adm_and_hrnet


def by_hand(segmenter, images: torch.Tensor, seg_size: tuple[int, int]) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(images, size=seg_size, mode="bilinear", align_corners=False) if images.shape[-2:] != seg_size \
        else images
    logits = segmenter((x - mean) / std)
    logits = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False)
    return logits.argmax(1).to(torch.uint8)


@torch.no_grad()
def test_denoisecertify_chain_equals_the_hand_composition(models) -> None:
    denoiser, segmenter = models
    spec = make_spec("denoisecertify", 0.5, SIZE, denoiser_size=(16, 16))
    assert spec.timestep.t == select_timestep(0.5, "principled", image_size=SIZE, denoiser_size=(16, 16)).t
    noisy = torch.rand(3, 3, *SIZE) + 0.5 * torch.randn(3, 3, *SIZE)
    labels = LabelPipeline(spec, segmenter, denoiser)(noisy)
    denoised = one_step_denoise(denoiser, noisy, spec.timestep.t, denoiser_size=(16, 16))
    torch.testing.assert_close(labels, by_hand(segmenter, denoised, SIZE), rtol=0, atol=0)
    assert labels.dtype == torch.uint8 and labels.shape == (3, *SIZE)


@torch.no_grad()
def test_segcertify_chain_with_scale(models) -> None:
    _, segmenter = models
    spec = make_spec("segcertify", 0.25, SIZE, scale=0.5)
    assert spec.segmenter_size == (16, 32) and spec.timestep is None
    noisy = torch.rand(2, 3, *SIZE)
    labels = LabelPipeline(spec, segmenter)(noisy)
    torch.testing.assert_close(labels, by_hand(segmenter, noisy, (16, 32)), rtol=0, atol=0)


@torch.no_grad()
def test_a_segmenters_own_normalisation_and_fixed_input_size(models) -> None:
    """A [0, 255] model with mmseg's statistics, fed a fixed 24x24 input: (255·x - mean) / std at that size;
    the spec records both."""
    _, segmenter = models
    mmseg = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), (0, 255))
    spec = make_spec("segcertify", 0.25, SIZE, normalization=mmseg, segmenter_input_size=(24, 24))
    assert spec.segmenter_size == (24, 24)
    noisy = torch.rand(2, 3, *SIZE)
    x = F.interpolate(noisy, size=(24, 24), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1), torch.tensor([58.395, 57.12, 57.375])
    logits = F.interpolate(segmenter((255 * x - mean) / std.view(1, 3, 1, 1)), size=SIZE, mode="bilinear",
                           align_corners=False)
    torch.testing.assert_close(LabelPipeline(spec, segmenter)(noisy), logits.argmax(1).to(torch.uint8), rtol=0, atol=0)
    record = spec.record()
    assert record["normalization"] == {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375),
                                       "input_range": (0.0, 255.0)}
    assert record["segmenter_input_size"] == (24, 24) and record["segmenter_size"] == [24, 24]
    assert make_spec("segcertify", 0.25, SIZE).normalization == IMAGENET  # the shipped models' default
    with pytest.raises(ValueError, match="outside the input range"):
        Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))  # [0, 255] values on [0, 1] pixels


def test_spec_records_everything_needed_to_remake_a_result() -> None:
    spec = make_spec("denoisecertify", 0.25, (1024, 2048), denoiser_size=(256, 256), timestep_rule="authors")
    record = spec.record()
    assert record["timestep"]["t"] == 73 and record["timestep"]["rule"] == "authors"
    assert record["denoiser_size"] == (256, 256) and record["segmenter_size"] == [1024, 2048]
    with pytest.raises(ValueError, match="method"):
        make_spec("magic", 0.25, (8, 8))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_runtime_certifies_with_autocast(models, precision: str) -> None:
    denoiser, segmenter = models
    spec = make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16))
    runtime = torch_runtime(LabelPipeline(spec, segmenter, denoiser), device=torch.device("cpu"),
                            precision=precision, batch_size=8)
    image = np.random.default_rng(0).random((3, *SIZE), dtype=np.float32)
    result = certify_image(runtime, image, num_classes=5, sigma=0.25, n0=4, n=40, alpha=0.1, seed=3)
    assert result.labels.shape == SIZE
    again = certify_image(runtime, image, num_classes=5, sigma=0.25, n0=4, n=40, alpha=0.1, seed=3)
    np.testing.assert_array_equal(result.labels, again.labels)


def test_bf16_sample_maps_agree_with_fp32_on_the_shipped_models() -> None:
    """bf16 autocast changes a few boundary pixels of each noisy sample's map, not the map: measured on the
    shipped DenoiseCertify models and the sample scene, where the maps hold several classes."""
    from certseg.engine.files.images import read_image
    from certseg.engine.models.registry import load_model

    segmenter, denoiser = load_model("procedural-hrnet-clean", "segmenter"), load_model("procedural-adm", "denoiser")
    image = read_image(Path(__file__).resolve().parents[1] / "examples" / "street.png")
    spec = make_spec("denoisecertify", 0.25, image.shape[1:], denoiser_size=denoiser.input_size)
    maps = []
    for precision in ("fp32", "bf16"):
        runtime = torch_runtime(LabelPipeline(spec, segmenter.module, denoiser.module), device=torch.device("cpu"),
                                precision=precision, batch_size=4)
        maps.append(np.concatenate(list(runtime.labels(image, sigma=0.25, seed=3, start=0, count=4))))
    assert len(np.unique(maps[0])) >= 4  # several classes: agreement is not trivial
    agreement = float(np.mean(maps[0] == maps[1]))
    assert 0.98 < agreement < 1.0, agreement  # close, and bf16 really ran (not silently fp32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_runtime_agrees_with_cpu_fp32(models) -> None:
    denoiser, segmenter = models
    spec = make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16))
    image = np.random.default_rng(0).random((3, *SIZE), dtype=np.float32)
    cpu = torch_runtime(LabelPipeline(spec, segmenter, denoiser), device=torch.device("cpu"))
    gpu = torch_runtime(LabelPipeline(spec, segmenter, denoiser), device=torch.device("cuda"), precision="fp16")
    a = np.concatenate(list(cpu.labels(image, sigma=0.25, seed=1, start=0, count=8)))
    b = np.concatenate(list(gpu.labels(image, sigma=0.25, seed=1, start=0, count=8)))
    assert np.mean(a == b) > 0.98


def test_torch_runtime_feeds_channels_last_without_a_copy_and_can_keep_labels_as_tensors(models) -> None:
    """The runtime forms its noisy batch in the layout the label function declares, so the conversion there
    returns the very tensor; kept labels are the same maps as torch tensors."""
    denoiser, segmenter = models
    spec = make_spec("denoisecertify", 0.25, SIZE, denoiser_size=(16, 16))
    pipeline = LabelPipeline(spec, segmenter, denoiser)
    seen: list[bool] = []
    pipeline.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last) and args[0].data_ptr() == args[0].contiguous(
        memory_format=torch.channels_last).data_ptr()))
    image = np.random.default_rng(1).random((3, *SIZE), dtype=np.float32)
    on_host = torch_runtime(pipeline, device=torch.device("cpu"), batch_size=3)
    assert on_host.label_fn.memory_format == torch.channels_last
    plain = dataclasses.replace(on_host, prefetch=False)  # one thread: the pipeline's forward takes the batch
    maps = list(plain.labels(image, sigma=0.25, seed=2, start=0, count=5))
    assert seen == [True, True]
    # Overlapped (the CPU default): the helper thread's first phase takes it, in the same layout, uncopied.
    seen.clear()
    phases = on_host.label_fn.phases
    on_host.label_fn.phases = phases._replace(prepare=lambda noisy: (seen.append(
        noisy.is_contiguous(memory_format=torch.channels_last)
        and noisy.data_ptr() == noisy.contiguous(memory_format=torch.channels_last).data_ptr()),
        phases.prepare(noisy))[1])
    assert on_host.overlaps()
    np.testing.assert_array_equal(np.concatenate(list(on_host.labels(image, sigma=0.25, seed=2, start=0, count=5))),
                                  np.concatenate(maps))
    assert seen == [True, True]  # one per model call: the batches of 3 and 2
    kept = list(torch_runtime(pipeline, device=torch.device("cpu"), batch_size=3, keep_labels_on_device=True)
                .labels(image, sigma=0.25, seed=2, start=0, count=5))
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.uint8 for b in kept)
    np.testing.assert_array_equal(torch.cat(kept).numpy(), np.concatenate(maps))

