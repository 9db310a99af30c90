"""Benchmark (not a test): how often a lower precision gives the per-pixel class fp32 gives, on the same samples.

    python -m certseg.bench.precision_agreement [--precision bf16 --images 20 --samples 8 --sigma 0.25
                                                 --compile --out precision-agreement.jsonl]

A lower precision is only honest for certification if the base classifier it runs is (almost) the fp32 one: the
certificate is then about the classifier that actually ran, and the README can say how far it is from fp32. For
each held-out procedural scene and method, the same noisy samples (same root seed, same sample indices, so the
same noise) are labelled through the runtime ``certseg certify`` builds, once in fp32 and once at ``--precision``;
the agreement is the share of (sample, pixel) pairs with equal labels (the issue's bar before a precision may be
recommended: 99.9%). The fp32 reference runs on the runtime the compared precision runs on (torch for bf16/fp16,
ONNX Runtime for int8, whose graphs only it runs), so each line also times both on the same samples (the runtime
and, for int8, its quantised graphs are built before the clock starts). ``--compile`` compares the models compiled
(``certseg certify --compile``) at ``--precision`` (fp32 too) with fp32 eager; they are compiled on a first pass over
the first scene's samples, before the clock starts. The reference runs the models as published (BatchNorms as
such, HRNet's head in the official order); the compared runs fold the BatchNorms into their convolutions and factor
the head as ``certseg certify`` does (``--no-fold-batchnorm``, ``--no-factor-head``: not), so ``--precision fp32``
alone measures what those rewrites change. One JSON line per (method, scene) is
written as it finishes, and a rerun skips those. Certified accuracy at each precision comes from
``certseg-bench --precision``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from certseg.bench.config import parse_size
from certseg.bench.results import append_line, read_lines
from certseg.engine.choices import Method, Precision, RuntimeName
from certseg.engine.commands.cli_common import one_line_errors, run_cli
from certseg.engine.errors import InputError
from certseg.engine.runtimes.process import THREADS_HELP, set_threads, tune_allocators

if TYPE_CHECKING:
    from certseg.engine.runtimes.session import Session

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


def compared_runtime(precision: Precision) -> RuntimeName:
    """Where ``precision`` runs with the shipped models (int8: ONNX Runtime; else torch): the reference's runtime."""
    from certseg.engine.runtimes.settings import Settings

    runtime = Settings(precision=precision, device="cpu").resolved().runtime
    assert runtime is not None
    return runtime


def compared_rewrites(precision: Precision, fold_batchnorm: bool, factor_head: bool) -> tuple[bool, bool]:
    """Whether the compared runs fold BatchNorm and factor HRNet's head (``Settings.folds_batchnorm``,
    ``factors_head``: on torch only)."""
    from certseg.engine.runtimes.settings import Settings

    settings = Settings(precision=precision, device="cpu", fold_batchnorm=fold_batchnorm, factor_head=factor_head)
    return settings.folds_batchnorm, settings.factors_head


@functools.cache
def _session(method: Method, precision: Precision, sigma: float, runtime: RuntimeName | None,
             threads: int | None, compile: bool = False, fold: bool = False, factor: bool = False) -> Session:
    """One session per (method, precision, σ, runtime, compile, fold, factor) for the whole run: its runtimes are
    built once per size."""
    from certseg.engine.runtimes.session import Session
    from certseg.engine.runtimes.settings import Settings

    settings = Settings(method=method, precision=precision, sigma=sigma, device="cpu", runtime=runtime,
                        compile=compile, fold_batchnorm=fold, factor_head=factor)
    return Session.open(settings, threads=threads)


_WARM: set[tuple[Any, ...]] = set()
"""The (session, image size) pairs whose compiled models have run once (compiled) in this process."""


def _labels(method: Method, precision: Precision, sigma: float, image: np.ndarray, seed: int, samples: int,
            runtime: RuntimeName | None, threads: int | None, compile: bool = False, fold: bool = False,
            factor: bool = False) -> tuple[np.ndarray, float]:
    """Label maps (samples, H, W) of samples 0 .. samples-1 of root seed ``seed`` and the seconds they took (the
    runtime is built, and compiled models compiled, before the clock starts)."""
    size = (int(image.shape[1]), int(image.shape[2]))
    key = (method, precision, sigma, runtime, threads, compile, fold, factor)
    _, labeller = _session(*key).runtime_for(size)
    if compile and (key, size) not in _WARM:  # compiling is a one-off per process, not the precision's speed
        list(labeller.labels(image, sigma=sigma, seed=seed, start=0, count=samples))
        _WARM.add((key, size))
    started = time.perf_counter()
    labels = np.concatenate(list(labeller.labels(image, sigma=sigma, seed=seed, start=0, count=samples)))
    return labels, time.perf_counter() - started


def labels_at(method: Method, precision: Precision, sigma: float, image: np.ndarray, seed: int,
              samples: int, *, runtime: RuntimeName | None = None, threads: int | None = None) -> np.ndarray:
    """Label maps (samples, H, W) of samples 0 .. samples-1 of root seed ``seed``, shipped models, CPU
    (``runtime`` None: the precision's default)."""
    return _labels(method, precision, sigma, image, seed, samples, runtime, threads)[0]


