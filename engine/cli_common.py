"""What the three command-line programs share: option choices and the one-line failure."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn, ParamSpec, TypeVar

import typer

P = ParamSpec("P")
R = TypeVar("R")


class MethodChoice(StrEnum):
    denoisecertify = "denoisecertify"
    segcertify = "segcertify"


class FwerChoice(StrEnum):
    holm = "holm"
    bonferroni = "bonferroni"


class RuleChoice(StrEnum):
    principled = "principled"
    authors = "authors"
    dds = "dds"


class PrecisionChoice(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class ProfileChoice(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


def fail(program: str, message: str, code: int = 2) -> NoReturn:
    """Print the first line of ``message`` as ``program: error: ...`` on stderr and exit non-zero."""
    text = message.strip()
    typer.echo(f"{program}: error: {text.splitlines()[0] if text else 'failed'}", err=True)
    raise typer.Exit(code)


def interruptible(message: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Ctrl-C anywhere in the decorated command: ``message`` on stderr and exit code 130.

    Caught inside the command because Typer turns a KeyboardInterrupt that reaches it into a silent exit 130, so
    a handler around ``app()`` never runs.
    """

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                typer.echo(message, err=True)
                raise typer.Exit(130) from None

        return run

    return decorate


# The options that describe a bring-your-own ONNX segmenter, shared by `certseg certify` and `certseg-export`.
SegMeanOption = Annotated[tuple[float, float, float] | None, typer.Option(
    help="segmenter input mean R G B, in its input range's units (default: what the model states)")]
SegStdOption = Annotated[tuple[float, float, float] | None, typer.Option(
    help="segmenter input std R G B, in its input range's units (default: what the model states)")]
SegInputSizeOption = Annotated[tuple[int, int] | None, typer.Option(
    help="feed the segmenter H W whatever the image size (default: what the model states, else --scale)")]
ClassesOption = Annotated[Path | None, typer.Option(
    help="JSON class names (a list, or {\"classes\": [...], \"palette\": [[r, g, b], ...]})")]
