"""Finding and loading models by name or path: the shipped defaults and official checkpoints, one code path.

An ``.onnx`` file is a bring-your-own model: its graph is checked against the contract of its role and run as
given in ONNX Runtime (``certseg.engine.models.onnx_model``). Any other model file is either self-describing
(a certseg ``.safetensors`` whose metadata holds the builder config: the shipped defaults and anything
``certseg`` trains) or an official checkpoint, which is matched against the official presets of its role on the
``meta`` device. Either way the weights go through the strict loader of
``certseg.engine.models.checkpoints``: all keys and shapes checked, nothing loaded partially, nothing downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certseg.engine.digest import file_sha256
from certseg.engine.errors import CheckpointError
from certseg.engine.models import adm, hrnet, vit_adapter
from certseg.engine.models.checkpoints import (
    WRAPPER_PREFIXES,
    compare,
    fitting_presets,
    is_num_batches_tracked,
    layout,
    load_into,
    read_checkpoint,
    strip_prefixes,
)
from certseg.engine.models.info import DESCRIBED, LoadedModel, Role

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
METADATA_KEY = "certseg"


@dataclass(frozen=True)
class Family:
    """How to build one architecture from its config vocabulary, and how its official checkpoints are keyed."""

    name: str
    role: Role
    build: Callable[[Mapping[str, Any]], nn.Module]
    presets: Mapping[str, Mapping[str, Any]]
    extras: tuple[str, ...] = ()
    optional_missing: Callable[[str], bool] | None = None
    check_state: Callable[[nn.Module, Mapping[str, torch.Tensor], Path], None] | None = None
    """Family-specific checks of a state dict before it is loaded (e.g. BEiT's derived index buffers)."""
    after_load: Callable[[nn.Module], None] | None = None


def _build_hrnet(config: Mapping[str, Any]) -> nn.Module:
    return hrnet.build_hrnet(config["model_cfg"], int(config["num_classes"]))


def _build_adm(config: Mapping[str, Any]) -> nn.Module:
    return adm.build_adm(config["create_model_kwargs"])


def _build_vit_adapter(config: Mapping[str, Any]) -> nn.Module:
    return vit_adapter.build_vit_adapter(config["model_cfg"])


def vit_num_classes(model_cfg: Mapping[str, Any]) -> int:
    head = model_cfg["decode_head"]
    return int(head["num_things_classes"]) + int(head["num_stuff_classes"])


def _rebuild_indices(module: nn.Module) -> None:
    with torch.no_grad():
        vit_adapter.rebuild_relative_position_indices(module)


FAMILIES: dict[str, Family] = {
    "hrnet": Family(
        name="hrnet",
        role="segmenter",
        build=_build_hrnet,
        presets={name: {"model_cfg": cfg, "num_classes": k} for name, (cfg, k) in hrnet.PRESETS.items()},
        extras=tuple(hrnet.OFFICIAL_EXTRAS),
        optional_missing=is_num_batches_tracked,
    ),
    "vit_adapter": Family(
        name="vit_adapter",
        role="segmenter",
        build=_build_vit_adapter,
        presets={
            f"vit-adapter-beit-large-{name.replace('_', '-')}": {
                "model_cfg": cfg, "num_classes": vit_num_classes(cfg)
            }
            for name, cfg in vit_adapter.PRESETS.items()
        },
        optional_missing=vit_adapter.is_relative_position_index,
        check_state=vit_adapter.check_relative_position_indices,
        after_load=_rebuild_indices,
    ),
    "adm": Family(
        name="adm",
        role="denoiser",
        build=_build_adm,
        presets={name: {"create_model_kwargs": kwargs} for name, kwargs in adm.PRESETS.items()},
    ),
}


def shipped_models() -> dict[str, dict[str, Any]]:
    """The manifest of the small models shipped with certseg (name → entry)."""
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text())["models"]


def default_model(role: Role, variant: str = "default") -> str:
    """Name of the shipped model used when the user names none."""
    for name, entry in shipped_models().items():
        if entry["role"] == role and variant in entry.get("defaults", []):
            return name
    raise CheckpointError(f"no shipped {role} is marked as {variant!r}; pass a checkpoint path")


def read_description(path: Path) -> dict[str, Any] | None:
    """The certseg metadata of a self-describing safetensors file, or None; a description without the fields
    ``load_model`` needs ("family", "config") is a one-line ``CheckpointError`` naming the file and the field."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # corrupt files get their one-line error from read_state_dict
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({error})") from None
    if METADATA_KEY not in metadata:
        return None
    try:
        description = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: its {METADATA_KEY!r} metadata is not JSON ({error})") from None
    if not isinstance(description, dict):
        raise CheckpointError(f"checkpoint {path}: its {METADATA_KEY!r} metadata is not a JSON object")
    for name, kind in (("family", str), ("config", dict)):
        if name not in description:
            raise CheckpointError(f"checkpoint {path}: its {METADATA_KEY!r} metadata lacks the {name!r} field")
        if not isinstance(description[name], kind):
            raise CheckpointError(f"checkpoint {path}: the {name!r} field of its {METADATA_KEY!r} metadata is not "
                                  f"a {'string' if kind is str else 'JSON object'}")
    return description


def save_model(path: Path, module: nn.Module, description: Mapping[str, Any]) -> None:
    """Write a self-describing safetensors file (weights + builder config) that ``load_model`` reads back."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(dict(description), sort_keys=True)})