def scene_agreement(method: Method, precision: Precision, sigma: float, image: np.ndarray, seed: int,
                    samples: int, *, threads: int | None = None, compile: bool = False,
                    fold: bool = False, factor: bool = False) -> dict[str, Any]:
    """``precision`` (compiled with ``compile``, BatchNorm folded with ``fold``, HRNet's head factored with
    ``factor``) against fp32 eager as published (BatchNorm unfolded, the official head), on the same samples of
    one scene."""
    runtime = compared_runtime(precision)
    reference, reference_s = _labels(method, Precision.fp32, sigma, image, seed, samples, runtime, threads)
    lower, lower_s = _labels(method, precision, sigma, image, seed, samples, runtime, threads, compile, fold,
                             factor)
    same = reference == lower
    per_sample = same.reshape(samples, -1).mean(axis=1)
    return {"pixels": int(same.size), "equal": int(same.sum()), "agreement": float(same.mean()),
            "worst_sample_agreement": float(per_sample.min()), "runtime": runtime.value,
            "seconds_fp32": reference_s, "seconds": lower_s}


@app.command()
@one_line_errors("certseg-bench")
def main(
    precision: Annotated[Precision, typer.Option(help="the precision compared with fp32")] = Precision.bf16,
    images: Annotated[int, typer.Option(help="held-out procedural scenes")] = 20,
    samples: Annotated[int, typer.Option(help="noisy samples per scene")] = 8,
    sigma: Annotated[float, typer.Option(help="noise level σ")] = 0.25,
    method: Annotated[list[Method] | None, typer.Option(help="methods [segcertify denoisecertify]")] = None,
    scene_size: Annotated[str, typer.Option(help="HEIGHTxWIDTH of the scenes")] = "128x256",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    compile: Annotated[bool, typer.Option(help="compare the models compiled (certify --compile), fp32 included, "
                                                "with fp32 eager")] = False,
    fold_batchnorm: Annotated[bool, typer.Option(help="the compared runs fold BatchNorm into the convolutions "
                                                      "(as certify); the fp32 reference never does")] = True,
    factor_head: Annotated[bool, typer.Option(help="the compared runs factor HRNet's head (as certify); the fp32 "
                                                   "reference never does")] = True,
    out: Annotated[Path, typer.Option(help="JSON lines, one per (method, scene); resumed")] = Path(
        "precision-agreement.jsonl"),
) -> None:
    """Per-pixel agreement of a lower precision with fp32 on the same noisy samples."""
    from certseg.bench.datasets import open_dataset

    fold, factor = compared_rewrites(precision, fold_batchnorm, factor_head)
    if precision == Precision.fp32 and not (compile or fold or factor):
        raise InputError("--precision fp32 --no-fold-batchnorm --no-factor-head is the reference: compare bf16, fp16 "
                         "or int8, or fp32 with --compile, folded BatchNorm or a factored head")
    if compile and compared_runtime(precision) != RuntimeName.torch:
        raise InputError(f"--compile compiles torch models; {precision.value} runs on ONNX Runtime")
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    set_threads(threads)
    dataset = open_dataset(None, None, images=images, scene_size=parse_size(scene_size, "--scene-size"))
    done = {(r["method"], r["scene"], r["precision"], r["samples"], r["sigma"], r["scene_size"],
             r.get("compile", False), r.get("fold_batchnorm", False), r.get("factor_head", False))
            for r in read_lines(out)}
    for chosen in method or list(Method):
        for item in dataset.take(images):
            key = (chosen.value, item.id, precision.value, samples, sigma, scene_size, compile, fold, factor)
            if key in done:
                continue
            image, _ = item.load()
            record = {"method": chosen.value, "scene": item.id, "precision": precision.value, "samples": samples,
                      "sigma": sigma, "scene_size": scene_size, "compile": compile, "fold_batchnorm": fold,
                      "factor_head": factor,
                      **scene_agreement(chosen, precision, sigma, image, seed=item.index, samples=samples,
                                         threads=threads, compile=compile, fold=fold, factor=factor)}
            append_line(out, record)
            typer.echo(f"{chosen.value} {item.id}: {record['agreement']:.5f}")
    summarise(out, precision, samples, sigma, scene_size, compile, fold, factor)


def summarise(out: Path, precision: Precision, samples: int, sigma: float, scene_size: str,
              compile: bool = False, fold: bool = False, factor: bool = False) -> None:
    """Per method: pooled agreement over all finished scenes, and the worst scene's."""
    rows = [r for r in read_lines(out)
            if (r["precision"], r["samples"], r["sigma"], r["scene_size"], r.get("compile", False),
                r.get("fold_batchnorm", False), r.get("factor_head", False))
            == (precision.value, samples, sigma, scene_size, compile, fold, factor)]
    name = (precision.value + (" compiled" if compile else "") + (" folded" if fold else "")
            + (" head-factored" if factor else ""))
    for chosen in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == chosen]
        pooled = sum(r["equal"] for r in mine) / sum(r["pixels"] for r in mine)
        worst = min(r["agreement"] for r in mine)
        typer.echo(f"{chosen}: {name} agrees with fp32 on {pooled:.5%} of {len(mine)} scenes' "
                   f"(sample, pixel) pairs; worst scene {worst:.5%}")
        timed = [r for r in mine if "seconds" in r]
        if timed:
            count = sum(r["samples"] for r in timed)
            reference = count / sum(r["seconds_fp32"] for r in timed)
            typer.echo(f"{chosen}: samples/s on {timed[0]['runtime']}: fp32 {reference:.1f}, "
                       f"{name} {count / sum(r['seconds'] for r in timed):.1f}")


if __name__ == "__main__":
    tune_allocators()
    run_cli(app, "certseg-bench")
