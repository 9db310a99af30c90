"""The bytes live torch tensors hold, op by op: what the memory estimate's probe runs measure.

Its own module because it subclasses torch's dispatch mode: ``certseg.engine.runtimes.memory``, which clients of a
server import too, loads it (and torch) only when it probes a pipeline in this process.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """The bytes held by live tensors that torch ops create while the mode is active, after every op.

    Every op's output storage is counted once (views share it) until the last tensor using it is gone, so this
    is the real occupancy of the tensors over time, not a sum of module outputs. Tensors made outside torch ops
    (``torch.from_numpy``) are not seen: the noise drawn by numpy is added separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.timeline: list[int] = []
        """``current`` right after each op's outputs exist (frees in between only lower it)."""
        self._storages: dict[tuple[str, int], list[int]] = {}
        self._seen: set[int] = set()

    @property
    def peak(self) -> int:
        return max(self.timeline, default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's protocol
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        self.timeline.append(self.current)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self._seen or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = (str(tensor.device), storage.data_ptr()), storage.nbytes()
        if size == 0:
            return
        if key not in self._storages:
            self._storages[key] = [0, size]
            self.current += size
        self._storages[key][0] += 1
        self._seen.add(id(tensor))
        weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: tuple[str, int], tensor_id: int) -> None:
        self._seen.discard(tensor_id)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._storages[key]


def tensor_timeline(run: Callable[[], object]) -> list[int]:
    """Bytes of live tensors after each torch op of ``run``."""
    with LiveTensorBytes() as tracker:
        run()
    return tracker.timeline