def resolve(ref: str | os.PathLike) -> tuple[Path, str]:
    """A shipped model name or a local path → (file, display name)."""
    text = os.fspath(ref)
    shipped = shipped_models()
    if text in shipped:
        return WEIGHTS_DIR / shipped[text]["file"], text
    path = Path(text).expanduser()
    if not path.exists() and not any(sep in text for sep in ("/", os.sep)) and not path.suffix:
        known = ", ".join(shipped) or "none"
        raise CheckpointError(f"unknown model {text!r}: not a shipped model (known: {known}) nor an existing file")
    return path, path.name


def load_model(ref: str | os.PathLike, role: Role, device: torch.device | str = "cpu") -> LoadedModel:
    """Build and strictly load a model by shipped name or checkpoint path, in eval mode on ``device``; an ``.onnx``
    path is checked against its role's contract and runs in ONNX Runtime (``device`` does not apply)."""
    path, name = resolve(ref)
    if path.suffix.lower() == ".onnx":
        from certseg.engine.models.onnx_model import load_onnx_model

        return load_onnx_model(path, name, role)
    description = read_description(path) if path.is_file() else None
    state_dict, meta = read_checkpoint(path)
    if description is not None:
        family = _family(description["family"], role, path)
        config = dict(description["config"])
        module = family.build(config)
        if family.check_state is not None:
            family.check_state(module, state_dict, path)
        load_into(module, state_dict, model_name=description.get("name", name), source=path,
                  optional_missing=family.optional_missing)
        stated = {k: v for k, v in description.items() if k in DESCRIBED}
        details = {k: v for k, v in description.items() if k not in ("family", "config", "role", *DESCRIBED)}
    else:
        family, preset, state_dict = _match_official(state_dict, role, path)
        config = dict(family.presets[preset])
        module = family.build(config)
        if family.check_state is not None:
            family.check_state(module, state_dict, path)
        load_into(module, state_dict, model_name=preset, source=path, optional_missing=family.optional_missing)
        stated, details = classes_from_meta(meta, config.get("num_classes")), {"preset": preset}
    if family.after_load is not None:
        family.after_load(module)
    return LoadedModel(
        module=module.eval().to(device),
        name=name,
        family=family.name,
        role=role,
        config=config,
        source=str(path),
        sha256=file_sha256(path),
        details=details,
        **stated,
    )


def classes_from_meta(meta: Mapping[str, Any], num_classes: int | None) -> dict[str, Any]:
    """mmcv's ``meta`` CLASSES and PALETTE (mmseg checkpoints) as the model's ``classes`` / ``palette``, where they
    describe exactly its K classes; anything else is left out rather than guessed."""
    out: dict[str, Any] = {}
    classes, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if isinstance(classes, (list, tuple)) and (num_classes is None or len(classes) == num_classes):
        out["classes"] = [str(name) for name in classes]
    if (isinstance(palette, (list, tuple)) and (num_classes is None or len(palette) == num_classes)
            and all(isinstance(c, (list, tuple)) and len(c) == 3 for c in palette)):
        out["palette"] = [[int(v) for v in colour] for colour in palette]
    return out


def _family(name: str, role: Role, path: Path) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"checkpoint {path} describes an unknown model family {name!r}")
    family = FAMILIES[name]
    if family.role != role:
        raise CheckpointError(f"checkpoint {path} holds a {family.role} ({name}), but a {role} was asked for")
    return family


def _match_official(
    state_dict: Mapping[str, torch.Tensor], role: Role, path: Path
) -> tuple[Family, str, dict[str, torch.Tensor]]:
    """The one official preset of ``role`` whose layout the checkpoint fits exactly, or a clear error."""
    closest: tuple[int, Family, str, dict[str, torch.Tensor]] | None = None
    for family in (f for f in FAMILIES.values() if f.role == role):
        stripped = strip_prefixes(state_dict, WRAPPER_PREFIXES, extras=family.extras)
        factories = {name: partial(family.build, cfg) for name, cfg in family.presets.items()}
        fits = fitting_presets(stripped, factories, family.optional_missing)
        if fits:
            return family, fits[0], stripped
        for preset, factory in factories.items():
            with torch.device("meta"):
                fit = compare(layout(factory()), stripped, family.optional_missing)
            problems = len(fit.missing) + len(fit.unexpected) + len(fit.misshaped)
            if closest is None or problems < closest[0]:
                closest = (problems, family, preset, stripped)
    if closest is None:
        raise CheckpointError(f"no official {role} presets are known")
    _, family, preset, stripped = closest
    with torch.device("meta"):
        candidate = family.build(family.presets[preset])
    # Raises the detailed mismatch error against the closest preset.
    load_into(candidate, stripped, model_name=f"any official {role} preset (closest: {preset})", source=path,
              optional_missing=family.optional_missing)
    raise AssertionError("unreachable: the closest preset does not fit")
