"""``certseg-bench``: the paper's certification protocol on a dataset, with speed measured side by side.

    certseg-bench --images 100 --method segcertify denoisecertify --sigma 0.25 0.5 1.0 --scale 0.25 0.5 1.0 \\
        [--dataset cityscapes --root DIR] --n0 10 --n 100 --alpha 0.001 --tau 0.75 --seed 0 --out DIR [--report]

``--method``, ``--sigma``, ``--scale`` and ``--denoise-steps`` take several values, either space-separated after
one flag (as above) or by repeating the flag (``--sigma 0.25 --sigma 0.5``): ``expand_multi_values`` rewrites the
first form into the second before Typer parses. Without ``--dataset``/``--root`` the procedural held-out scenes are
used. Results go to ``DIR/results.jsonl`` as they finish; rerunning the same command resumes. ``--runtime triton``
certifies on ``--server HOST:PORT ...`` (or on the bundled tritonserver, started for the run), several images at
once (``--images-in-flight``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from certseg.bench.config import GRID_AXES, BenchConfig, parse_size
from certseg.engine.choices import Dataset, Method, Protocol, SharedMemory
from certseg.engine.commands.cli_common import (
    MaxPixelsOption,
    ThreadsOption,
    one_line_errors,
    run_cli,
    settings_options,
)
from certseg.engine.errors import CertsegError
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.runtimes.process import tune_allocators
from certseg.engine.runtimes.settings import Settings

MULTI_VALUE_OPTIONS: tuple[str, ...] = ("--method", "--sigma", "--scale", "--denoise-steps", "--server")

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0], rich_markup_mode=None)


def expand_multi_values(argv: Sequence[str]) -> list[str]:
    """``--sigma 0.25 0.5`` → ``--sigma 0.25 --sigma 0.5`` for the multi-value options; everything else unchanged.

    certseg-bench takes no positional arguments, so every bare token after such a flag is one of its values.
    """
    out: list[str] = []
    flag: str | None = None
    values = 0
    for token in argv:
        if flag is not None and not token.startswith("-"):
            out += [flag, token]
            values += 1
            continue
        if flag is not None and values == 0:
            out.append(flag)  # no value: let the parser report it
        flag, values = (token, 0) if token in MULTI_VALUE_OPTIONS else (None, 0)
        if flag is None:
            out.append(token)
    if flag is not None and values == 0:
        out.append(flag)
    return out



def _print_table(console: Console, title: str, header: list[str], body: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in ("method", "variant") else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)


@app.command()
@one_line_errors("certseg-bench", interrupted="interrupted (finished entries are kept; rerun to resume)")
@settings_options(skip=GRID_AXES)
def bench(
    *,
    images: Annotated[int, typer.Option(help="number of protocol images (the paper: 100)")] = 100,
    dataset: Annotated[Dataset | None, typer.Option(help="default: procedural, or detected from --root")] = None,
    root: Annotated[Path | None, typer.Option(help="folder holding Cityscapes or Pascal-Context")] = None,
    data_seed: Annotated[int, typer.Option(help="procedural: first held-out scene index")] = 0,
    scene_size: Annotated[str | None, typer.Option(help="procedural: HEIGHTxWIDTH (default 128x256)")] = None,
    write_data: Annotated[Path | None, typer.Option(help="procedural: also write the scenes here (Cityscapes layout)")]
    = None,
    resize: Annotated[int | None, typer.Option(help="squash images to N×N (the peers' Pascal-Context: 480)")] = None,
    protocol: Annotated[Protocol, typer.Option(
        help="certseg: images at their size (or --resize), scale × image size; peers: the SegCertify/DenoiseCertify "
        "code's (Pascal-Context squashed to 480×480 and SegCertify's long side 520·scale; Cityscapes unchanged)")
    ] = Protocol.certseg,
    method: Annotated[list[Method] | None, typer.Option(help="one or more methods [both]")] = None,
    sigma: Annotated[list[float] | None, typer.Option(help="one or more noise levels σ [0.25 0.5 1.0]")] = None,
    scale: Annotated[list[float] | None, typer.Option(help="one or more segmenter input scales [1.0]")] = None,
    denoise_steps: Annotated[list[int] | None, typer.Option(
        help="one or more denoising step counts K of denoisecertify (1: one step, the paper) [1]")] = None,
    settings: Settings,
    seed: Annotated[int, typer.Option(help="root seed; each image's seed derives from it and its index")] = 0,
    out: Annotated[Path, typer.Option(help="output folder (results.jsonl, report.md, plots)")] = Path("bench-out"),
    baseline: Annotated[bool, typer.Option(help="also run the authors-style baseline (speed comparison)")] = False,
    report: Annotated[bool, typer.Option(
        help="write report.md and its figures (PNG, PDF, SVG; figures need certseg[bench])")] = False,
    radius_map: Annotated[bool, typer.Option(
        "--radius-map", help="per-pixel radius maps: certified accuracy as a function of radius")] = False,
    report_only: Annotated[bool, typer.Option(help="only render the report from an existing results.jsonl")] = False,
    save_labels: Annotated[bool, typer.Option(help="write every certified label map as a PNG")] = False,
    stage_timing: Annotated[bool, typer.Option(help="split time into stages")] = True,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    server: Annotated[list[str] | None, typer.Option(
        "--server", help="Triton gRPC endpoint HOST:PORT (repeat, or several values): certify on these servers "
        "(implies --runtime triton); --runtime triton without --server starts the bundled tritonserver for the "
        "run")] = None,
    images_in_flight: Annotated[int, typer.Option(
        help="--runtime triton: images certified at once, sharing the servers (the results do not depend on it)")] = 2,
    in_flight: Annotated[int, typer.Option(help="--runtime triton: requests in flight per server and image")] = 2,
    shared_memory: Annotated[SharedMemory, typer.Option(
        help="--runtime triton: system shared memory with servers on this machine")] = SharedMemory.auto,
    retries: Annotated[int, typer.Option(
        help="--runtime triton: retries of a failed batch before the run stops (a lost server's batches go to the "
        "others without using one)")] = 3,
) -> None:
    """Run every (image × method × σ × scale × K), print the paper's tables, write DIR/results.jsonl (resumable).

    --method, --sigma, --scale and --denoise-steps take one or more values, space-separated (--sigma 0.25 0.5 1.0)
    or repeated (--sigma 0.25 --sigma 0.5). Rerunning into the same --out skips finished entries.
    """
    from certseg.bench import plots
    from certseg.bench.report import protocol_line, write_report
    from certseg.bench.results import load_entries
    from certseg.bench.run import execute, prepare
    from certseg.bench.tables import (
        accuracy_table,
        aggregate,
        compare,
        comparison_table,
        radius_curves,
        radius_table,
        server_rows,
        server_table,
        stage_table,
        throughput_table,
    )
    from certseg.engine.core.radius import ACCURACY_RADII

    console = Console(width=None if sys.stdout.isatty() else 180)
    if report_only:
        header, entries = load_entries(out / "results.jsonl")
        if not entries:
            raise CertsegError(f"no entries in {out / 'results.jsonl'}")
    else:
        grid = {name: tuple(values) for name, values in (("methods", method), ("sigmas", sigma),
                                                              ("scales", scale), ("denoise_steps", denoise_steps))
                if values}
        config = BenchConfig(
            engine=settings, **grid, images=images, dataset=dataset, root=root, data_seed=data_seed,
            scene_size=None if scene_size is None else parse_size(scene_size, "--scene-size"),
            write_data=write_data, resize=resize, protocol=protocol, seed=seed, out=out,
            baseline=baseline, save_labels=save_labels, stage_timing=stage_timing, threads=threads,
            max_pixels=max_pixels, radius_map=radius_map, servers=tuple(server or ()),
            images_in_flight=images_in_flight, in_flight=in_flight, shared_memory=shared_memory, retries=retries,
        )
        run = prepare(config)
        entries = execute(run, show_progress=not quiet)
        header = run.results.header
    rows = aggregate(entries)
    _print_table(console, f"Certified segmentation — protocol {protocol_line(header)}", *accuracy_table(rows))
    _print_table(console, "Throughput", *throughput_table(rows))
    servers = server_rows(entries)
    if servers:
        _print_table(console, "Triton servers (samples each answered, as the client counted)",
                     *server_table(servers))
    if any(r.stages for r in rows):
        _print_table(console, "Seconds per image by stage", *stage_table(rows))
    curves = radius_curves(entries)
    if curves:
        _print_table(console, "Certified accuracy vs radius (per-pixel radius maps)",
                     *radius_table(curves, ACCURACY_RADII))
    comparisons = compare(entries)
    if comparisons:
        _print_table(console, "Engine vs authors-style baseline", *comparison_table(comparisons))
    console.print(f"results: {out / 'results.jsonl'} ({len(entries)} entries)")
    if report or report_only:
        console.print(f"report: {write_report(out, header, entries)}")
        if not plots.available():
            typer.echo(f"certseg-bench: {plots.MISSING}", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    tune_allocators()  # before anything imports torch or the runtime's helper thread allocates
    run_cli(app, "certseg-bench", expand_multi_values(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
