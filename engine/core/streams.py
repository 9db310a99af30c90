"""Which noise each sample gets: per-sample seed sequences and their streams, in numpy alone.

Noise is drawn per sample, never per batch: sample i of root seed s gets its own generator, seeded by the
i-th child of ``numpy.random.SeedSequence(s)`` (``SeedSequence(s, spawn_key=(i,))``). So a sample's noise does
not depend on the batch it travels in, any sample can be regenerated on its own, a retried request
reproduces exactly the same samples, and two samples never share a draw (the published SegCertify sampler
reused one draw for a whole batch, which voids its certificates).

Multi-step denoising (``--denoise-steps K`` > 1) adds fresh noise at each ancestral step. That reverse-process
noise is defined here too, per sample and per step: the step that leaves timestep τ draws sample i's noise from
``SeedSequence(s, spawn_key=(i, REVERSE_STREAM, τ))`` (``reverse_seed_sequence``). SeedSequence hashes the spawn
key into the generator's key, so this stream is unrelated to the input draw's (spawn key ``(i,)``), to every
other step's and to every other sample's: the reverse noise of sample i depends on (s, i, τ) alone, not on the
batch, the batch neighbours, a retry or the server a request went to. One stream per step (rather than one per
sample read in order) lets any step be drawn on its own, wherever the step runs.

Kept free of torch so that clients of a server, which send seeds and never draw noise, need not import it;
the draws themselves are ``certseg.engine.core.sampling.NoiseSource``'s.
"""

from __future__ import annotations

import numpy as np


def sample_seed_sequence(root_seed: int, index: int) -> np.random.SeedSequence:
    """Seed sequence of sample ``index``: the ``index``-th child that ``SeedSequence(root_seed).spawn`` yields."""
    return _seed_sequence(root_seed, index, ())


def sample_seed64(root_seed: int, index: int) -> int:
    """A 64-bit integer seed for sample ``index`` (for generators, such as torch's, that take one int)."""
    return _seed64(sample_seed_sequence(root_seed, index))


REVERSE_STREAM = 1
"""The second spawn-key word of every reverse-process stream; input noise uses the one-word key ``(i,)``."""

Stream = tuple[int, ...]
"""Spawn-key words after the sample index: ``()`` is the input noise, ``reverse_stream(τ)`` a reverse step's."""


def reverse_stream(timestep: int) -> Stream:
    """The stream of the ancestral step that leaves ``timestep`` (see the module docstring)."""
    if timestep < 0:
        raise ValueError(f"timesteps are >= 0, got {timestep}")
    return (REVERSE_STREAM, int(timestep))


def reverse_seed_sequence(root_seed: int, index: int, timestep: int) -> np.random.SeedSequence:
    """Seed sequence of sample ``index``'s reverse-process noise at the step leaving ``timestep``."""
    return _seed_sequence(root_seed, index, reverse_stream(timestep))


def _seed_sequence(root_seed: int, index: int, stream: Stream) -> np.random.SeedSequence:
    """Sample ``index``'s ``stream``: spawn key ``(index, *stream)`` (``()``: its input noise)."""
    if root_seed < 0 or index < 0:
        raise ValueError(f"seeds and sample indices must be >= 0, got seed={root_seed}, index={index}")
    return np.random.SeedSequence(root_seed, spawn_key=(index, *stream))


def _seed64(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(1, np.uint64)[0])
