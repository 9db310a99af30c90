"""Checkpoint loading that fails loudly and helpfully, for any model (HRNet, ADM, ViT-Adapter).

Checkpoints are untrusted files: only local paths are read, pickles only through ``torch.load(weights_only=True)``
and never unpickle arbitrary objects. Loading is all-or-nothing: every key and shape is checked against the
model before a single tensor is copied, and a mismatch raises ``CheckpointError`` whose first line says what is
wrong and which known preset the checkpoint would fit instead (candidates are built on the meta device, so the
check is cheap even for 553M-parameter models).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certseg.engine.errors import CheckpointError, first_line

TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".pth.tar")
SAFETENSORS_SUFFIX = ".safetensors"
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict")
"""Where training frameworks nest the weights: mmcv (``{'meta', 'state_dict'}``), plain ``{'model': ...}`` saves."""
WRAPPER_PREFIXES: tuple[str, ...] = ("model.", "module.")
LISTED_PER_KIND = 10
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")

Shape = tuple[int, ...]


def is_num_batches_tracked(name: str) -> bool:
    """BN step counters: absent from torch-0.4 checkpoints and unused in eval, so safe to leave at zero."""
    return name.rsplit(".", 1)[-1] == "num_batches_tracked"


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local ``.pt/.pth/.bin`` (weights only) or ``.safetensors`` file and unwrap common containers."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, ``meta``) of a checkpoint; ``meta`` is mmcv's runner metadata (CLASSES, PALETTE) or {}."""
    file = _local_file(path)
    name = file.name.lower()
    if name.endswith(SAFETENSORS_SUFFIX):
        obj = _load_safetensors(file)
    elif name.endswith(TORCH_SUFFIXES):
        obj = _load_torch(file)
    else:
        raise CheckpointError(
            f"checkpoint {file} has an unknown suffix (expected {', '.join(TORCH_SUFFIXES)} or {SAFETENSORS_SUFFIX})"
        )
    meta = obj.get("meta") if isinstance(obj, Mapping) and not _is_state_dict(obj) else None
    return _unwrap(obj, file), dict(meta) if isinstance(meta, Mapping) else {}


def _local_file(path: str | os.PathLike) -> Path:
    """Refuse URLs (nothing is ever downloaded) and paths that are not existing files."""
    text = os.fspath(path)
    if _URL.match(text):
        raise CheckpointError(f"checkpoint {text} is a URL; download it yourself and pass the local file")
    file = Path(text).expanduser()
    if not file.exists():
        raise CheckpointError(f"checkpoint {file} does not exist")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} is not a file")
    return file


def _reason(err: BaseException) -> str:
    return first_line(err, with_type=True, limit=200)


def _load_torch(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # every failure becomes one user-facing line
        message = str(err)
        if "Weights only load failed" in message:
            found = _UNSUPPORTED_GLOBAL.search(message)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {file} holds Python objects besides tensors{what}; refused: checkpoints are "
                "untrusted and only read with torch.load(weights_only=True)"
            ) from err
        raise CheckpointError(
            f"checkpoint {file} is truncated, corrupt or not a PyTorch checkpoint ({_reason(err)})"
        ) from err


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except Exception as err:  # every failure becomes one user-facing line
        raise CheckpointError(
            f"checkpoint {file} is truncated, corrupt or not a safetensors file ({_reason(err)})"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``model_state_dict`` until a flat name → tensor dict."""
    while not _is_state_dict(obj):
        inner = None
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"checkpoint {file} holds no state dict (found {_describe(obj)})")
        obj = inner
    return dict(obj)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------- keys


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor],
    prefixes: Collection[str] = WRAPPER_PREFIXES,
    *,
    extras: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Drop the named non-model ``extras`` and remove a wrapper prefix carried by ALL remaining keys.

    Repeats, so ``module.model.x`` (DataParallel around a training wrapper) becomes ``x``; extras are matched
    at every level (``loss.criterion.weight`` sits beside ``model.*`` in official HRNet checkpoints). A prefix
    carried by only some keys is left alone, so the strict check reports those keys instead of guessing.
    """
    result = dict(state_dict)
    while True:
        result = {k: v for k, v in result.items() if k not in extras}
        prefix = next((p for p in prefixes if result and all(k.startswith(p) for k in result)), None)
        if prefix is None:
            return result
        result = {k[len(prefix) :]: v for k, v in result.items()}


@dataclass(frozen=True)
class Fit:
    """How a state dict differs from a model's expected name → shape layout."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, Shape, Shape]]  # (name, expected, found)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)


def layout(model: nn.Module) -> dict[str, Shape]:
    """The model's ``state_dict`` names and shapes in order (works on the meta device)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def compare(
    expected: Mapping[str, Shape],
    state_dict: Mapping[str, torch.Tensor],
    optional_missing: Callable[[str], bool] | None = None,
) -> Fit:
    """Missing (except ``optional_missing`` ones), unexpected and mis-shaped keys of ``state_dict``."""
    optional = optional_missing or (lambda _: False)
    missing = [k for k in expected if k not in state_dict and not optional(k)]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        (k, shape, tuple(state_dict[k].shape))
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    return Fit(missing, unexpected, misshaped)


