"""Benchmark (not a test): the engine against the authors-style baseline, same models, images and seeds, one run.

    python -m certseg.bench.baseline_compare [--images 5 --n0 10 --n 100 --sigma 0.25 --scene-size 128x256
                                              --out bench-compare]

Uses the shipped default models when they exist; otherwise randomly initialised models of exactly the shipped
architectures (``SMALL_HRNET``, ``SMALL_ADM``: speed does not depend on the weights, and the certificates of both
variants are still compared for equality). Prints samples/s of both, the ratios, and whether the certificates
were identical; everything is also in ``OUT/results.jsonl`` and ``OUT/report.md``.

``--isolate`` (default) runs the engine and then the baseline each in a fresh process (the second resumes the
results file and computes only the baseline entries), so each variant's peak RSS is its own, not the larger of the
two; ``--no-isolate`` runs both in this process, as before. Isolated, each side runs in the environment its
program would: the engine process allocates as ``certseg`` and ``certseg-bench`` do (glibc's malloc keeping large
blocks in its heap, torch's huge pages only where it does not: ``process.allocators_environment``; each unless its
variable is set), the baseline's gets the environment as it is (the published code sets nothing); the `session`
line each process writes to the results records whether huge pages were on (``thp_mem_alloc``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from certseg.bench.config import BenchConfig, parse_size
from certseg.bench.machine import describe_machine, machine_line
from certseg.bench.report import write_report
from certseg.bench.run import execute, prepare
from certseg.bench.tables import compare, comparison_table
from certseg.engine.choices import Method, Precision
from certseg.engine.errors import CheckpointError
from certseg.engine.models.adm import build_adm
from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import default_model, save_model
from certseg.engine.runtimes.process import allocators_environment
from certseg.engine.runtimes.settings import Settings
from certseg.training import scenes
from certseg.training.architectures import SMALL_ADM, SMALL_HRNET


def _models(folder: Path) -> tuple[dict[str, str | None], str]:
    """Model arguments per method: shipped defaults, or same-architecture stand-ins written to ``folder``."""
    try:
        for method in ("segcertify", "denoisecertify"):
            default_model("segmenter", method)
        default_model("denoiser", "denoisecertify")
        return {"segmenter": None, "denoiser": None}, "shipped default models"
    except CheckpointError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    segmenter, denoiser = folder / "small-hrnet-random.safetensors", folder / "small-adm-random.safetensors"
    save_model(segmenter, build_hrnet(SMALL_HRNET, scenes.NUM_CLASSES),
               {"name": "small-hrnet-random", "role": "segmenter", "family": "hrnet",
                "classes": list(scenes.CLASSES),
                "config": {"model_cfg": SMALL_HRNET, "num_classes": scenes.NUM_CLASSES}})
    save_model(denoiser, build_adm(SMALL_ADM),
               {"name": "small-adm-random", "role": "denoiser", "family": "adm",
                "config": {"create_model_kwargs": SMALL_ADM}})
    return ({"segmenter": str(segmenter), "denoiser": str(denoiser)},
            "randomly initialised models of the shipped architectures (shipped weights not found)")


def main(
    images: Annotated[int, typer.Option(help="procedural held-out scenes")] = 5,
    n0: int = 10,
    n: int = 100,
    alpha: float = 0.001,
    sigma: Annotated[float, typer.Option(help="noise level σ")] = 0.25,
    method: Annotated[list[Method] | None, typer.Option(help="methods [segcertify denoisecertify]")] = None,
    batch: Annotated[int | None, typer.Option(help="engine batch (default: chosen from the image size and memory)")]
    = None,
    scene_size: Annotated[str, typer.Option(help="procedural scenes' HEIGHTxWIDTH (e.g. 512x1024, 1024x2048)")]
    = "128x256",
    precision: Annotated[Precision, typer.Option(help="engine precision: fp32 (identical certificates), bf16, fp16")]
    = Precision.fp32,
    compile: Annotated[bool, typer.Option(help="engine models compiled (certify --compile); the first image pays "
                                               "the compilation")] = False,
    fold_batchnorm: Annotated[bool, typer.Option(help="engine folds BatchNorm into the convolutions (as certify "
                                                      "does by default)")] = True,
    factor_head: Annotated[bool, typer.Option(help="engine factors HRNet's head (as certify does by default)")]
    = True,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available)")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("bench-compare"),
    isolate: Annotated[bool, typer.Option(
        help="engine and baseline each in a fresh process, so each peak RSS is its own")] = True,
    variant: Annotated[str | None, typer.Option(hidden=True, help="engine or baseline: this variant only")] = None,
) -> None:
    """Engine vs authors-style baseline on the procedural scenes: samples/s side by side."""
    models, provenance = _models(out / "models")
    engine = Settings(n0=n0, n=n, alpha=alpha, batch=batch, precision=precision, device=device,
                      compile=compile, fold_batchnorm=fold_batchnorm, factor_head=factor_head, **models)
    config = BenchConfig(engine=engine, images=images, methods=tuple(method or Method), sigmas=(sigma,),
                         threads=threads, out=out, baseline=variant != "engine",
                         scene_size=parse_size(scene_size, "--scene-size"))
    if variant not in (None, "engine", "baseline"):
        raise typer.BadParameter(f"--variant must be engine or baseline, got {variant!r}")
    if isolate and variant is None:
        argv = ["--images", str(images), "--n0", str(n0), "--n", str(n), "--alpha", str(alpha), "--sigma", str(sigma),
                "--scene-size", scene_size, "--precision", precision.value, "--out", str(out),
                *(a for m in method or () for a in ("--method", m.value)), *(("--compile",) if compile else ()),
                *(() if fold_batchnorm else ("--no-fold-batchnorm",)),
                *(() if factor_head else ("--no-factor-head",)),
                *(() if batch is None else ("--batch", str(batch))),
                *(() if threads is None else ("--threads", str(threads))),
                *(() if device is None else ("--device", device))]
        for part in ("engine", "baseline"):  # the baseline run resumes the file: it computes its own entries only
            environ = dict(os.environ)
            if part == "engine":  # allocating as certseg does (glibc reads its variables at start)
                allocators_environment(environ)
            code = subprocess.run([sys.executable, "-m", "certseg.bench.baseline_compare", *argv, "--variant", part],
                                  check=False, env=environ).returncode
            if code != 0:
                raise SystemExit(f"baseline_compare: the {part} process failed (exit code {code})")
    run = prepare(config)
    entries = execute(run)
    if variant is not None:
        return
    comparisons = compare(entries)
    machine = describe_machine(calibrate=True)  # after both runs: the calibration never overlaps them
    console = Console(width=180)
    header, body = comparison_table(comparisons)
    console.print(f"models: {provenance}; device {run.device}, engine precision {precision}"
                  f"{' compiled' if compile else ''}{'' if fold_batchnorm else ', BatchNorm unfolded'}"
                  f"{'' if factor_head else ', head unfactored'}, torch threads {torch.get_num_threads()}")
    console.print(f"machine: {machine_line(machine)}")
    for row in [header, *body]:
        console.print(" | ".join(row))
    summary = [
        {"method": c.method, "sigma": c.sigma, "images": c.images,
         "engine_samples_per_second": c.engine_samples_per_second,
         "baseline_samples_per_second": c.baseline_samples_per_second, "sampling_speedup": c.sampling_speedup,
         "engine_seconds_per_image": c.engine_seconds_per_image,
         "baseline_seconds_per_image": c.baseline_seconds_per_image, "end_to_end_speedup": c.end_to_end_speedup,
         "certify_speedup": c.certify_speedup, "identical_certificates": c.identical_certificates,
         "engine_peak_rss_mib": c.engine_peak_rss_mib, "baseline_peak_rss_mib": c.baseline_peak_rss_mib}
        for c in comparisons
    ]
    record = {"models": provenance, "precision": precision, "compile": compile, "fold_batchnorm": fold_batchnorm,
              "factor_head": factor_head,
              "device": str(run.device),
              "scene_size": scene_size, "threads": torch.get_num_threads(), "isolated_processes": isolate,
              "machine": machine,
              "rows": summary}
    (out / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"report: {write_report(out, run.results.header, entries)}")


if __name__ == "__main__":
    typer.run(main)
