"""An ONNX graph as a torch module, so ``LabelPipeline`` runs ONNX Runtime models where it runs torch ones.

The segmenter and denoiser are the only parts that run in ONNX Runtime; the stage maths around them stays torch
(``certseg.engine.maths``), so an ORT pipeline cannot drift from the torch one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certseg.engine.errors import InputError, ModelError, first_line

_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
}


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu), then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def make_session(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None):
    """An ``InferenceSession`` for ``path``; ``threads`` caps intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs log a warning per Sin/Cos it cannot pre-fold
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
    except Exception as error:  # ORT raises its own exception types; one line for users
        raise InputError(f"onnxruntime cannot load {path}: {first_line(error)}") from None


class OrtModule(nn.Module):
    """An ONNX graph as a parameter-free ``nn.Module``: torch tensors in, torch tensors out.

    Being a module (not a bare callable) lets it sit where ``LabelPipeline`` expects its models: ``.to()``,
    ``.eval()`` and ``state_dict()`` work and do nothing. Inputs are cast to the graph's declared dtypes;
    outputs come back on the first input's device. Fixed (non-dynamic) input dims are checked up front, so a
    graph exported at another size fails with a clear message instead of an ORT shape error; outputs must have
    the inputs' batch and the fixed dims the graph declares. ``input_order`` names the graph inputs in the
    order ``forward`` receives them (default: the graph's own order). A failure inside onnxruntime is one
    ``ModelError`` line naming the file and the input shapes.
    """

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
        input_order: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = make_session(self.path, providers, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        order = list(input_order) if input_order is not None else list(inputs)
        if sorted(order) != sorted(inputs):
            raise InputError(f"{self.path.name} has inputs {sorted(inputs)}, expected {sorted(order)}")
        self.input_names = order
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = [_NUMPY_TYPES.get(inputs[name].type, np.float32) for name in order]
        self._input_shapes = [list(inputs[name].shape) for name in order]
        self._output_shapes = [list(o.shape) for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _check_shape(self, index: int, shape: Sequence[int]) -> None:
        expected = self._input_shapes[index]
        fixed_ok = all(not isinstance(e, int) or e == s for e, s in zip(expected, shape, strict=False))
        if len(expected) != len(shape) or not fixed_ok:
            shown = tuple(e if isinstance(e, int) else str(e) for e in expected)
            raise InputError(
                f"{self.path.name} expects {self.input_names[index]} of shape {shown}, got {tuple(shape)}"
                " (fixed dims are the size it was exported at; re-export with the deployment's --image-size)"
            )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.path.name} takes {len(self.input_names)} inputs, got {len(inputs)}")
        feeds = {}
        for index, (name, dtype, tensor) in enumerate(zip(self.input_names, self._input_types, inputs, strict=True)):
            self._check_shape(index, tensor.shape)
            feeds[name] = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as error:  # onnxruntime's own exception types derive from Exception only
            shapes = ", ".join(f"{name} {tuple(feeds[name].shape)}" for name in self.input_names)
            raise ModelError(f"{self.path.name}: onnxruntime failed on {shapes}: {first_line(error)}") from None
        for name, declared, value in zip(self.output_names, self._output_shapes, outputs, strict=True):
            self._check_output(name, declared, np.shape(value), len(inputs[0]))
        device = inputs[0].device
        tensors = tuple(torch.from_numpy(np.asarray(o)).to(device) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _check_output(self, name: str, declared: Sequence[int | str | None], shape: Sequence[int], batch: int) -> None:
        if not declared:  # a graph that does not declare this output's shape
            return
        fixed_ok = all(not isinstance(d, int) or d == s for d, s in zip(declared, shape, strict=False))
        if len(declared) != len(shape) or not fixed_ok or shape[0] != batch:
            shown = tuple(d if isinstance(d, int) else str(d) for d in declared)
            raise ModelError(f"{self.path.name}: output {name} came back {tuple(shape)} for a batch of {batch} (its "
                             f"shape in the graph: {shown}); an output's dim 0 must be the batch, and fixed dims hold")

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, providers={self.providers}"