def fitting_presets(
    state_dict: Mapping[str, torch.Tensor],
    presets: Mapping[str, Callable[[], nn.Module]],
    optional_missing: Callable[[str], bool] | None = None,
) -> list[str]:
    """Names of the presets whose layout ``state_dict`` fits exactly; each is built on meta (no memory)."""
    names = []
    for name, factory in presets.items():
        with torch.device("meta"):
            candidate = factory()
        if compare(layout(candidate), state_dict, optional_missing).ok:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- loading


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    presets: Mapping[str, Callable[[], nn.Module]] | None = None,
    model_name: str = "the model",
    source: str | os.PathLike | None = None,
    optional_missing: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Strictly load ``state_dict`` into ``model``, all or nothing.

    Keys matching ``optional_missing`` may be absent and keep the model's own value: on a freshly built model
    that is zero for ``num_batches_tracked`` (torch-0.4 HRNet checkpoints) and the computed index for buffers
    the module derives itself (ViT-Adapter's ``relative_position_index``, absent from its released files).
    Float tensors are cast to the dtype of the model's entry, integer buffers are kept. On any mismatch nothing
    is loaded and ``CheckpointError`` lists the problems and the ``presets`` (name → builder) that fit.
    """
    target = model.state_dict()
    fit = compare({k: tuple(t.shape) for k, t in target.items()}, state_dict, optional_missing)
    if not fit.ok:
        fits = None if presets is None else fitting_presets(state_dict, presets, optional_missing)
        raise CheckpointError(mismatch_message(fit, model_name, source, presets, fits))
    check_finite(state_dict, model_name=model_name, source=source)
    complete = {name: _cast(state_dict[name], ref) if name in state_dict else ref for name, ref in target.items()}
    model.load_state_dict(complete, strict=True)
    return model


def check_finite(
    state_dict: Mapping[str, torch.Tensor], *, model_name: str = "the model", source: str | os.PathLike | None = None
) -> None:
    """Refuse NaN/Inf weights, naming the first bad tensor: one would make the model's outputs non-finite, which
    certification would only turn into abstentions, after a whole run (meta tensors hold no values: skipped)."""
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.is_meta or bool(torch.isfinite(tensor).all()):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            subject = f"checkpoint {os.fspath(source)}" if source is not None else "the state dict"
            raise CheckpointError(
                f"{subject} holds non-finite weights: tensor {name!r} of {model_name} has {bad} NaN/Inf value"
                f"{'s' if bad > 1 else ''} of {tensor.numel()}; refused"
            )


def _cast(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return value.to(ref.dtype) if value.is_floating_point() and ref.is_floating_point() else value


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    prefixes: Collection[str] = WRAPPER_PREFIXES,
    extras: Collection[str] = (),
    presets: Mapping[str, Callable[[], nn.Module]] | None = None,
    model_name: str = "the model",
    optional_missing: Callable[[str], bool] | None = None,
) -> nn.Module:
    """``read_state_dict`` → ``strip_prefixes`` → ``load_into``: the one call a model's loader needs."""
    state_dict = strip_prefixes(read_state_dict(path), prefixes, extras=extras)
    return load_into(
        model,
        state_dict,
        presets=presets,
        model_name=model_name,
        source=path,
        optional_missing=optional_missing,
    )


# ---------------------------------------------------------------------------------------------- messages


def mismatch_message(
    fit: Fit,
    model_name: str,
    source: str | os.PathLike | None,
    presets: Mapping[str, Callable[[], nn.Module]] | None,
    fits: list[str] | None,
) -> str:
    """One summary line (counts and the preset that fits, if any), then the first few keys of each kind."""
    subject = f"checkpoint {os.fspath(source)}" if source is not None else "the state dict"
    summary = (
        f"{subject} does not fit {model_name}: {len(fit.missing)} missing, {len(fit.unexpected)} unexpected, "
        f"{len(fit.misshaped)} mis-shaped keys"
    )
    summary += _prefix_hint(fit)
    if fits:
        summary += f"; it fits preset {' and '.join(fits)}"
    elif presets:
        summary += f"; it fits none of the presets {', '.join(presets)}"
    lines = [summary]
    lines += _listing("missing", fit.missing)
    lines += _listing("unexpected", fit.unexpected)
    lines += _listing(
        "mis-shaped (expected vs found)",
        [f"{name}: expected {list(want)}, found {list(got)}" for name, want, got in fit.misshaped],
    )
    return "\n".join(lines)


def _prefix_hint(fit: Fit) -> str:
    """Name a wrapper prefix under which the unexpected keys are exactly the missing ones, and the keys that
    kept it from being stripped (e.g. ``loss.criterion.weight`` not passed as an extra)."""
    missing = set(fit.missing)
    counts: dict[str, int] = {}
    for key in fit.unexpected:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in missing:
                prefix = ".".join(parts[:i]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    prefix = max(counts, key=counts.__getitem__, default=None)
    if prefix is None or counts[prefix] != len(missing):
        return ""
    others = [k for k in fit.unexpected if not (k.startswith(prefix) and k[len(prefix) :] in missing)]
    besides = f" except {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else ""
    return f"; its keys carry the prefix '{prefix}'{besides}"


def _listing(kind: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = items[:LISTED_PER_KIND]
    more = [f"    ... and {len(items) - len(shown)} more"] if len(items) > len(shown) else []
    return [f"  {kind}:"] + [f"    {item}" for item in shown] + more
