"""The one description of how certificates are made: ``Settings``, shared by the library, ``certseg certify`` and
``certseg-bench``.

Each field carries its command-line help, and both commands build their engine options from these fields
(``certseg.engine.commands.cli_common.settings_options``), so a field added here is an option of both, with one default.
"""

from __future__ import annotations

import functools
import numbers
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from certseg.engine.choices import Fwer, Method, NoiseBackend, NonFinitePolicy, Precision, RuntimeName, TimestepRule
from certseg.engine.choices import choice as as_choice
from certseg.engine.errors import InputError

AUTO = "auto"
"""What ``--batch`` and ``--noise-backend`` take besides their values: let certseg decide (None in the field)."""


def _option(default: Any, help: str, *, auto: bool = False) -> Any:
    """A settings field with the help its command-line option shows; ``auto``: the option also takes ``auto``
    (None in the field), which the session resolves."""
    return field(default=default, metadata={"help": help, "auto": auto})


def default_runtime(*refs: str | None, precision: Precision | str = Precision.fp32) -> RuntimeName:
    """The in-process runtime when none is named: ONNX Runtime if a model is an ``.onnx`` file or the precision
    is int8 (only ONNX Runtime runs the int8 graphs), else torch."""
    onnx = any(ref is not None and str(ref).lower().endswith(".onnx") for ref in refs)
    return RuntimeName.onnx if onnx or precision == Precision.int8 else RuntimeName.torch


def runs_on_cuda(device: str | None) -> bool:
    """Whether ``device`` (None/"auto": CUDA when torch sees one) is a CUDA device; torch is imported only to ask."""
    if device in (None, AUTO):
        import torch

        return bool(torch.cuda.is_available())
    return str(device).split(":")[0] == "cuda"


def default_noise_backend(runtime: RuntimeName, device: str | None) -> NoiseBackend:
    """``--noise-backend auto``: torch generators on the device where torch runs on CUDA (no host draws, no copies
    to the device), else numpy-philox (ONNX Runtime and CPU runs keep their bit-identical noise)."""
    if runtime == RuntimeName.torch and runs_on_cuda(device):
        return NoiseBackend.torch
    return NoiseBackend.numpy_philox


BEFORE_ADDED: dict[str, Any] = {"fold_batchnorm": False, "factor_head": False}
"""What runs made before a field existed did, where that is not the field's default (a results header written then
lacks the key): such a run's certificates are those of this value, not of the default."""


