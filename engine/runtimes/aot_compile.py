"""Ahead-of-time compiled models (AOTInductor), kept on disk between processes.

``AotCompiled(module, dtype, device_type)`` is an ``nn.Module`` (so forward hooks, such as the bench's stage timer,
fire on it) that runs ``module`` under ``torch.autocast(device_type, dtype)`` (``dtype`` None: fp32) as code
compiled ahead of time, one package per input signature. A call's signature is, for each tensor argument, its shape,
stride, dtype and device (another layout is another package: a runner is never fed a stride it was not compiled
for), and each other argument's value. The first call of a signature in a process loads
``cache_dir()/aoti/<digest>.pt2``, or builds it first (``torch.export`` + ``aoti_compile_and_package``, written to a
temporary file beside it and renamed into place, so a package is whole or absent). The digest covers what changes
the compiled code: the signature, the autocast dtype and device type, torch's version, the CPU's vector capability
and torch's thread count (the CUDA device's name and capability on CUDA), the module's class and ``repr``, the plain
attributes (numbers, strings) of each submodule, a sha256 over the state dict (names, shapes, strides, dtypes,
bytes; computed once per module object), and a sha256 over the sources of ``certseg/engine/models/*.py``. What the
digest cannot see goes unnoticed: an edited forward defined outside those sources (clear ``cache_dir()/aoti``),
weights changed in place after the module's first compiled call (compile a module once its weights are loaded).

Why: ``torch.compile``'s first call in a fresh process traces the bytecode, loads its cache and builds guards
even with a warm inductor cache (4.3-4.5 s for the shipped HRNet at 1024×2048, bf16, one thread); the first call
of a package on disk is 0.65-0.67 s, of which a call is about 0.55 s (see ``torch_runtime.compile_model``).

Weights: packages are built with ``aot_inductor.package_constants_in_so=False`` and the runner reads the module's
own tensors (``load_constants(..., user_managed=True)``; non-persistent buffers included), so a package holds no
copy of them: a large checkpoint costs no extra disk per shape nor memory per loaded shape (embedded weights,
torch's default, would cost a copy of the checkpoint in each package on disk and in memory for each shape loaded).
Inductor still folds some constants into the package at compile time (in the shipped HRNet one bias of 435
state-dict entries: the runner reads 6.18 of its 6.18 MB from the module; its package, code only, is 3 MB; in a tiny
test net, the batch norm's statistics and the biases), hence the weights in the digest. The runner holds pointers
into the module's tensors: moving the module (``.to``) after a package is loaded would leave it reading the old
ones, so every call checks the pointers (0.3 ms for HRNet's 362) and raises. Where ``torch.export`` lifts a tensor
that is none of the module's parameters, buffers or tensor attributes by name (a plain tensor attribute, which it
names ``_tensor_constant0``), the package embeds all its weights instead (its metadata says which,
``certseg_weights``).

If ``torch.export`` cannot trace the module (Python control flow on tensor values), the module runs through
``fallback`` (certseg's ``torch.compile`` path) instead, for every signature, and one line on stderr says so. A
package that fails to load or run raises: there is no silent fall-back to eager.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

FOLDER = "aoti"
"""The packages' folder under ``cache_dir()``."""

FORMAT = 1
"""Bumped when what this module puts into a package changes."""

WEIGHTS_KEY, WEIGHTS_MODULE, WEIGHTS_EMBEDDED = "certseg_weights", "module", "embedded"
"""A package's metadata says where its weights are: read from the module (``package_constants_in_so=False``, the
rule), or in the package (where ``torch.export`` lifted a tensor that is none of the module's)."""

_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
"""The state dict digest of each module object (weights are assumed not to change once compiled)."""

_PLAIN = (bool, int, float, str, type(None))


