"""Writing a trained model where the engine finds it: ``engine/weights/<name>.safetensors`` and its entry in the
weights' ``manifest.json`` (config, training command, seed, generator version, validation scores, sha256)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch

from certseg.engine.digest import file_sha256
from certseg.engine.models.registry import MANIFEST, WEIGHTS_DIR, save_model


def command_line(program: str, arguments: list[str]) -> str:
    """How this training run was started, as the manifest records it."""
    return " ".join([program, *(shlex.quote(a) for a in arguments)])


def _write_manifest_entry(manifest: Path, name: str, entry: dict[str, Any]) -> None:
    record = json.loads(manifest.read_text()) if manifest.is_file() else {"models": {}}
    record["models"][name] = entry
    manifest.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def save_shipped_model(
    name: str, role: str, family: str, model: torch.nn.Module, config: dict, training: dict, validation: dict,
    defaults: list[str], *, weights_dir: Path = WEIGHTS_DIR, **extra: Any,
) -> Path:
    """Save ``model`` self-described (its builder ``config`` and ``extra`` facts in the file) and record it in
    the manifest of ``weights_dir``; returns the weights file."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.safetensors"
    description = {"name": name, "role": role, "family": family, "config": config, **extra}
    save_model(path, model, description)
    _write_manifest_entry(weights_dir / MANIFEST.name, name, {
        "file": path.name, "role": role, "family": family, "defaults": defaults, "config": config,
        "training": training, "validation": validation, "sha256": file_sha256(path),
        "parameters": sum(p.numel() for p in model.parameters()), **extra,
    })
    return path
