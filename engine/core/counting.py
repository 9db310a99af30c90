"""Streaming per-pixel counts for Algorithm 1, without ever materialising one-hot maps.

Selection keeps one small counter per (class, pixel): (K + 1) x H x W bytes for n0 <= 255, the extra row for
the invalid label K. Estimation keeps only the agreements with the guess: one counter per pixel.

The invalid label K (a sample whose model output was non-finite at that pixel, see ``certseg.engine.maths.stages``)
fails closed: it never becomes a guess (the mode is taken over the K real classes) and never equals one, so
it can only count as a disagreement. Both counters tally it, for the record and for ``--non-finite fail``.

Label batches may be numpy arrays or torch tensors on any device. The first batch fixes where a counter counts:
for tensors the counts, the invalid tallies and the label range check stay on the tensors' device and nothing
comes back per batch (no synchronisation), only the final counts when they are read (``mode``, ``agree``,
``invalid.samples``). A label above K found on a device raises there, when the counts are read, before any
certificate can use them. Both paths give identical counts, guesses (ties toward the lowest class) and tallies.

torch is imported only where a tensor is counted: a client of a server, whose label maps are numpy arrays,
counts without it (no tensor can exist before torch is imported, so ``_is_tensor`` does not import it).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from certseg.engine.labels import label_numpy_dtype

if TYPE_CHECKING:
    import torch

LabelBatch: TypeAlias = "np.ndarray | torch.Tensor"
"""(B, H, W) integer label maps: classes 0..K-1, or K where a sample's output was non-finite."""


