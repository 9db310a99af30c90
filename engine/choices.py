"""Every closed set of names certseg takes (method, FWER, t* rule, ...): one StrEnum each, for the library and the CLIs.

A member is its string: ``Fwer.holm == "holm"``, it hashes like ``"holm"``, ``str()`` and f-strings give ``holm``
and ``json.dumps`` writes ``"holm"``; so a plain string is accepted wherever a member is, and JSON records read the
same as before the enums existed. Typer turns each into the choices of its option.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

C = TypeVar("C", bound=StrEnum)


class Method(StrEnum):
    """SegCertify segments the noisy samples; DenoiseCertify denoises them in one diffusion step first."""

    segcertify = "segcertify"
    denoisecertify = "denoisecertify"


class Fwer(StrEnum):
    """Family-wise error control over the pixels' tests."""

    holm = "holm"
    bonferroni = "bonferroni"


class TimestepRule(StrEnum):
    """How DenoiseCertify's t* is matched to the noise that reaches the denoiser (``certseg.engine.maths.denoise``)."""

    principled = "principled"
    authors = "authors"
    dds_2sigma = "dds-2sigma"
    """DDS's published rule as DDS applied it (no resize): 145, 259, 396 for σ = 0.25, 0.5, 1, at any image size."""
    dds_resized = "dds-resized"
    """DDS's criterion on the noise that reaches the denoiser after the resize (73, 145, 259 at 1024×2048)."""


class Precision(StrEnum):
    """The models' arithmetic: fp32, fp16 / bf16 autocast (ONNX: fp16 graphs), or int8 (ONNX Runtime static
    quantisation: ``certseg.export.int8``)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class NoiseBackend(StrEnum):
    """numpy-philox: bit-identical noise on every runtime; torch: drawn on the device."""

    numpy_philox = "numpy-philox"
    torch = "torch"


class RuntimeName(StrEnum):
    """What runs the label pipeline: PyTorch or ONNX Runtime in this process, or Triton servers."""

    torch = "torch"
    onnx = "onnx"
    triton = "triton"


class NonFinitePolicy(StrEnum):
    """NaN/Inf model outputs: their pixels count as disagreements (abstain), or the run stops (fail)."""

    abstain = "abstain"
    fail = "fail"


class SharedMemory(StrEnum):
    """System shared memory between this process and Triton servers on the same machine."""

    auto = "auto"
    on = "on"
    off = "off"


class Profile(StrEnum):
    """A Triton model repository's profile: the bundled CPU server, or NVIDIA's GPU container."""

    cpu = "cpu"
    gpu = "gpu"


class Exporter(StrEnum):
    """The torch.onnx exporter: TorchScript tracing (legacy) or torch.export (dynamo)."""

    legacy = "legacy"
    dynamo = "dynamo"


class Dataset(StrEnum):
    """The datasets ``certseg-bench`` reads."""

    procedural = "procedural"
    cityscapes = "cityscapes"
    pascal_context = "pascal-context"


class Protocol(StrEnum):
    """How ``certseg-bench`` feeds a dataset's images to the certifier (``certseg.bench.protocols``)."""

    certseg = "certseg"
    peers = "peers"


def choice(kind: type[C], value: object, what: str, error: type[Exception] = ValueError) -> C:
    """``value`` (a member or its string) as a member of ``kind``; anything else is one line naming the choices."""
    for member in kind:
        if member == value:
            return member
    raise error(f"{what} must be one of {', '.join(kind)}, got {value!r}")
