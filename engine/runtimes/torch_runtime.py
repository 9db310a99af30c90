"""In-process PyTorch runtime: the label pipeline on CPU or CUDA, fp32 or fp16/bf16 autocast, eager or compiled,
batched."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from certseg.engine.choices import NoiseBackend, Precision, choice
from certseg.engine.core.sampling import LabelFn, LocalRuntime
from certseg.engine.maths.denoise import NoiseFn
from certseg.engine.maths.label_pipeline import LabelPhases, LabelPipeline
from certseg.engine.maths.stages import argmax_or_invalid
from certseg.engine.runtimes import aoti_runner

AUTOCAST: dict[Precision, torch.dtype | None] = {
    Precision.fp32: None, Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}
"""The autocast dtype of each precision (fp32: autocast off)."""


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" → CUDA when available, else CPU; a clear error for a CUDA request without a GPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


RECOMPILE_LIMIT = 64
"""Compiled graphs kept per model forward (one per image size and batch shape in a process). Past it, torch would
fall back to eager silently; certseg makes that an error instead, so a record that says compiled is true."""


INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def use_certseg_inductor_cache() -> None:
    """Point inductor's disk cache into certseg's cache folder unless the user chose a folder. torch writes its
    default (a per-user temporary folder) into the variable the first time anything asks, which happens before
    certseg compiles (the memory probe, dynamo's import), so that default counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from certseg.engine.cache import cache_dir

    current = os.environ.get(INDUCTOR_CACHE)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[INDUCTOR_CACHE] = str(cache_dir() / "inductor")


def compile_model(module: nn.Module, dtype: torch.dtype | None = None, device_type: str = "cpu") -> nn.Module:
    """``module`` compiled ahead of time by AOTInductor (``aot_compile.AotCompiled``), one package per input
    signature, cached on disk under certseg's cache folder; it runs under ``torch.autocast(device_type, dtype)``
    (``dtype`` None: fp32), compiled in.

    Why compile: inductor fuses the elementwise work between convolutions (batch norms, activations, the additions of
    HRNet's fuse layers) into the kernels around them (measured on the shipped HRNet, one CPU thread, 1024×2048,
    one sample, min of 3: 1.37 → 1.03 s in fp32, 0.70 → 0.54 s under bf16 autocast, with ``torch.compile``).
    Sessions now fold the batch norms into the convolutions before compiling (``Settings.fold_batchnorm``), which
    took most of that gain at fp32: SegCertify 1024×2048 end to end, folded, 102.8 s eager against 103.4 s compiled.
    Why ahead of time: ``torch.compile``'s first call in a fresh process traces the bytecode, loads its cache and
    builds guards even with a warm inductor cache; a package skips all of it. Measured on the shipped HRNet, one
    CPU thread, 1024×2048, one sample, bf16, each in a fresh process: the first call with the package on disk
    0.65-0.67 s (3 processes; a later call is 0.55-0.59 s, so loading costs about 0.1 s) against 4.3-4.5 s with
    ``torch.compile``'s warm cache; per call (min of 3) 0.546-0.591 s against 0.559-0.567 s (the same kernels,
    within the machine's noise); building the package (export, compile, first call) 36.0 s from an empty cache
    folder (29.9 s with inductor's cache warm) against ``torch.compile``'s cold 36.0 s. Argmax agreement with
    eager bf16: 99.99% of pixels on random input.
    The package reads the module's own weights (no copy; see ``aot_compile``): weights are not frozen into the
    graph (with ``torch.compile``, freezing ran no faster here, 0.571 vs 0.573 s, bf16, and doubled the compile
    time). The compiled model is another classifier in the last bits (fused kernels round in another
    order), which the JSON records (``compile``); the stage maths stay eager around it, but for the label step
    (``compiled_argmax``), which checks the scores itself. A module ``torch.export`` cannot trace runs through
    ``torch.compile`` instead (one line on stderr says so).
    """
    from certseg.engine.runtimes.aot_compile import AotCompiled

    use_certseg_inductor_cache()
    return AotCompiled(module, dtype, device_type, fallback=_compiled)


def _compiled(target: Callable[..., Any]) -> Any:
    """``target`` through ``torch.compile`` with certseg's settings: inductor, static shapes, certseg's disk cache,
    and an error (not a silent fall-back to eager) past ``RECOMPILE_LIMIT`` shapes."""
    use_certseg_inductor_cache()
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True
    return torch.compile(target, dynamic=False)


def compiled_argmax() -> Callable[[torch.Tensor], torch.Tensor]:
    """``stages.argmax_or_invalid`` compiled: the label step of a compiled pipeline.

    Why: after a compiled model, the eager upsample-and-argmax was the largest cost outside the models (shipped
    HRNet, 1024×2048, one thread, min of 7 calls: 70 ms per sample, with the model at 0.5 s under bf16); with the
    argmax and the finite check fused into one pass over the upsampled scores it is 31 ms. The labels equal the
    eager argmax's wherever the scores are finite; the invalid pixels are those whose upsampled scores are not.
    """
    return _compiled(argmax_or_invalid)


def compiled_pipeline(pipeline: LabelPipeline, dtype: torch.dtype | None = None,
                      device_type: str = "cpu") -> LabelPipeline:
    """The same spec and stage maths with each model compiled (``compile_model``, under autocast to ``dtype``)
    and the label step fused (``compiled_argmax``); the models' weights are shared."""
    denoiser = None if pipeline.denoiser is None else compile_model(pipeline.denoiser, dtype, device_type)
    compiled = LabelPipeline(pipeline.spec, compile_model(pipeline.segmenter, dtype, device_type), denoiser).eval()
    compiled.argmax = compiled_argmax()
    return compiled


def autocast_label_fn(
    pipeline: LabelPipeline, device: torch.device, precision: Precision | str = Precision.fp32,
    channels_last: bool = True, compile: bool = False,
) -> LabelFn:
    """Wrap the pipeline so the models run under autocast; stage maths outside the models stays in fp32.

    ``channels_last`` (NHWC) is the layout oneDNN and cuDNN convolutions run fastest in (measured on the
    shipped models on CPU: 1.1-1.3x in fp32, about 2x with bf16); it changes no maths, only the summation
    order inside kernels. The function says so (``memory_format``), and ``LocalRuntime`` forms its noisy batches
    in that layout, so the conversion here is a no-op for them rather than a copy of the whole batch.
    """
    dtype = AUTOCAST[choice(Precision, precision, "precision")]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    pipeline = pipeline.to(device, memory_format=memory_format).eval()
    if compile:
        pipeline = compiled_pipeline(pipeline, dtype, device.type)

    def autocast() -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def label_fn(noisy: torch.Tensor, reverse_noise: NoiseFn | None = None) -> torch.Tensor:
        with autocast():
            return pipeline(noisy.contiguous(memory_format=memory_format), reverse_noise)

    # The same calls cut into phases (``LocalRuntime`` runs prepare and labels in another thread on CPU); autocast
    # is per thread, so each phase enters it itself.
    def prepare(noisy: torch.Tensor) -> torch.Tensor:
        with autocast():
            return pipeline.prepare(noisy.contiguous(memory_format=memory_format))

    def scores(prepared: torch.Tensor, reverse_noise: NoiseFn | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast():
            return pipeline.scores(prepared, reverse_noise)

    def labels(logits: torch.Tensor, valid: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        with autocast():
            return pipeline.labels(logits, valid, size)

    # Compiled models overlap only through certseg's runner: torch's AOTInductor runner holds the GIL for its whole
    # call (a Python thread ran at 1.6% of its idle rate during one), so the helper thread would wait for each call
    # to end (shipped HRNet, SegCertify 1024×2048, bf16, one thread: 70.9 s overlapped, 61.6 s not).
    if not compile or aoti_runner.native_runner() is not None:
        label_fn.phases = LabelPhases(prepare, scores, labels)  # type: ignore[attr-defined]  # read by LocalRuntime
    label_fn.pipeline = pipeline  # type: ignore[attr-defined]  # the one it runs (compiled models, with compile)
    label_fn.memory_format = memory_format  # type: ignore[attr-defined]  # read by sampling.input_memory_format
    label_fn.takes_reverse_noise = True  # type: ignore[attr-defined]  # read by sampling.takes_reverse_noise
    return label_fn


def torch_runtime(
    pipeline: LabelPipeline,
    *,
    device: torch.device,
    precision: Precision | str = Precision.fp32,
    batch_size: int = 16,
    noise_backend: NoiseBackend | str = NoiseBackend.numpy_philox,
    keep_labels_on_device: bool = False,
    compile: bool = False,
    model_batch: int | None = None,
) -> LocalRuntime:
    """The sampling contract on the torch pipeline; ``keep_labels_on_device`` yields torch label maps on ``device``;
    ``compile``: the models run compiled (``compile_model``); ``model_batch``: the most samples per model call."""
    label_fn = autocast_label_fn(pipeline, device, precision, compile=compile)
    # The pipeline observers hook (the bench's stage timer) is the one that runs: with ``compile``, hooks on the
    # compiled wrappers, outside the graphs; hooks on the inner models would be traced into them (graph breaks).
    return LocalRuntime(label_fn, batch_size=batch_size, device=device, noise_backend=noise_backend,
                        pipeline=label_fn.pipeline, keep_labels_on_device=keep_labels_on_device,
                        model_batch=model_batch)
