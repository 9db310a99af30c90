"""The sampling contract: fresh, independent, reproducible noise per sample, whatever the batching."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from certseg.engine.core.sampling import LocalRuntime, NoiseSource, batch_ranges, sample_seed_sequence
from certseg.engine.maths.stages import add_noise, to_rgb

from segmenters import stripes_segmenter

SHAPE = (3, 16, 24)


@pytest.mark.parametrize("backend", ["numpy-philox", "torch"])
def test_samples_in_one_batch_never_share_noise(backend: str) -> None:
    batch = NoiseSource(1234, backend).batch(0, 16, SHAPE).reshape(16, -1).numpy()
    assert len({row.tobytes() for row in batch}) == 16
    correlation = np.corrcoef(batch)
    off_diagonal = correlation[~np.eye(16, dtype=bool)]
    # Independent standard normals of dimension d: correlations ~ N(0, 1/d).
    assert np.abs(off_diagonal).max() < 5 / np.sqrt(batch.shape[1])
    assert abs(batch.mean()) < 5 / np.sqrt(batch.size) and abs(batch.std() - 1) < 0.02


@pytest.mark.parametrize("backend", ["numpy-philox", "torch"])
def test_a_sample_is_the_same_in_any_batch_and_alone(backend: str) -> None:
    source = NoiseSource(99, backend)
    big = source.batch(0, 10, SHAPE)
    torch.testing.assert_close(source.batch(3, 4, SHAPE), big[3:7], rtol=0, atol=0)
    torch.testing.assert_close(source.sample(7, SHAPE), big[7], rtol=0, atol=0)
    torch.testing.assert_close(NoiseSource(99, backend).batch(0, 10, SHAPE), big, rtol=0, atol=0)


def test_different_root_seeds_give_different_noise() -> None:
    a = NoiseSource(1).batch(0, 4, SHAPE)
    b = NoiseSource(2).batch(0, 4, SHAPE)
    assert not torch.equal(a, b)


def test_sample_streams_are_the_spawned_children_of_the_root_seed() -> None:
    children = np.random.SeedSequence(5).spawn(4)
    for index, child in enumerate(children):
        assert sample_seed_sequence(5, index).generate_state(4).tolist() == child.generate_state(4).tolist()


def test_noise_source_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="backend"):
        NoiseSource(1, "global-rng")
    with pytest.raises(ValueError, match="seed"):
        NoiseSource(-1)


def test_batch_ranges_cover_the_range_exactly_once() -> None:
    assert list(batch_ranges(10, 100, 32)) == [(10, 32), (42, 32), (74, 32), (106, 4)]
    assert list(batch_ranges(0, 0, 8)) == []
    with pytest.raises(ValueError):
        list(batch_ranges(0, 4, 0))


def test_local_runtime_labels_do_not_depend_on_batch_size() -> None:
    image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    segment = stripes_segmenter(5)
    results = []
    for batch_size in (1, 7, 64):
        runtime = LocalRuntime(segment, batch_size=batch_size)
        batches = list(runtime.labels(image, sigma=0.3, seed=42, start=5, count=20))
        assert sum(len(b) for b in batches) == 20 and all(len(b) <= batch_size for b in batches)
        results.append(np.concatenate(batches))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    assert results[0].dtype == np.uint8 and results[0].shape == (20, *SHAPE[1:])


@pytest.mark.parametrize("backend", ["numpy-philox", "torch"])
def test_fill_writes_exactly_the_per_sample_draws_into_a_reused_buffer(backend: str) -> None:
    source = NoiseSource(7, backend)
    buffer = torch.full((5, *SHAPE), float("nan"))
    for start in (0, 11):
        assert source.fill(start, buffer) is buffer
        for offset in range(5):
            torch.testing.assert_close(buffer[offset], source.sample(start + offset, SHAPE), rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous float32"):
        source.fill(0, torch.empty(2, 3, 4, 5).transpose(2, 3))


def recording_label_fn(inputs: list[torch.Tensor], memory_format: torch.memory_format | None = None):
    """A label function that keeps a copy of every input it gets (and says which layout it wants)."""

    def label_fn(noisy: torch.Tensor) -> torch.Tensor:
        if memory_format is not None:
            assert noisy.is_contiguous(memory_format=memory_format)
        inputs.append(noisy.clone())
        return (noisy[:, 0] > 0.5).to(torch.uint8)

    if memory_format is not None:
        label_fn.memory_format = memory_format
    return label_fn


@pytest.mark.parametrize("backend", ["numpy-philox", "torch"])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_local_runtime_feeds_x_plus_sigma_eps_of_each_sample_bit_for_bit(
    backend: str, channels: int, prefetch: bool, memory_format: torch.memory_format | None
) -> None:
    """The reused, prefetched buffers give the label function exactly to_rgb(x + σ·ε_i) of the per-sample draws,
    in order, in the layout it asks for; the last batch is smaller."""
    image = np.random.default_rng(1).random((channels, *SHAPE[1:]), dtype=np.float32)
    inputs: list[torch.Tensor] = []
    runtime = LocalRuntime(recording_label_fn(inputs, memory_format), batch_size=4, noise_backend=backend,
                           prefetch=prefetch)
    batches = list(runtime.labels(image, sigma=0.37, seed=3, start=2, count=10))
    assert [len(b) for b in batches] == [4, 4, 2] and [len(x) for x in inputs] == [4, 4, 2]
    source, clean = NoiseSource(3, backend), torch.from_numpy(image)
    expected = torch.stack([to_rgb(add_noise(clean[None], source.sample(i, image.shape), 0.37))[0]
                            for i in range(2, 12)])
    torch.testing.assert_close(torch.cat(inputs), expected, rtol=0, atol=0)
    np.testing.assert_array_equal(np.concatenate(batches), (expected[:, 0] > 0.5).to(torch.uint8).numpy())


def noise_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("certseg-noise")]


def test_closing_the_label_stream_early_leaves_no_noise_thread() -> None:
    image = np.random.default_rng(2).random(SHAPE, dtype=np.float32)
    runtime = LocalRuntime(stripes_segmenter(4), batch_size=2)
    stream = runtime.labels(image, sigma=0.5, seed=1, start=0, count=9)
    next(stream)
    assert len(noise_threads()) == 1  # the next batch's noise is being drawn
    stream.close()
    assert noise_threads() == []
    stream = runtime.labels(image, sigma=0.5, seed=1, start=0, count=9)
    next(stream)
    del stream
    gc.collect()
    assert noise_threads() == []


def test_an_error_in_the_noise_thread_reaches_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    original = NoiseSource.fill

    def fill(self: NoiseSource, start: int, out: torch.Tensor) -> torch.Tensor:
        if start >= 4:
            raise RuntimeError("broken generator")
        return original(self, start, out)

    monkeypatch.setattr(NoiseSource, "fill", fill)
    image = np.random.default_rng(3).random(SHAPE, dtype=np.float32)
    stream = LocalRuntime(stripes_segmenter(4), batch_size=2).labels(image, sigma=0.5, seed=1, start=0, count=9)
    assert len(next(stream)) == 2 and len(next(stream)) == 2
    with pytest.raises(RuntimeError, match="broken generator"):
        next(stream)
    assert noise_threads() == []


def test_an_error_in_the_label_function_stops_the_noise_thread() -> None:
    def failing(noisy: torch.Tensor) -> torch.Tensor:
        raise ValueError("model failed")

    image = np.random.default_rng(4).random(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="model failed"):
        list(LocalRuntime(failing, batch_size=2).labels(image, sigma=0.5, seed=1, start=0, count=9))
    assert noise_threads() == []


def test_labels_can_stay_torch_tensors_on_the_device() -> None:
    image = np.random.default_rng(5).random(SHAPE, dtype=np.float32)
    segment = stripes_segmenter(5)
    on_host = list(LocalRuntime(segment, batch_size=3).labels(image, sigma=0.3, seed=8, start=0, count=7))
    kept = list(LocalRuntime(segment, batch_size=3, keep_labels_on_device=True).labels(
        image, sigma=0.3, seed=8, start=0, count=7))
    assert all(isinstance(b, torch.Tensor) and b.device.type == "cpu" for b in kept)
    np.testing.assert_array_equal(torch.cat(kept).numpy(), np.concatenate(on_host))
    assert all(isinstance(b, np.ndarray) for b in on_host)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["numpy-philox", "torch"])
def test_fill_on_cuda_equals_the_per_sample_draws(backend: str) -> None:
    source = NoiseSource(7, backend)
    buffer = torch.full((3, *SHAPE), float("nan"), device="cuda")
    source.fill(4, buffer)
    for offset in range(3):
        torch.testing.assert_close(buffer[offset], source.sample(4 + offset, SHAPE, "cuda"), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_runtime_keeps_labels_on_the_device_and_matches_the_cpu() -> None:
    """numpy-philox noise is drawn on the host (prefetched) and copied over: the same samples as on the CPU."""
    image = np.random.default_rng(6).random(SHAPE, dtype=np.float32)

    def segment(noisy: torch.Tensor) -> torch.Tensor:  # no reduction: the same bits on either device
        return (noisy[:, 0] > 0.5).to(torch.uint8)

    on_cpu = np.concatenate(list(LocalRuntime(segment, batch_size=3).labels(image, sigma=0.3, seed=8, start=0,
                                                                            count=7)))
    kept = list(LocalRuntime(segment, batch_size=3, device="cuda", keep_labels_on_device=True).labels(
        image, sigma=0.3, seed=8, start=0, count=7))
    assert all(b.device.type == "cuda" for b in kept)
    np.testing.assert_array_equal(torch.cat(kept).cpu().numpy(), on_cpu)


def test_a_model_batch_cuts_each_batch_into_calls_without_changing_a_sample() -> None:
    """Batch 7 drawn as one, labelled in calls of at most 3, in index order; each call gets its own samples'
    reverse noise (start offset) and the labels equal those of unsliced batches."""
    image = np.random.default_rng(3).random((3, 8, 12), dtype=np.float32)
    calls: list[tuple[int, int | None]] = []
    segment = stripes_segmenter(5)

    def label_fn(noisy: torch.Tensor, reverse_noise=None) -> torch.Tensor:
        calls.append((noisy.shape[0], None if reverse_noise is None else reverse_noise.start))
        return segment(noisy)

    label_fn.takes_reverse_noise = True  # type: ignore[attr-defined]
    sliced = LocalRuntime(label_fn, batch_size=7, model_batch=3)
    got = np.concatenate(list(sliced.labels(image, sigma=0.3, seed=9, start=4, count=10)))
    assert calls == [(3, 4), (3, 7), (1, 10), (3, 11)]  # batches (4, 7) and (11, 3)
    whole = LocalRuntime(segment, batch_size=10, prefetch=False)
    np.testing.assert_array_equal(got, np.concatenate(list(whole.labels(image, sigma=0.3, seed=9, start=4, count=10))))
