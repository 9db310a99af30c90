"""Convolutions with their ReLU and residual add done in the same pass (oneDNN post-ops), for CPU fp32 inference.

Why: with BatchNorm folded (``fold_batchnorm``), what is left of HRNet's time besides the 3x3 convolutions is
memory-bound passes over activations: a ReLU after a convolution, a residual ``out + x`` and its ReLU, each reading
and writing a whole tensor. oneDNN, which runs torch's CPU convolutions, can apply them to each output tile while it
is still in cache (its "post-ops"); torch exposes that as ``torch.ops.mkldnn._convolution_pointwise``, the kernels
its own inductor compiler emits for the same pattern. The convolution is the same, the add rounds once as the
separate operator does and the ReLU is exact, so outputs are those of the unfused model up to the convolution
algorithm oneDNN picks for the call, which it also picks for ``F.conv2d`` on these shapes (the shipped HRNet:
identical bits, measured).

Only where the kernels exist and nothing needs what they lack: a CPU float32 tensor, no autocast, no gradient (they
have no backward), and not while tracing, exporting or compiling (a graph should see the plain operators).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

_POINTWISE = "_convolution_pointwise"


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the fused kernels can run ``conv`` on ``x`` (see the module docstring)."""
    return (
        x.device.type == "cpu"
        and x.dtype == conv.weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, _POINTWISE)
        and hasattr(torch.ops.mkldnn, _POINTWISE + "_")
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused convolutions take zero padding given as sizes, not {conv.padding_mode!r} "
                         f"{conv.padding!r}")
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv2d(conv: nn.Conv2d, x: torch.Tensor, relu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(conv(x) + add)``, each part optional, in one oneDNN call. ``add`` is read, not written."""
    padding, stride, dilation, groups = _geometry(conv)
    if add is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, conv.weight, conv.bias, padding, stride, dilation, groups, "add", None,
            "relu" if relu else None, [], None)
    if relu:
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, padding, stride, dilation, groups, "relu", [], "")
    # No post-op (oneDNN has no "none" attribute): its plain convolution; on the 1x1 convolutions faster than the
    # path F.conv2d takes there (at 256x512, one thread: 64->128 channels 23 ms against 28, 16->64 3.0 against 5.0).
    return torch.mkldnn_convolution(x, conv.weight, conv.bias, padding, stride, dilation, groups)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution (stride 1) by weights alone (HRNet's factored head convolves with slices of one)."""
    return torch.mkldnn_convolution(x, weight, bias, [0, 0], [1, 1], [1, 1], 1)


def conv1x1_add_relu_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``out = relu(conv1x1(x) + out)`` in one pass, written into ``out`` (oneDNN's in-place binary add): no new
    tensor of the output's size where ``out`` is contiguous in ``x``'s memory format (a band of rows of one sample
    is); any other ``out`` (a view, another layout) torch computes into a copy and writes back."""
    torch.ops.mkldnn._convolution_pointwise_.binary(out, x, weight, bias, [0, 0], [1, 1], [1, 1], 1, "add", 1.0,
                                                     "relu", [], None)
    return out


def _chain(layers: nn.Module) -> Iterator[nn.Module]:
    """The convolutions and ReLUs of a (nested) ``nn.Sequential``, folded norms (``nn.Identity``) left out."""
    for layer in layers.children() if isinstance(layers, nn.Sequential) else (layers,):
        if isinstance(layer, nn.Sequential):
            yield from _chain(layer)
        elif isinstance(layer, nn.Conv2d | nn.ReLU):
            yield layer
        elif not isinstance(layer, nn.Identity):
            raise TypeError(f"cannot fuse a {type(layer).__name__}: only Conv2d, ReLU and folded norms (Identity)")


def sequential(layers: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """A chain of convolutions, each optionally followed by a ReLU, with ``add`` added to the last convolution's
    output (before its ReLU, if it has one), each convolution and what follows it in one call."""
    chain = list(_chain(layers))
    i = 0
    while i < len(chain):
        conv = chain[i]
        if not isinstance(conv, nn.Conv2d):
            raise TypeError("a ReLU must follow a convolution to be fused")
        relu = i + 1 < len(chain) and isinstance(chain[i + 1], nn.ReLU)
        i += 2 if relu else 1
        x = conv2d(conv, x, relu=relu, add=add if i >= len(chain) else None)
    return x


def add_relu(y: torch.Tensor, other: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``relu(y + other)`` in one pass (into ``y`` if ``inplace``)."""
    if inplace:
        return torch.ops.aten._add_relu_(y, other)
    return torch.ops.aten._add_relu(y, other)

