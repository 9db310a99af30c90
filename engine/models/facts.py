"""What the pipeline must know about a model besides its weights, and where it comes from.

A segmenter's input normalisation and size, its class names and palette, a denoiser's noise schedule: the
shipped and official models have fixed answers (ImageNet statistics on [0, 1] pixels, the linear schedule), a
bring-your-own ONNX file states them in its metadata props (the keys below, a documented contract that
``certseg-export`` also writes into the graphs it makes), and the command line can override them
(``--seg-mean``, ``--seg-std``, ``--seg-input-size``, ``--classes``). They live in the model's ``ModelInfo``
(``certseg.engine.models.info``), so records, exports and Triton repositories carry them the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from certseg.engine.errors import InputError
from certseg.engine.maths.normalization import IMAGENET, Normalization
from certseg.engine.maths.schedules import LINEAR, NUM_TIMESTEPS, Schedule
from certseg.engine.models.info import ModelInfo

PREFIX = "certseg."
ROLE = PREFIX + "role"
NAME = PREFIX + "name"
MEAN = PREFIX + "mean"
STD = PREFIX + "std"
INPUT_RANGE = PREFIX + "input_range"
INPUT_SIZE = PREFIX + "input_size"
CLASSES = PREFIX + "classes"
PALETTE = PREFIX + "palette"
SCHEDULE = PREFIX + "schedule"
NUM_TIMESTEPS_KEY = PREFIX + "num_timesteps"
KEYS: dict[str, str] = {
    ROLE: '"segmenter" or "denoiser" (optional; a file used in the other role is refused)',
    NAME: "display name recorded in results (default: the file name)",
    MEAN: "segmenter: JSON [r, g, b] in the input range's units (default ImageNet [0.485, 0.456, 0.406])",
    STD: "segmenter: JSON [r, g, b] in the input range's units (default ImageNet [0.229, 0.224, 0.225])",
    INPUT_RANGE: "segmenter: JSON [low, high], the range the model reads pixels in (default [0, 1]; e.g. [0, 255])",
    INPUT_SIZE: "segmenter: JSON [H, W] it must be fed at; denoiser: S for a graph with dynamic S",
    CLASSES: "segmenter: JSON list of the K class names",
    PALETTE: "segmenter: JSON list of K [r, g, b] colours (0-255)",
    SCHEDULE: 'denoiser: "linear" (guided-diffusion, default) or "cosine" (Nichol & Dhariwal)',
    NUM_TIMESTEPS_KEY: "denoiser: T, the number of diffusion steps it was trained with (default 1000)",
}
"""The metadata props certseg reads from (and writes into) ONNX files: the bring-your-own contract."""


def _json(value: str, key: str, where: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise InputError(f"{where}: metadata {key} is not JSON ({value[:40]!r})") from None


def _numbers(value: Any, count: int, key: str, where: str) -> tuple[float, ...]:
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise InputError(f"{where}: {key} must be a list of {count} finite numbers, got {json.dumps(value)[:60]}")
    return tuple(float(v) for v in value)


def _size(value: Any, key: str, where: str, *, square: bool = False) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise InputError(f"{where}: {key} must be [H, W] with positive integers, got {json.dumps(value)[:60]}")
    if square and value[0] != value[1]:
        raise InputError(f"{where}: {key} must be square for a denoiser (S or [S, S]), got {value}")
    return int(value[0]), int(value[1])


def normalization_of(
    mean: Sequence[float] | None, std: Sequence[float] | None, input_range: Sequence[float] | None,
    base: Normalization, where: str,
) -> Normalization:
    """``base`` with the given parts replaced; a contradiction (mean outside the range, std <= 0) is one line."""
    try:
        return Normalization(
            base.mean if mean is None else _rgb(mean), base.std if std is None else _rgb(std),
            base.input_range if input_range is None else _low_high(input_range),
        )
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {len(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def _low_high(values: Sequence[float]) -> tuple[float, float]:
    if len(values) != 2:
        raise ValueError(f"the input range needs 2 values (low, high), got {len(values)}")
    return float(values[0]), float(values[1])


def check_classes(classes: Any, palette: Any, num_classes: int, where: str) -> tuple[list[str] | None, Any]:
    """Class names (K strings) and palette (K [r, g, b] in 0-255), each optional, checked against K."""
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise InputError(f"{where}: the class names must be a JSON list of strings")
        if len(classes) != num_classes:
            raise InputError(f"{where}: names {len(classes)} classes, but the segmenter has K = {num_classes}")
    if palette is not None:
        valid = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not valid:
            raise InputError(f"{where}: the palette must be a JSON list of [r, g, b] colours with values 0-255")
        if len(palette) != num_classes:
            raise InputError(f"{where}: the palette has {len(palette)} colours, but the segmenter has K = "
                             f"{num_classes}")
    return classes, palette


def read_classes_file(path: str | Path) -> tuple[list[str], list[list[int]] | None]:
    """``--classes``: a JSON list of names, or ``{"classes": [...], "palette": [[r, g, b], ...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise InputError(f"--classes {path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise InputError(f"--classes {path}: not JSON ({error})") from None
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and "classes" in data and set(data) <= {"classes", "palette"}:
        return data["classes"], data.get("palette")
    raise InputError(f"--classes {path}: expected a JSON list of class names or an object with \"classes\" "
                     "(and optionally \"palette\")")


def props_facts(props: Mapping[str, str], role: str, where: str) -> dict[str, Any]:
    """The facts a file's metadata props state (only those present), parsed and checked one by one."""
    facts: dict[str, Any] = {}
    if ROLE in props and props[ROLE] != role:
        raise InputError(f"{where} is a {props[ROLE]} ({ROLE}), but a {role} was asked for")
    if props.get(NAME):
        facts["name"] = props[NAME]
    if role == "segmenter":
        parts = {key: _numbers(_json(props[key], key, where), count, key, where) if key in props else None
                 for key, count in ((MEAN, 3), (STD, 3), (INPUT_RANGE, 2))}
        if any(v is not None for v in parts.values()):
            facts["normalization"] = normalization_of(parts[MEAN], parts[STD], parts[INPUT_RANGE], IMAGENET, where)
        for key, name in ((CLASSES, "classes"), (PALETTE, "palette")):
            if key in props:
                facts[name] = _json(props[key], key, where)
    if INPUT_SIZE in props:
        facts["input_size"] = _size(_json(props[INPUT_SIZE], INPUT_SIZE, where), INPUT_SIZE, where,
                                    square=role == "denoiser")
    if role == "denoiser" and (SCHEDULE in props or NUM_TIMESTEPS_KEY in props):
        steps = props.get(NUM_TIMESTEPS_KEY, str(NUM_TIMESTEPS))
        if not steps.strip().isdigit():
            raise InputError(f"{where}: {NUM_TIMESTEPS_KEY} must be a positive integer, got {steps!r}")
        try:
            facts["schedule"] = Schedule(props.get(SCHEDULE, "linear").strip(), int(steps))
        except ValueError as error:
            raise InputError(f"{where}: {SCHEDULE}: {error}") from None
    return facts


def normalization(model: Any) -> Normalization:
    """A segmenter's input normalisation (ImageNet on [0, 1] pixels unless it states another), from its
    ``ModelInfo`` or from a record's ``extra`` (``{"normalization": {...}}``)."""
    value = model.normalization if isinstance(model, ModelInfo) else model.extra.get("normalization")
    if value is None:
        return IMAGENET
    return value if isinstance(value, Normalization) else Normalization(
        tuple(value["mean"]), tuple(value["std"]), tuple(value["input_range"]))


def schedule(model: Any) -> Schedule:
    """A denoiser's noise schedule (guided-diffusion's linear one over 1000 steps unless it states another),
    from its ``ModelInfo`` or from a record's ``extra`` (``{"schedule": {...}}``)."""
    value = model.schedule if isinstance(model, ModelInfo) else model.extra.get("schedule")
    if value is None:
        return LINEAR
    return value if isinstance(value, Schedule) else Schedule(str(value["name"]), int(value["num_timesteps"]))


def normalization_record(value: Normalization) -> dict[str, list[float]]:
    return {"mean": list(value.mean), "std": list(value.std), "input_range": list(value.input_range)}


def with_overrides(
    model: ModelInfo,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    classes_file: str | Path | None = None,
) -> Any:
    """The segmenter with the command line's ``--seg-mean``/``--seg-std`` (in its input range's units),
    ``--seg-input-size`` and ``--classes`` replacing what it states; the module (if loaded) is shared, not
    copied."""
    changes: dict[str, Any] = {}
    if mean is not None or std is not None:
        changes["normalization"] = normalization_of(mean, std, None, normalization(model), "--seg-mean/--seg-std")
    if input_size is not None:
        changes["input_size"] = _size(list(input_size), "--seg-input-size", "--seg-input-size")
    if classes_file is not None:
        names, palette = read_classes_file(classes_file)
        check_classes(names, palette, int(model.num_classes or 0), f"--classes {classes_file}")
        changes["classes"] = names
        if palette is not None:
            changes["palette"] = palette
        elif len(model.palette or ()) != len(names):
            changes["palette"] = None
    return replace(model, **changes) if changes else model


def segmenter_props(model: Any) -> dict[str, str]:
    """The metadata props ``certseg-export`` writes into a segmenter graph: everything a reader of the file
    alone needs to run it as certseg does."""
    norm = normalization(model)
    props = {ROLE: "segmenter", NAME: model.name, MEAN: json.dumps(list(norm.mean)), STD: json.dumps(list(norm.std)),
             INPUT_RANGE: json.dumps(list(norm.input_range))}
    for key, name in ((CLASSES, "classes"), (PALETTE, "palette")):
        if model.extra.get(name) is not None:
            props[key] = json.dumps(model.extra[name])
    if model.input_size is not None:
        props[INPUT_SIZE] = json.dumps(list(model.input_size))
    return props


def denoiser_props(model: Any) -> dict[str, str]:
    """The metadata props ``certseg-export`` writes into a denoiser graph (its schedule, its size)."""
    chosen = schedule(model)
    props = {ROLE: "denoiser", NAME: model.name, SCHEDULE: chosen.name, NUM_TIMESTEPS_KEY: str(chosen.num_timesteps)}
    if model.input_size is not None:
        props[INPUT_SIZE] = json.dumps(model.input_size[0])
    return props
