"""Train the small default models on procedural scenes: reproducible, seeded, CPU-friendly.

    python -m certseg.training segmenter --name procedural-hrnet-clean
    python -m certseg.training segmenter --name procedural-hrnet-noise025 --train-sigma 0.25
    python -m certseg.training denoiser --name procedural-adm

(``python -m certseg.bench.train``, the command the shipped weights' manifest records, is the same command.)
Each writes ``engine/weights/<name>.safetensors`` (self-describing: the builder config travels in the file's
metadata, so it loads through exactly the code path of any checkpoint) and its entry in ``manifest.json``
(config, command, seed, generator version, validation scores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from certseg.engine.models.registry import WEIGHTS_DIR

PROGRAM = "python -m certseg.training"
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

WeightsDirOption = Annotated[Path, typer.Option(help="where the weights and their manifest.json go")]
DefaultForOption = Annotated[list[str] | None, typer.Option(help="methods that use it by default")]


def _command(context: typer.Context) -> str:
    """This run's command line as the manifest records it: the program it was started as, then its arguments."""
    from certseg.training.shipped_weights import command_line

    return command_line(context.find_root().info_name or PROGRAM, sys.argv[1:])


@app.command()
def segmenter(
    context: typer.Context,
    name: Annotated[str, typer.Option(help="model name (file engine/weights/<name>.safetensors)")],
    train_sigma: Annotated[float, typer.Option(help="Gaussian noise σ added to training inputs (0 = clean)")] = 0.0,
    iterations: int = 1500,
    batch: int = 16,
    lr: float = 3e-3,
    pool_size: int = 3000,
    validation_images: int = 40,
    seed: int = 0,
    threads: int = 2,
    default_for: DefaultForOption = None,
    weights_dir: WeightsDirOption = WEIGHTS_DIR,
) -> None:
    """Train the small HRNetV2 on procedural scenes (clean, or with Gaussian noise augmentation)."""
    from certseg.training.segmenter import train_segmenter

    validation = train_segmenter(
        name, command=_command(context), train_sigma=train_sigma, iterations=iterations, batch=batch, lr=lr,
        pool_size=pool_size, validation_images=validation_images, seed=seed, threads=threads,
        default_for=default_for, weights_dir=weights_dir)
    typer.echo(json.dumps(validation, indent=2))


@app.command()
def denoiser(
    context: typer.Context,
    name: Annotated[str, typer.Option(help="model name (file engine/weights/<name>.safetensors)")],
    iterations: int = 1200,
    batch: int = 24,
    lr: float = 2e-3,
    pool_size: int = 3000,
    validation_images: int = 40,
    seed: int = 0,
    threads: int = 2,
    t_min: int = 10,
    t_max: int = 300,
    default_for: DefaultForOption = None,
    weights_dir: WeightsDirOption = WEIGHTS_DIR,
) -> None:
    """Train the small ADM-architecture denoiser: ε-prediction on the linear schedule at the squashed size."""
    from certseg.training.denoiser import train_denoiser

    validation = train_denoiser(
        name, command=_command(context), iterations=iterations, batch=batch, lr=lr, pool_size=pool_size,
        validation_images=validation_images, seed=seed, threads=threads, t_min=t_min, t_max=t_max,
        default_for=default_for, weights_dir=weights_dir)
    typer.echo(json.dumps(validation, indent=2))


def main(program: str = PROGRAM) -> None:
    """Run the command line as ``program`` (the name its usage lines and the manifest's records show)."""
    app(prog_name=program)