@dataclass(frozen=True)
class Settings:
    """Everything besides the image and the seed that decides a certificate.

    Named choices are the enums of ``certseg.engine.choices``; their plain strings are accepted and converted.
    """

    method: Method = _option(Method.denoisecertify, "denoise first, or not")
    sigma: float = _option(0.25, "noise level σ in [0,1] pixel space")
    n0: int = _option(10, "selection samples (mode per pixel)")
    n: int = _option(100, "estimation samples (binomial test)")
    alpha: float = _option(0.001, "family-wise error level over all pixels")
    tau: float = _option(0.75, "agreement threshold τ; radius R = σ·Φ⁻¹(τ)")
    fwer: Fwer = _option(Fwer.holm, "FWER control")
    scale: float = _option(1.0, "segmenter input size as a fraction of the image size")
    t_rule: TimestepRule = _option(TimestepRule.principled, "how t* is matched to σ")
    antialias: bool = _option(False, "antialiased resizes (the authors used none)")
    segmenter: str | None = _option(
        None, "shipped model name, checkpoint path, or your own .onnx file (README: bring your own ONNX models)")
    denoiser: str | None = _option(None, "shipped model name, checkpoint path, or your own ε-prediction .onnx UNet")
    runtime: RuntimeName | None = _option(
        None, "in-process runtime (default: onnx when a model is an .onnx file or --precision int8, else torch)")
    """None until ``resolved``: ONNX Runtime when a model is an .onnx file or the precision int8, else torch."""
    device: str | None = _option(None, "cpu, cuda, cuda:1 (default: cuda if available)")
    precision: Precision = _option(
        Precision.fp32, "model precision: fp32; fp16/bf16 autocast (ONNX: fp16 graphs); int8: ONNX Runtime static "
        "quantisation, on --runtime onnx (its default runtime)")
    batch: int | None = _option(
        None, "samples per forward pass: auto (the largest, up to 4 on CPU and 64 on CUDA, whose memory estimate "
        "fits in part of the memory available; Triton: the server's) or N; the noise never depends on it, the "
        "models' last bits may (kernels differ per batch shape): the JSON records it", auto=True)
    """None (auto) until the session resolves it for an image size (``Session.batch_for``)."""
    noise_backend: NoiseBackend | None = _option(
        None, "auto: torch on CUDA, else numpy-philox; numpy-philox: identical on every runtime; torch: drawn on "
        "the device", auto=True)
    """None (auto) until ``resolved``: torch where torch runs on CUDA, else numpy-philox."""
    non_finite: NonFinitePolicy = _option(
        NonFinitePolicy.abstain,
        "NaN/Inf model outputs: their pixels count as disagreements (abstain) or the run stops (fail)")
    seg_mean: tuple[float, float, float] | None = _option(
        None, "segmenter input mean R G B, in its input range's units (default: what the model states)")
    seg_std: tuple[float, float, float] | None = _option(
        None, "segmenter input std R G B, in its input range's units (default: what the model states)")
    seg_input_size: tuple[int, int] | None = _option(
        None, "feed the segmenter H W whatever the image size (default: what the model states, else --scale)")
    classes: str | None = _option(
        None, "JSON class names (a list, or {\"classes\": [...], \"palette\": [[r, g, b], ...]}) replacing what the "
        "segmenter states")
    denoise_steps: int = _option(
        1, "denoisecertify: 1 = one-step denoising (the paper); K > 1 = K spaced ancestral steps from t* to 0, "
        "their noise drawn from each sample's own stream")
    compile: bool = _option(
        False, "torch runtime: run the models through torch.compile (inductor; compiled once per process, image "
        "size and batch shape, cached on disk): faster, another classifier in the last bits (the "
        "JSON records it)")
    fold_batchnorm: bool = _option(
        True, "torch runtime: fold each BatchNorm into the convolution before it (one pass fewer per norm; the same "
        "function up to float rounding, as channels-last already is; ONNX Runtime folds its graphs itself); HRNet "
        "then also runs each convolution with its ReLU and residual add in one call on CPU fp32")
    factor_head: bool = _option(
        True, "torch runtime, HRNet segmenters: convolve the head's wide low-resolution branches before upsampling "
        "them, not after (upsampling and a 1x1 convolution commute: the same function up to float rounding, "
        "14% less time per call on the shipped HRNet at 1024x2048)")

    def __post_init__(self) -> None:
        """Plain strings become their enum members (an unknown one is refused here, in one line); ``"auto"``
        becomes None where a field takes it."""
        for name in _auto_fields():
            if getattr(self, name) == AUTO:
                object.__setattr__(self, name, None)
        for name, kind in _choice_fields().items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_choice(kind, value, name, InputError))

    def resolved(self) -> Settings:
        """These settings with the runtime decided (``default_runtime`` of the models when none is named) and the
        noise backend (``default_noise_backend`` when auto). The batch stays auto: it depends on the image size
        and the memory, so the session resolves it (``Session.batch_for``)."""
        runtime = self.runtime or default_runtime(self.segmenter, self.denoiser, precision=self.precision)
        noise = self.noise_backend or default_noise_backend(runtime, self.device)
        if runtime is self.runtime and noise is self.noise_backend:
            return self
        return replace(self, runtime=runtime, noise_backend=noise)

    @property
    def folds_batchnorm(self) -> bool:
        """Whether the models run with their BatchNorms folded: asked for, and run by torch (ONNX Runtime folds its
        graphs itself, which are exported from the unfolded weights; servers run their repository's graphs)."""
        return self.fold_batchnorm and self.resolved().runtime == RuntimeName.torch

    @property
    def factors_head(self) -> bool:
        """Whether HRNet segmenters run with their head factored (``HRNetV2.factor_head``): asked for, and run by
        torch (ONNX graphs are exported in the official order; servers run their repository's graphs)."""
        return self.factor_head and self.resolved().runtime == RuntimeName.torch

    def record(self) -> dict[str, Any]:
        """JSON-ready: every field by name, choices as their plain strings."""
        return {k: v.value if isinstance(v, StrEnum) else v for k, v in asdict(self).items()}

    def validate(self, num_pixels: int) -> None:
        from certseg.engine.core.certify import validate_parameters

        validate_parameters(
            n0=self.n0, n=self.n, tau=self.tau, alpha=self.alpha, num_pixels=num_pixels, fwer=self.fwer,
            sigma=self.sigma,
        )
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, numbers.Integral)
                                       or self.batch < 1):
            raise InputError(f"batch must be auto or an integer >= 1, got {self.batch!r}")
        if self.scale <= 0:
            raise InputError(f"scale must be > 0, got {self.scale}")


@functools.cache
def setting_types() -> dict[str, Any]:
    """Each field's type, resolved (``Settings`` is annotated with strings)."""
    return typing.get_type_hints(Settings)


@functools.cache
def _auto_fields() -> tuple[str, ...]:
    """The fields that take ``auto`` (None)."""
    return tuple(f.name for f in fields(Settings) if f.metadata.get("auto"))


@functools.cache
def _choice_fields() -> dict[str, type[StrEnum]]:
    """The fields whose values are named choices, and their enum."""
    out = {}
    for name, hint in setting_types().items():
        kinds = [t for t in typing.get_args(hint) or (hint,) if isinstance(t, type) and issubclass(t, StrEnum)]
        if kinds:
            out[name] = kinds[0]
    return out
