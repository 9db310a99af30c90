"""``certseg-export``: export the segmenter and denoiser to ONNX (+ FP16, + TensorRT where installed).

A model given as an ``.onnx`` file (bring your own) is copied unchanged and served as given; ``--seg-mean``,
``--seg-std``, ``--seg-input-size`` and ``--classes`` override what the segmenter states, as in ``certseg certify``.

Thin by design: resolve the models, call ``certseg.export.models.export_models``, print progress and a summary.
Every failure a user can cause ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from certseg.engine.choices import Exporter, Method, Profile
from certseg.engine.commands.cli_common import (
    ClassesOption,
    SegInputSizeOption,
    SegMeanOption,
    SegStdOption,
    ThreadsOption,
    one_line_errors,
    run_cli,
)
from certseg.engine.errors import InputError
from certseg.engine.runtimes.process import enable_huge_pages, set_threads

if TYPE_CHECKING:
    from certseg.export.result import ExportResult

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])
console = Console(highlight=False)


def _load(method: Method, segmenter: str | None, denoiser: str | None, **overrides):
    from certseg.engine.models.facts import with_overrides
    from certseg.engine.models.registry import default_model, load_model

    segmenter_model = with_overrides(load_model(segmenter or default_model("segmenter", method.value), "segmenter"),
                                     **overrides)
    contract = getattr(segmenter_model.module, "contract", None)
    if contract is not None and overrides.get("input_size") is not None:
        contract.check_size(segmenter_model.input_size, "--seg-input-size")
    denoiser_model = None
    if method is Method.denoisecertify:
        denoiser_model = load_model(denoiser or default_model("denoiser", method.value), "denoiser")
    return segmenter_model, denoiser_model


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _worst(parity: list[dict[str, float]], key: str, pick=max) -> str:
    if not parity:
        return "-"
    value = pick(p[key] for p in parity)
    return f"{value:.2e}" if key == "max_abs" else f"{value:.6f}"


def summary(result: ExportResult) -> Table:
    """Files, sizes and worst-case parity per graph."""
    table = Table(title=f"exported to {result.out_dir}")
    table.add_column("graph")
    table.add_column("file", no_wrap=True)
    for column in ("size", "fp32 |Δ|", "fp16 |Δ|", "fp16 agree"):
        table.add_column(column, justify="right", no_wrap=True)
    for role, graph in result.graphs.items():
        fp32, fp16 = graph.parity.get("fp32", []), graph.parity.get("fp16", [])
        table.add_row(role, graph.path.name, _size(graph.path), _worst(fp32, "max_abs"), _worst(fp16, "max_abs"),
                      _worst(fp16, "argmax_agreement", min))
        for extra in graph.files()[1:]:
            table.add_row("", extra.name, _size(extra), "", "", "")
    return table


def serve_export_from(result: ExportResult, repository: Path, profile: Profile,
                          max_request_bytes: int | None = None) -> None:
    """Render a Triton repository serving this export (its TensorRT profiles end at its max batch)."""
    from certseg.export.repository import write_repository

    options = {} if max_request_bytes is None else {"max_request_bytes": max_request_bytes}
    write_repository(result.model_files(), repository, profile=profile, max_batch=result.max_batch, **options)
    console.print(f"wrote the Triton model repository {repository} ({profile.value} profile)")


@app.command()
@one_line_errors("certseg-export")
def export(
    segmenter: Annotated[str | None, typer.Option(help="shipped model name, checkpoint path or your own .onnx file, "
                                                       "copied unchanged (default: the shipped default for --method)")
                         ] = None,
    denoiser: Annotated[str | None, typer.Option(help="shipped model name, checkpoint path or your own .onnx file "
                                                      "(default: the shipped default)")] = None,
    method: Annotated[Method, typer.Option(help="segcertify exports the segmenter only")] = (
        Method.denoisecertify
    ),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("exported"),
    image_size: Annotated[tuple[int, int] | None, typer.Option(
        "--image-size", help="H W of the images the deployment serves (default: a shipped segmenter's scene size)"
    )] = None,
    scale: Annotated[float, typer.Option(help="segmenter input size as a fraction of the image size")] = 1.0,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="also write *.fp16.onnx")] = True,
    tensorrt: Annotated[bool | None, typer.Option(
        "--tensorrt/--no-tensorrt", help="build TensorRT engines (default: when TensorRT is installed)"
    )] = None,
    max_batch: Annotated[int, typer.Option(help="largest batch the engines and the server take")] = 16,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 18)")] = 18,
    exporter: Annotated[Exporter, typer.Option(help="torch.onnx exporter")] = Exporter.legacy,
    parity: Annotated[bool, typer.Option("--parity/--no-parity", help="measure ONNX Runtime vs PyTorch")] = True,
    threads: ThreadsOption = None,
    repository: Annotated[Path | None, typer.Option(help="also write a Triton model repository here")] = None,
    profile: Annotated[Profile, typer.Option(help="Triton repository profile")] = Profile.cpu,
    max_request_bytes: Annotated[int | None, typer.Option(
        help="repository: the most bytes of noisy images one request may make (COUNT x C x H x W float32; "
        "default 268435456); clients split their requests to fit")] = None,
    seg_mean: SegMeanOption = None,
    seg_std: SegStdOption = None,
    seg_input_size: SegInputSizeOption = None,
    classes: ClassesOption = None,
) -> None:
    """Export the models of a certseg deployment: ONNX graphs, FP16 variants, TensorRT plans, export.json."""
    from certseg.export.models import default_image_size, export_models
    from certseg.export.parity import PARITY_BATCHES

    set_threads(None if threads is None else max(1, threads))  # 0 or less: 1, as it always was
    if max_request_bytes is not None and max_request_bytes < 1:
        raise InputError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    segmenter_model, denoiser_model = _load(method, segmenter, denoiser, mean=seg_mean, std=seg_std,
                                            input_size=seg_input_size, classes_file=classes)
    if segmenter_model.input_size is not None and scale != 1.0:
        raise InputError(f"{segmenter_model.name} takes a fixed {segmenter_model.input_size[0]}x"
                         f"{segmenter_model.input_size[1]} input, so --scale does not apply: leave it out")
    size = tuple(image_size) if image_size is not None else default_image_size(segmenter_model.name,
                                                                                segmenter_model.input_size)
    with console.status("exporting"):
        result = export_models(
            segmenter_model, denoiser_model, out, image_size=size, max_batch=max_batch, fp16=fp16,
            tensorrt=tensorrt, scale=scale, opset=opset, exporter=exporter.value,
            parity_batches=PARITY_BATCHES if parity else (), threads=threads,
            log=lambda message: console.print(f"• {message}", soft_wrap=True),
        )
    console.print(summary(result))
    console.print(f"wrote {result.manifest}")
    if repository is not None:
        serve_export_from(result, repository, profile, max_request_bytes)


def main() -> None:
    enable_huge_pages()  # before anything imports torch
    run_cli(app, "certseg-export")


if __name__ == "__main__":
    main()
