"""``certseg``: certify images (in-process or against Triton servers) and serve the engine.

Thin by design: parse, validate, call the engine, write outputs. Every failure a user can cause ends in one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from certseg.engine.errors import CertsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


class MethodChoice(str, Enum):
    denoisecertify = "denoisecertify"
    segcertify = "segcertify"


class FwerChoice(str, Enum):
    holm = "holm"
    bonferroni = "bonferroni"


class RuntimeChoice(str, Enum):
    torch = "torch"
    onnx = "onnx"


class RuleChoice(str, Enum):
    principled = "principled"
    authors = "authors"
    dds = "dds"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit; the first line of multi-line errors (details follow only with --debug)."""
    typer.echo(f"certseg: error: {message.strip().splitlines()[0] if message.strip() else 'failed'}", err=True)
    raise typer.Exit(code)


@app.callback()
def main_callback() -> None:
    """certseg: certified semantic segmentation (SegCertify / DenoiseCertify) at server scale."""


@app.command()
def certify(
    image: Annotated[Path, typer.Argument(help="image to certify (PNG 8/16-bit, JPEG; RGB, RGBA or gray)")],
    sigma: Annotated[float, typer.Option(help="noise level σ in [0,1] pixel space")] = 0.25,
    n0: Annotated[int, typer.Option(help="selection samples (mode per pixel)")] = 10,
    n: Annotated[int, typer.Option(help="estimation samples (binomial test)")] = 100,
    alpha: Annotated[float, typer.Option(help="family-wise error level over all pixels")] = 0.001,
    tau: Annotated[float, typer.Option(help="agreement threshold τ; radius R = σ·Φ⁻¹(τ)")] = 0.75,
    fwer: Annotated[FwerChoice, typer.Option(help="FWER control")] = FwerChoice.holm,
    method: Annotated[MethodChoice, typer.Option(help="denoise before segmenting, or not")] = MethodChoice.denoisecertify,
    segmenter: Annotated[str | None, typer.Option(help="shipped model name or checkpoint path")] = None,
    denoiser: Annotated[str | None, typer.Option(help="shipped model name or checkpoint path")] = None,
    scale: Annotated[float, typer.Option(help="segmenter input size as a fraction of the image size")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="root seed (drawn and recorded when omitted)")] = None,
    batch: Annotated[int, typer.Option(help="samples per forward pass")] = 16,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("certseg-out"),
    labels: Annotated[Path | None, typer.Option(help="ground-truth label PNG: adds accuracy and mIoU")] = None,
    runtime: Annotated[RuntimeChoice, typer.Option(help="in-process runtime")] = RuntimeChoice.torch,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
    precision: Annotated[PrecisionChoice, typer.Option(help="model precision (autocast)")] = PrecisionChoice.fp32,
    t_rule: Annotated[RuleChoice, typer.Option("--t-rule", help="how t* is matched to σ")] = RuleChoice.principled,
    antialias: Annotated[bool, typer.Option(help="antialiased resizes (the authors used none)")] = False,
    ignore_index: Annotated[int, typer.Option(help="label value ignored by the metrics")] = 255,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Certify every pixel of IMAGE: a class that provably holds within L2 radius R, or abstain."""
    from certseg.engine.certify_command import CertifyRequest, run_certify

    request = CertifyRequest(
        image=image, sigma=sigma, n0=n0, n=n, alpha=alpha, tau=tau, fwer=fwer.value, method=method.value,
        segmenter=segmenter, denoiser=denoiser, scale=scale, seed=seed, batch=batch, out=out, labels=labels,
        runtime=runtime.value, device=device, precision=precision.value, t_rule=t_rule.value,
        antialias=antialias, ignore_index=ignore_index, progress=not quiet,
    )
    started = time.perf_counter()
    try:
        summary = run_certify(request)
    except CertsegError as error:
        fail(str(error))
    except (ValueError, OSError) as error:
        fail(f"{error.__class__.__name__}: {error}")
    typer.echo(summary + f" ({time.perf_counter() - started:.1f} s)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("certseg: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
