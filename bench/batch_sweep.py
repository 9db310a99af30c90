"""Does a larger batch pay? ``python -m certseg.bench.batch_sweep --size 256x512 --batches 1 4 16 64 --out F.jsonl``.

Each (repeat, batch) certifies the shipped sample scene (``examples/street.png`` resized to ``--size``) with the
shipped models and a fixed seed in a fresh process, so its peak RSS, page faults and CPU seconds are its own
(``os.wait4``'s rusage of that child), with the same torch / OpenMP thread count for all. Repeats are interleaved
(1, 4, 16, 64, 1, 4, ...) so a slow spell of a shared machine hits every batch alike. The certificate cannot
depend on the batch (each sample has its own noise): its digest must be equal across batches, and the sweep fails
(exit 1) when it is not. One JSON line per finished run is appended (fsync'd) as it goes; rerunning with the same
settings skips the finished runs. ``model_s`` is the time inside the two models' forward passes (the stage
timer's hooks), ``overhead`` = certify wall / model_s: what batching is meant to bring towards 1.

The noise and the stage maths cannot make the digest depend on the batch; the models' CPU kernels can: oneDNN
may pick another convolution kernel for a batch of 1, whose outputs differ in the last bits, and then a few
pixels' counts (so the digest) differ between batch 1 and larger batches. The sweep reports which batches gave
which digest. Each child allocates as ``certseg``'s commands do (glibc keeping large blocks in its heap, torch's
huge pages only where it does not: ``process.allocators_environment``). ``--env NAME=VALUE``
runs every child with extra environment, which wins over those, to compare allocator settings: with glibc's
defaults (``--env MALLOC_MMAP_MAX_=65536``) much of the system time that grows with the batch is page faults on
the models' activations, which glibc serves from fresh ``mmap``s above 32 MiB.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from certseg.bench.config import parse_size
from certseg.bench.results import append_line, read_lines
from certseg.engine.commands.cli_common import run_cli
from certseg.engine.digest import certificate_sha256
from certseg.engine.errors import InputError
from certseg.engine.runtimes.process import allocators_environment

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0], rich_markup_mode=None)

KEY_FIELDS: tuple[str, ...] = (
    "size", "method", "runtime", "batch", "repeat", "threads", "n0", "n", "seed", "sigma", "env")
"""What names a run: a line with the same values is a finished run, never repeated."""

console = Console()


def sample_image(size: tuple[int, int]) -> np.ndarray:
    """``examples/street.png`` as (3, H, W) float32 in [0, 1] at ``size``: bilinear, antialiased, clamped."""
    import torch
    import torch.nn.functional as F

    import certseg.examples
    from certseg.engine.files.images import read_image

    image = torch.from_numpy(read_image(Path(certseg.examples.__path__[0]) / "street.png"))
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return resized.clamp(0.0, 1.0).numpy()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run, in this (fresh) process: certify the sample image at ``spec``'s settings; what it measured."""
    import torch

    from certseg.bench.timing import StageTimer
    from certseg.engine.runtimes.session import Session
    from certseg.engine.runtimes.settings import Settings

    torch.set_num_threads(int(spec["threads"]))
    image = sample_image(parse_size(spec["size"]))
    settings = Settings(method=spec["method"], sigma=spec["sigma"], n0=spec["n0"], n=spec["n"], batch=spec["batch"],
                        runtime=spec["runtime"], device="cpu")
    timer = StageTimer("cpu")
    session = Session(Session.open(settings).backend, wrap_runtime=timer.wrap)
    started = time.perf_counter()
    result, _ = session.certify(image, seed=spec["seed"])
    certify_s = time.perf_counter() - started
    stages = timer.snapshot()
    model_s = stages["denoise"] + stages["segment"]
    return {"digest": certificate_sha256(result.labels, result.certificate.agree), "certify_s": certify_s,
            "model_s": model_s, "overhead": certify_s / model_s if model_s > 0 else None, "stages": stages,
            "abstain_fraction": float(result.abstain_fraction)}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` in a fresh process with ``spec["threads"]`` OpenMP threads; its report plus its own rusage."""
    env = dict(os.environ, **parse_env(spec.get("env", "")), OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]))
    allocators_environment(env)  # as the console entry points set them; the user's --env wins
    command = [sys.executable, "-m", "certseg.bench.batch_sweep", "--child", json.dumps(spec)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"batch {spec['batch']} run failed (exit {process.returncode}): {last}")
    report = json.loads(stdout.strip().splitlines()[-1])
    peak_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    return {**spec, **report, "process_s": wall, "user_s": usage.ru_utime, "system_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt, "peak_rss_mib": peak_kib / 1024}


def run_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(name, "" if name == "env" else None) for name in KEY_FIELDS)


def parse_env(text: str) -> dict[str, str]:
    """``"A=1 B=2"`` → {"A": "1", "B": "2"}: extra environment of every run (allocator knobs, say)."""
    pairs = {}
    for item in text.split():
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise InputError(f"--env takes NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def sweep(specs: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Run every spec not yet in ``out`` (in order), appending each result as it finishes; all results."""
    done = {run_key(r): r for r in read_lines(out, repair=True) if r.get("kind") == "batch_sweep"}
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if run_key(spec) in done:
            console.print(f"batch {spec['batch']} repeat {spec['repeat']}: done earlier, skipped")
            continue
        console.print(f"batch {spec['batch']} repeat {spec['repeat']}: running")
        record = {"kind": "batch_sweep", **run_child(spec)}
        append_line(out, record)
        done[run_key(spec)] = record
    return [done[run_key(spec)] for spec in specs]


def summary_table(records: list[dict[str, Any]]) -> Table:
    """Medians per batch over the repeats."""
    table = Table(title="batch sweep (medians over repeats)")
    for column in ("batch", "runs", "certify s", "model s", "× model", "user s", "sys s", "minflt", "RSS MiB",
                   "digest"):
        table.add_column(column, justify="left" if column == "digest" else "right")
    for batch in sorted({r["batch"] for r in records}):
        rows = [r for r in records if r["batch"] == batch]

        def median(name: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(r[name] for r in rows)

        overheads = [r["overhead"] for r in rows if r.get("overhead") is not None]
        table.add_row(str(batch), str(len(rows)), f"{median('certify_s'):.2f}", f"{median('model_s'):.2f}",
                      f"{statistics.median(overheads):.3f}" if overheads else "-", f"{median('user_s'):.2f}",
                      f"{median('system_s'):.2f}", f"{median('minor_faults'):,.0f}", f"{median('peak_rss_mib'):.0f}",
                      " ".join(sorted({r["digest"][:10] for r in rows})))
    return table


def expand_batches(argv: list[str]) -> list[str]:
    """``--batches 1 4 16`` → ``--batches 1 --batches 4 --batches 16`` (the command takes no positional arguments,
    so every bare token after ``--batches`` is one of its values); everything else unchanged."""
    out: list[str] = []
    inside, values = False, 0
    for token in argv:
        if inside and not token.startswith("-"):
            out += ["--batches", token]
            values += 1
            continue
        if inside and values == 0:
            out.append("--batches")  # no value: let the parser report it
        inside, values = token == "--batches", 0
        if not inside:
            out.append(token)
    if inside and values == 0:
        out.append("--batches")
    return out


@app.command()
def sweep_command(
    size: Annotated[str, typer.Option(help="image size HxW the sample scene is resized to")] = "256x512",
    batches: Annotated[list[int], typer.Option(help="batch sizes to compare")] = [1, 4, 16, 64],  # noqa: B006
    method: Annotated[str, typer.Option(help="denoisecertify or segcertify")] = "denoisecertify",
    runtime: Annotated[str, typer.Option(help="in-process runtime: torch or onnx")] = "torch",
    repeats: Annotated[int, typer.Option(help="runs per batch, interleaved across batches")] = 2,
    threads: Annotated[int | None, typer.Option(help="torch / OpenMP threads of every run (default: all cores)")]
    = None,
    n0: Annotated[int, typer.Option(help="selection samples")] = 10,
    n: Annotated[int, typer.Option(help="estimation samples")] = 100,
    sigma: Annotated[float, typer.Option(help="noise level")] = 0.25,
    seed: Annotated[int, typer.Option(help="root seed (fixed: the digests must agree)")] = 21,
    out: Annotated[Path, typer.Option(help="JSON lines, one per finished run; rerun to resume")] = Path(
        "batch_sweep.jsonl"),
    env: Annotated[list[str] | None, typer.Option(
        help="NAME=VALUE set in every run's environment (repeat the flag), e.g. allocator knobs to compare")] = None,
    child_spec: Annotated[str | None, typer.Option("--child", hidden=True)] = None,
) -> None:
    """Certify the sample scene at each batch size in fresh processes; compare time, memory and digests."""
    if child_spec is not None:
        print(json.dumps(child(json.loads(child_spec))))
        return
    try:
        height, width = parse_size(size)
        if not batches or min(batches) < 1 or repeats < 1 or (threads is not None and threads < 1):
            raise InputError("--batches, --repeats and --threads must be >= 1")
        threads = threads or len(os.sched_getaffinity(0))
        extra = " ".join(sorted(env or ()))
        parse_env(extra)
        specs = [{"size": f"{height}x{width}", "method": method, "runtime": runtime, "batch": batch,
                  "repeat": repeat, "threads": threads, "n0": n0, "n": n, "seed": seed, "sigma": sigma,
                  "env": extra}
                 for repeat in range(repeats) for batch in dict.fromkeys(batches)]
        records = sweep(specs, out)
    except (InputError, RuntimeError) as error:
        console.print(f"batch_sweep: {error}", style="red", highlight=False)
        raise typer.Exit(1) from None
    console.print(summary_table(records))
    digests = {r["digest"] for r in records}
    if len(digests) != 1:
        by_digest = {d: sorted({r["batch"] for r in records if r["digest"] == d}) for d in sorted(digests)}
        groups = "; ".join(f"{d[:12]}: batch {' '.join(map(str, group))}" for d, group in by_digest.items())
        console.print(f"batch_sweep: the certificates differ across batches ({groups})", style="red", highlight=False)
        raise typer.Exit(1)
    console.print(f"one certificate for every batch: {digests.pop()}")


def main(argv: list[str] | None = None) -> None:
    run_cli(app, "batch_sweep", expand_batches(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    main()
