"""The sampling contract: fresh, independent, reproducible noise per sample, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from certseg.engine.core.sampling import LocalRuntime, NoiseSource, batch_ranges, sample_seed_sequence

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
