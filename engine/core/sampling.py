"""The one sampling contract: label maps of samples ``start .. start+count`` of root seed ``s`` at noise level σ.

Noise is drawn per sample, never per batch: sample i of root seed s gets its own generator, seeded by the
i-th child of ``numpy.random.SeedSequence(s)`` (``SeedSequence(s, spawn_key=(i,))``). So a sample's noise does
not depend on the batch it travels in, any sample can be regenerated on its own, a retried request
reproduces exactly the same samples, and two samples never share a draw (the published SegCertify sampler
reused one draw for a whole batch, which voids its certificates).

Algorithm 1 uses indices ``[0, n0)`` for selection and ``[n0, n0 + n)`` for estimation: disjoint by
construction, hence independent.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from certseg.engine.choices import NoiseBackend, choice
from certseg.engine.maths.stages import add_noise, to_rgb

if TYPE_CHECKING:
    from certseg.engine.maths.label_pipeline import LabelPipeline

LabelFn = Callable[[torch.Tensor], torch.Tensor | np.ndarray]
"""A batched segmenter: noisy images (B, 3, H, W) float32 in [0, 1] pixel space -> labels (B, H, W) int, with
the value K (= number of classes) where a sample's output was non-finite (see ``certseg.engine.maths.stages``)."""


def new_root_seed() -> int:
    """A fresh 63-bit root seed for runs where the user gave none (it is recorded in every result)."""
    return secrets.randbits(63)


def sample_seed_sequence(root_seed: int, index: int) -> np.random.SeedSequence:
    """Seed sequence of sample ``index``: the ``index``-th child that ``SeedSequence(root_seed).spawn`` yields."""
    if root_seed < 0 or index < 0:
        raise ValueError(f"seeds and sample indices must be >= 0, got seed={root_seed}, index={index}")
    return np.random.SeedSequence(root_seed, spawn_key=(index,))


def sample_seed64(root_seed: int, index: int) -> int:
    """A 64-bit integer seed for sample ``index`` (for generators, such as torch's, that take one int)."""
    return int(sample_seed_sequence(root_seed, index).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class NoiseSource:
    """Standard-normal noise per sample index, from a named backend.

    ``numpy-philox`` (default): numpy's counter-based Philox generator; bit-identical on every platform and
    runtime (torch, ONNX, Triton). ``torch``: ``torch.randn`` with a per-sample ``torch.Generator`` on the
    target device (Philox on CUDA); reproducible for one device type and torch version, and avoids moving
    noise to the accelerator.
    """

    root_seed: int
    backend: NoiseBackend | str = NoiseBackend.numpy_philox
    """A member or its string; kept as the member."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", choice(NoiseBackend, self.backend, "noise backend"))
        if not isinstance(self.root_seed, (int, np.integer)) or self.root_seed < 0:
            raise ValueError(f"the root seed must be an integer >= 0, got {self.root_seed!r}")

    def sample(self, index: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise of one sample, float32, on ``device``."""
        if self.backend == NoiseBackend.numpy_philox:
            generator = np.random.Generator(np.random.Philox(sample_seed_sequence(self.root_seed, index)))
            noise = generator.standard_normal(tuple(shape), dtype=np.float32)
            return torch.from_numpy(noise).to(device)
        torch_generator = torch.Generator(device=device)
        torch_generator.manual_seed(sample_seed64(self.root_seed, index))
        return torch.randn(tuple(shape), generator=torch_generator, device=device, dtype=torch.float32)

    def batch(self, start: int, count: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise of samples ``start .. start+count`` stacked to (count, *shape): one independent draw each."""
        return torch.stack([self.sample(start + i, shape, device) for i in range(count)])


class Runtime(Protocol):
    """Anything that answers the sampling contract (in-process torch, ONNX Runtime, a Triton server)."""

    def labels(
        self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int
    ) -> Iterator[np.ndarray]:
        """Yield label maps (b, H, W) for samples ``start .. start+count`` in index order."""
        ...


def batch_ranges(start: int, count: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, start+count)`` into (start, count) chunks of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    end = start + count
    for first in range(start, end, batch_size):
        yield first, min(batch_size, end - first)


def labels_to_numpy(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Label maps as the smallest unsigned numpy dtype that holds them (uint8 for K <= 256)."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"label values must lie in [0, 65535], got [{array.min()}, {array.max()}]")
    return array.astype(np.uint8 if (array.size == 0 or array.max() <= 255) else np.uint16)


@dataclass
class LocalRuntime:
    """In-process runtime: adds per-sample noise and runs a batched label function (any framework).

    The noise is drawn in the image's own channels (1 for grayscale, 3 for RGB), then gray is replicated to RGB.
    """

    label_fn: LabelFn
    batch_size: int = 16
    device: torch.device | str = "cpu"
    noise_backend: NoiseBackend | str = NoiseBackend.numpy_philox
    pipeline: LabelPipeline | None = None
    """The label pipeline ``label_fn`` runs, where it runs one: observers hook it (the bench's stage timer)."""

    def labels(
        self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int
    ) -> Iterator[np.ndarray]:
        clean = torch.as_tensor(np.asarray(image, dtype=np.float32), device=self.device)
        source = NoiseSource(seed, self.noise_backend)
        for first, size in batch_ranges(start, count, self.batch_size):
            noise = source.batch(first, size, clean.shape, self.device)
            with torch.inference_mode():
                labels = self.label_fn(to_rgb(add_noise(clean.unsqueeze(0), noise, sigma)))
            yield labels_to_numpy(labels)
