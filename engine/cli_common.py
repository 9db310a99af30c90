"""What the three command-line programs share: option choices and the one-line failure."""

from __future__ import annotations

from enum import StrEnum
from typing import NoReturn

import typer


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