class _Autocast(nn.Module):
    """What is exported: ``module`` under autocast (``dtype`` None: fp32), so the casts are compiled in."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None, device_type: str) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(*args)


class _Runner:
    """A loaded package and the module's weight tensors it reads, whose addresses each call checks."""

    def __init__(self, model: Any, path: Path, wrapped: nn.Module, constants: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.path = path
        self.constants = constants  # kept alive: the runner reads them (user-managed)
        self.places = []
        for name, tensor in constants.items():
            owner, _, leaf = name.rpartition(".")
            self.places.append((wrapped.get_submodule(owner), leaf, tensor.data_ptr()))

    def __call__(self, *args: Any) -> Any:
        if any(getattr(owner, leaf).data_ptr() != pointer for owner, leaf, pointer in self.places):
            raise RuntimeError(f"the weights of the module compiled into {self.path} moved after it was loaded "
                               "(.to() after compile_model?): compile the module after moving it")
        return self.model(*args)


def signature(args: tuple[Any, ...]) -> tuple[Hashable, ...]:
    """Per argument: a tensor's shape, stride, dtype and device; anything else, its value."""
    return tuple(
        ("tensor", tuple(arg.shape), tuple(arg.stride()), str(arg.dtype), str(arg.device))
        if isinstance(arg, torch.Tensor) else ("value", repr(arg)) for arg in args)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the module holds, by name: parameters, buffers (non-persistent ones too, which the state dict
    leaves out) and plain tensor attributes (``torch.export`` lifts them into the package as constants)."""
    found = dict(module.named_parameters(remove_duplicate=False))
    found.update(module.named_buffers(remove_duplicate=False))
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                found[f"{prefix}.{key}" if prefix else key] = value
    return found


def weights_digest(module: nn.Module) -> str:
    """sha256 over the names, shapes, strides, dtypes and bytes of ``module_tensors``; once per module object."""
    digest = _WEIGHTS.get(module)
    if digest is None:
        sha = hashlib.sha256()
        for name, tensor in sorted(module_tensors(module).items()):
            tensor = tensor.detach()
            sha.update(repr((name, tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype))).encode())
            sha.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = _WEIGHTS[module] = sha.hexdigest()
    return digest


@functools.cache
def models_source_digest() -> str:
    """sha256 over the sources of ``certseg/engine/models/*.py`` (a changed forward is another package)."""
    folder = Path(__file__).resolve().parents[1] / "models"
    sha = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        sha.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def plain_attributes(module: nn.Module) -> list[Any]:
    """Each submodule's public attributes that are numbers, strings or tuples of them (a threshold in forward)."""
    found = []
    for name, sub in module.named_modules():
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
                found.append([name, key, repr(value)])
    return found


def threads(device_type: str) -> int | None:
    """CPU code is generated for torch's thread count at compile time (inductor writes it into its OpenMP loops):
    a package built for 1 thread would run its fused kernels on 1 thread in a 16-thread process."""
    return torch.get_num_threads() if device_type == "cpu" else None


def device_facts(device_type: str) -> list[Any]:
    """What of the machine changes the generated code: the CPU's vector capability, the GPU's kind."""
    facts: list[Any] = [torch.backends.cpu.get_cpu_capability()]
    if device_type == "cuda":
        facts += [torch.cuda.get_device_name(), list(torch.cuda.get_device_capability()), torch.version.cuda]
    return facts


def package_parts(module: nn.Module, dtype: torch.dtype | None, device_type: str,
                  key: tuple[Hashable, ...]) -> dict[str, Any]:
    """Everything that decides a package's content (its digest is the file name)."""
    cls = type(module)
    return {
        "format": FORMAT, "signature": [list(part) for part in key], "dtype": str(dtype), "device": device_type,
        "torch": torch.__version__, "machine": device_facts(device_type), "threads": threads(device_type),
        "class": f"{cls.__module__}.{cls.__qualname__}", "repr": repr(module),
        "attributes": plain_attributes(module), "weights": weights_digest(module),
        "sources": models_source_digest(), "weights_from": WEIGHTS_MODULE,
    }


def package_path(module: nn.Module, dtype: torch.dtype | None, device_type: str,
                 key: tuple[Hashable, ...]) -> Path:
    from certseg.engine.cache import cache_dir, cache_key

    return cache_dir() / FOLDER / f"{cache_key(package_parts(module, dtype, device_type, key))}.pt2"


def example_inputs(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh (not inference-mode) tensors with the arguments' shapes, strides, dtypes and devices."""
    return tuple(
        torch.empty_strided(tuple(arg.shape), tuple(arg.stride()), dtype=arg.dtype, device=arg.device).zero_()
        if isinstance(arg, torch.Tensor) else arg for arg in args)


class ExportFailed(Exception):
    """``torch.export`` could not trace the module."""


def build_package(wrapped: _Autocast, args: tuple[Any, ...], path: Path) -> None:
    """Export ``wrapped`` at ``args``' signature, compile and package it, and rename the package into ``path``."""
    import torch.export

    from certseg.engine.cache import remove_stale_staging

    with torch.inference_mode(False), torch.no_grad(), torch.autocast(wrapped.device_type, enabled=False):
        try:  # torch prints the graph it could not trace (twice): the one line the caller prints says it
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                program = torch.export.export(wrapped, example_inputs(args))
        except Exception as error:  # any tracing failure: the caller falls back to torch.compile
            raise ExportFailed(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                               ) from error
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path.parent)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.partial-{os.getpid()}-",
                                             suffix=".pt2")
        os.close(handle)
        try:
            compile_package(program, temporary, WEIGHTS_MODULE)
            # A tensor the compiled code names on its own (a plain tensor attribute: ``_tensor_constant0``) cannot
            # be pointed at: that package embeds its weights instead (torch's default; its metadata says so).
            if not set(open_package(Path(temporary)).get_constant_fqns()) <= set(module_tensors(wrapped)):
                compile_package(program, temporary, WEIGHTS_EMBEDDED)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def compile_package(program: Any, path: str, weights: str) -> None:
    """``aoti_compile_and_package`` with the weights read from the module (``WEIGHTS_MODULE``) or embedded."""
    import torch._inductor

    torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={
        "aot_inductor.package_constants_in_so": weights == WEIGHTS_EMBEDDED,
        "aot_inductor.metadata": {WEIGHTS_KEY: weights}})


def open_package(path: Path, device_index: int = -1) -> Any:
    """The package's model through ``aoti_runner``'s GIL-free runner where it could be built; else
    ``torch._inductor.aoti_load_package(path)`` without its machine check: that probes each vector ISA the CPU
    claims by building and loading a test library in a child process (1.1 s here, measured), only to warn on a
    mismatch, which the package's digest already rules out (torch version, CPU capability)."""
    from certseg.engine.runtimes.aoti_runner import NativeModel, native_runner

    if native_runner() is not None:  # the same loader, called outside the GIL
        return NativeModel(str(path), device_index)
    import torch._inductor

    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader
    except (ImportError, AttributeError):  # torch moved them: its public loader, probe included
        return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    return AOTICompiledModel(loader(str(path), "model", False, 1, device_index))  # one runner


def device_index(args: tuple[Any, ...]) -> int:
    """The index of the GPU the tensor arguments are on (-1: the current one, or CPU)."""
    return next((arg.device.index for arg in args if isinstance(arg, torch.Tensor) and arg.device.index is not None),
                -1)


def load_package(path: Path, wrapped: _Autocast, index: int = -1) -> _Runner:
    """Load ``path`` (onto GPU ``index``) and point it at ``wrapped``'s own weight tensors."""
    model = open_package(path, index)
    weights = model.get_metadata().get(WEIGHTS_KEY)
    if weights == WEIGHTS_EMBEDDED:
        return _Runner(model, path, wrapped, {})
    if weights != WEIGHTS_MODULE:
        raise RuntimeError(f"{path} says nothing of its weights ({WEIGHTS_KEY}): not a certseg package")
    own = module_tensors(wrapped)
    missing = [name for name in model.get_constant_fqns() if name not in own]
    if missing:
        raise RuntimeError(f"{path} reads tensors {missing} the module does not have")
    constants = {name: own[name].detach() for name in model.get_constant_fqns()}
    model.load_constants(constants, check_full_update=True, user_managed=True)
    return _Runner(model, path, wrapped, constants)


class AotCompiled(nn.Module):
    """``module`` run as AOTInductor packages, one per call signature, cached on disk (see the module's doc).

    ``fallback(module)``: what runs it where ``torch.export`` fails. ``runs`` counts the calls a package ran and
    ``packages`` lists the packages loaded, in order (both read by the tests)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None, device_type: str = "cpu",
                 fallback: Callable[[nn.Module], Callable[..., Any]] | None = None) -> None:
        super().__init__()
        self.wrapped = _Autocast(module, dtype, device_type)
        self._fallback_factory = fallback
        self._fallback: Callable[..., Any] | None = None
        self._runners: dict[tuple[Hashable, ...], _Runner] = {}
        self.runs = 0
        self.packages: list[Path] = []

    @property
    def module(self) -> nn.Module:
        return self.wrapped.module

    def forward(self, *args: Any) -> Any:
        if self._fallback is not None:
            return self._fallback(*args)
        key = signature(args)
        runner = self._runners.get((threads(self.wrapped.device_type), key))
        if runner is None:
            runner = self._load(key, args)
            if runner is None:
                assert self._fallback is not None
                return self._fallback(*args)
        self.runs += 1
        return runner(*args)

    def _load(self, key: tuple[Hashable, ...], args: tuple[Any, ...]) -> _Runner | None:
        wrapped = self.wrapped
        path = package_path(wrapped.module, wrapped.dtype, wrapped.device_type, key)
        if not path.is_file():
            try:
                build_package(wrapped, args, path)
            except ExportFailed as error:
                cls = type(wrapped.module)
                if self._fallback_factory is None:
                    raise
                print(f"certseg: torch.export cannot trace {cls.__module__}.{cls.__qualname__} ({error}); "
                      "it runs through torch.compile instead", file=sys.stderr)
                self._fallback = self._fallback_factory(wrapped)  # under the same autocast as a package
                return None
        runner = self._runners[threads(wrapped.device_type), key] = load_package(path, wrapped, device_index(args))
        self.packages.append(path)
        return runner