def _counter_dtype(max_count: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor; never imports torch (without it loaded, nothing is a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _device_counter_dtype(max_count: int) -> torch.dtype:
    """int32 (every device adds it atomically) while it holds ``max_count``, else int64."""
    import torch

    return torch.int32 if max_count <= torch.iinfo(torch.int32).max else torch.int64


def _as_label_batch(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape[1:] != shape:
        raise ValueError(f"label maps have shape {labels.shape[1:]}, expected {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label maps must be integers, got dtype {labels.dtype}")
    return labels


def _as_label_tensor(labels: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    if tuple(labels.shape[1:]) != shape:
        raise ValueError(f"label maps have shape {tuple(labels.shape[1:])}, expected {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"label maps must be integers, got dtype {labels.dtype}")
    return labels.detach()


class InvalidTally:
    """How many samples, and (sample, pixel) pairs, carried the invalid label K.

    Host maps are checked and counted at once; device batches accumulate on their device (with the largest and
    smallest label seen) and are checked when a figure is read.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self._samples = 0
        self._pixel_samples = 0
        self._device: dict[str, torch.Tensor] | None = None

    def add(self, label_map: np.ndarray, num_classes: int, largest: int) -> None:
        """Count one map's invalid pixels; ``largest`` is its maximum label (already computed by the caller)."""
        if largest > num_classes:
            raise ValueError(f"label {largest} > num_classes={num_classes} (the invalid label is {num_classes})")
        if largest == num_classes:
            self._samples += 1
            self._pixel_samples += int(np.count_nonzero(label_map == num_classes))

    def add_batch(self, labels: torch.Tensor, num_classes: int) -> None:
        """Count a (B, H, W) device batch on its device; its range is checked when the tally is read."""
        import torch

        self.num_classes = num_classes
        if labels.numel() == 0:
            return
        flat = labels.reshape(len(labels), -1)
        per_sample = (flat == num_classes).sum(dim=1)
        batch = {
            "samples": (per_sample > 0).sum(),
            "pixel_samples": per_sample.sum(),
            "largest": flat.max().to(torch.int64),
            "smallest": flat.min().to(torch.int64),
        }
        if self._device is None:
            self._device = batch
            return
        device = self._device
        device["samples"] += batch["samples"]
        device["pixel_samples"] += batch["pixel_samples"]
        device["largest"] = torch.maximum(device["largest"], batch["largest"])
        device["smallest"] = torch.minimum(device["smallest"], batch["smallest"])

    def check(self) -> None:
        """Raise if a device batch held a label outside 0..K (one synchronisation)."""
        if self._device is None:
            return
        import torch

        largest, smallest = (int(v) for v in torch.stack([self._device["largest"], self._device["smallest"]]).cpu())
        if largest > self.num_classes:
            raise ValueError(
                f"label {largest} > num_classes={self.num_classes} (the invalid label is {self.num_classes})")
        if smallest < 0:
            raise ValueError(f"label {smallest} < 0: labels are classes 0..{self.num_classes}")

    @property
    def samples(self) -> int:
        return self._samples + self._device_figure("samples")

    @property
    def pixel_samples(self) -> int:
        return self._pixel_samples + self._device_figure("pixel_samples")

    def _device_figure(self, name: str) -> int:
        if self._device is None:
            return 0
        self.check()
        return int(self._device[name])


class _DeviceBound:
    """Where a counter counts: fixed by the first batch (numpy → host, tensor → that tensor's device)."""

    device: torch.device | None = None
    """None: numpy counts on the host."""
    _kind_fixed = False

    def _route(self, labels: LabelBatch) -> LabelBatch:
        """The batch in this counter's form (a later batch of the other kind is moved, never the counts)."""
        if not self._kind_fixed:
            self._kind_fixed = True
            if _is_tensor(labels):
                self.device = labels.device
                self._to_device()
        if self.device is None:
            if _is_tensor(labels):
                return labels.detach().cpu().numpy()
            return labels
        if _is_tensor(labels):
            return labels.to(self.device)
        import torch

        return torch.as_tensor(np.asarray(labels), device=self.device)

    def _to_device(self) -> None:
        raise NotImplementedError


class ModeCounter(_DeviceBound):
    """Per-pixel class histogram over the n0 selection samples; ``mode()`` breaks ties toward the lowest class id."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], max_samples: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.num_pixels = int(np.prod(self.shape))
        self.max_samples = max_samples
        self._counts = np.zeros((num_classes + 1, self.num_pixels), dtype=_counter_dtype(max_samples))
        """Rows 0..K-1: votes per class; row K: invalid samples at that pixel (a tensor once on a device)."""
        self._device_counts: torch.Tensor | None = None
        self.num_samples = 0
        self.invalid = InvalidTally(num_classes)
        self._pixel = np.arange(self.num_pixels, dtype=np.intp)
        self.guess_tensor: torch.Tensor | None = None
        """The last ``mode()`` on the counting device, for an ``AgreementCounter`` there (no round trip)."""

    def _to_device(self) -> None:
        import torch

        self._counts = np.zeros((0, 0), dtype=self._counts.dtype)  # the host copy is never used on a device
        self._device_counts = torch.zeros(
            (self.num_classes + 1, self.num_pixels), dtype=_device_counter_dtype(self.max_samples), device=self.device)
        self._device_pixel = torch.arange(self.num_pixels, dtype=torch.int64, device=self.device)
        self._device_ones = torch.ones(self.num_pixels, dtype=self._device_counts.dtype, device=self.device)

    @property
    def counts(self) -> np.ndarray:
        """(K + 1, H·W) votes per class and the invalid row, on the host (brought back if counted on a device)."""
        if self._device_counts is None:
            return self._counts
        self.invalid.check()
        return self._device_counts.cpu().numpy().astype(_counter_dtype(self.max_samples))

    def update(self, labels: LabelBatch) -> None:
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} selection samples")
        labels = self._route(labels)
        if self.device is not None:
            self._update_device(_as_label_tensor(labels, self.shape))
            return
        labels = _as_label_batch(labels, self.shape)
        flat_counts = self._counts.reshape(-1)
        for label_map in labels.reshape(len(labels), -1):
            if label_map.size:
                self.invalid.add(label_map, self.num_classes, int(label_map.max()))
            # Each pixel appears once per map, so the fancy-indexed increment has no duplicate indices.
            flat_counts[label_map.astype(np.intp) * self.num_pixels + self._pixel] += 1
        self.num_samples += len(labels)

    def _update_device(self, labels: torch.Tensor) -> None:
        import torch

        self.invalid.add_batch(labels, self.num_classes)
        flat_counts = self._device_counts.view(-1)
        # Out-of-range labels are clamped only so the indices stay inside the counts; the tally's range check
        # raises for them before any count is read.
        rows = labels.reshape(len(labels), -1).to(torch.int64).clamp_(0, self.num_classes)
        for row in rows:  # one map at a time: no duplicate index within an index_add
            flat_counts.index_add_(0, row * self.num_pixels + self._device_pixel, self._device_ones)
        self.num_samples += len(labels)

    def mode(self) -> np.ndarray:
        """Most frequent real class per pixel (argmax returns the first maximum, i.e. the lowest class id).

        Invalid votes are left out, so the guess is always a class; a pixel whose every selection sample was
        invalid gets class 0, which the estimation samples then have to confirm on their own.
        """
        if self.num_samples == 0:
            raise ValueError("no selection samples were counted")
        dtype = label_numpy_dtype(self.num_classes)
        if self._device_counts is None:
            guess = self._counts[: self.num_classes].argmax(axis=0)
            return guess.astype(dtype).reshape(self.shape)
        self.invalid.check()
        import torch

        # torch.argmax, like numpy's, returns the first maximal index: ties go to the lowest class id.
        self.guess_tensor = self._device_counts[: self.num_classes].argmax(dim=0).reshape(self.shape)
        narrow = torch.uint8 if dtype == np.uint8 else torch.int32  # a quarter or half of int64's bytes to move
        return self.guess_tensor.to(narrow).cpu().numpy().astype(dtype)


class AgreementCounter(_DeviceBound):
    """Per-pixel number of estimation samples whose label equals the guess (the invalid label K never does)."""

    def __init__(
        self, guess: np.ndarray | torch.Tensor, max_samples: int, num_classes: int,
        *, device_guess: torch.Tensor | None = None,
    ) -> None:
        """``device_guess``: the same guess already on the counting device (``ModeCounter.guess_tensor``)."""
        self._guess_tensor = guess if _is_tensor(guess) else device_guess
        self.guess = guess.detach().cpu().numpy() if _is_tensor(guess) else np.asarray(guess)
        if self.guess.size and int(self.guess.max()) >= num_classes:
            raise ValueError(f"guess holds {int(self.guess.max())}, not a class of {num_classes}")
        if self.guess.size and int(self.guess.min()) < 0:
            raise ValueError(f"guess holds {int(self.guess.min())}, not a class of {num_classes}")
        self.num_classes = num_classes
        self.shape = self.guess.shape
        self.max_samples = max_samples
        self._agree = np.zeros(self.shape, dtype=_counter_dtype(max_samples))
        self._device_agree: torch.Tensor | None = None
        self.num_samples = 0
        self.invalid = InvalidTally(num_classes)

    def _to_device(self) -> None:
        import torch

        guess = self._guess_tensor if self._guess_tensor is not None else torch.as_tensor(self.guess)
        self._device_guess = guess.to(self.device, dtype=torch.int64).reshape(self.shape)
        self._device_agree = torch.zeros(self.shape, dtype=_device_counter_dtype(self.max_samples), device=self.device)

    @property
    def agree(self) -> np.ndarray:
        """Agreements per pixel on the host (brought back, once per read, if counted on a device)."""
        if self._device_agree is None:
            return self._agree
        self.invalid.check()
        return self._device_agree.cpu().numpy().astype(_counter_dtype(self.max_samples))

    def update(self, labels: LabelBatch) -> None:
        if self.num_samples + len(labels) > self.max_samples:
            raise ValueError(f"more than the declared {self.max_samples} estimation samples")
        labels = self._route(labels)
        if self.device is not None:
            labels = _as_label_tensor(labels, self.shape)
            self.invalid.add_batch(labels, self.num_classes)
            self._device_agree += (labels == self._device_guess).sum(dim=0, dtype=self._device_agree.dtype)
            self.num_samples += len(labels)
            return
        labels = _as_label_batch(labels, self.shape)
        for label_map in labels:
            if label_map.size:
                self.invalid.add(label_map, self.num_classes, int(label_map.max()))
            self._agree += label_map == self.guess
        self.num_samples += len(labels)
