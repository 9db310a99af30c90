"""The trainers behind the shipped weights: both commands run (as recorded in the manifest and under their new
name), write self-describing weights the registry loads, and record how they were made."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from certseg.engine.models.registry import MANIFEST, load_model
from certseg.training import scenes
from certseg.training.cli import app

TINY = ["--iterations", "2", "--batch", "2", "--pool-size", "4", "--validation-images", "2", "--threads", "1"]


def _train(module: str, role: str, name: str, weights: Path) -> dict:
    args = [role, "--name", name, *TINY, "--weights-dir", str(weights)]
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    entry = json.loads((weights / "manifest.json").read_text())["models"][name]
    assert entry["training"]["command"] == shlex.join(["python", "-m", module, *args])
    assert entry["training"]["generator_version"] == scenes.GENERATOR_VERSION
    return entry


@pytest.mark.parametrize(("module", "role"), [("certseg.bench.train", "segmenter"), ("certseg.training", "denoiser")])
def test_both_training_commands_write_weights_the_registry_loads(tmp_path: Path, module: str, role: str) -> None:
    entry = _train(module, role, f"tiny-{role}", tmp_path)
    model = load_model(str(tmp_path / entry["file"]), role)
    assert model.sha256 == entry["sha256"] and model.role == role
    if role == "segmenter":
        assert model.num_classes == scenes.NUM_CLASSES and set(entry["validation"]) >= {"clean", "sigma_0.25"}
    else:
        assert entry["validation"]["sigma_0.25"]["t"] > 0


def test_the_manifest_records_commands_that_still_run() -> None:
    """Every shipped model's recorded training command names a command and options that exist today."""
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    for name, entry in json.loads(MANIFEST.read_text())["models"].items():
        words = shlex.split(entry["training"]["command"])
        assert words[:3] == ["python", "-m", "certseg.bench.train"], name
        subcommand = command.commands[words[3]]
        known = {option for param in subcommand.params for option in param.opts}
        assert {word for word in words[4:] if word.startswith("--")} <= known, name
        assert entry["training"]["generator_version"] == scenes.GENERATOR_VERSION, name
