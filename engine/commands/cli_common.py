"""What the three command-line programs share: the engine options (one per ``Settings`` field), the one-line
failure, Ctrl-C handling."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection
from dataclasses import fields
from enum import StrEnum
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from certseg.engine.errors import CertsegError, first_line
from certseg.engine.runtimes.process import THREADS_HELP
from certseg.engine.runtimes.settings import AUTO, Settings, setting_types

P = ParamSpec("P")
R = TypeVar("R")


def fail(program: str, message: str, code: int = 2) -> NoReturn:
    """Print the first line of ``message`` as ``program: error: ...`` on stderr and exit non-zero."""
    text = message.strip()
    typer.echo(f"{program}: error: {text.splitlines()[0] if text else 'failed'}", err=True)
    raise typer.Exit(code)


def one_line_errors(program: str, interrupted: str = "interrupted") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """What every certseg command does with a failure a user can cause: one line on stderr, a non-zero exit.

    ``CertsegError``: its first line; ``ValueError``/``OSError``: the class and first line; running out of memory
    (``MemoryError``, a CUDA or allocator "out of memory"): a line naming --batch; Ctrl-C: ``program: interrupted``
    and exit code 130. Caught inside the command because Typer turns a KeyboardInterrupt that reaches it into a
    silent exit 130, so a handler around ``app()`` never runs. Anything else is a bug and keeps its traceback.
    """

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                typer.echo(f"{program}: {interrupted}", err=True)
                raise typer.Exit(130) from None
            except CertsegError as error:
                fail(program, str(error))
            except (ValueError, OSError) as error:
                fail(program, first_line(error, with_type=True))
            except MemoryError:
                fail(program, "out of memory: lower --batch or --max-pixels; nothing was written")
            except RuntimeError as error:
                if "out of memory" not in str(error).lower():
                    raise
                fail(program, f"{first_line(error, with_type=True)}: lower --batch or certify a smaller image; "
                     "nothing was written")

        return run

    return decorate


def setting_option(name: str) -> Any:
    """The Typer option of ``Settings`` field ``name``: its type and the help the field carries; a field that takes
    ``auto`` (None) gets a parser that takes it beside the field's values, and shows it as the default."""
    field = next(f for f in fields(Settings) if f.name == name)
    kind = setting_types()[name]
    if not field.metadata.get("auto"):
        return Annotated[kind, typer.Option(help=field.metadata["help"])]
    inner = next(t for t in typing.get_args(kind) if t is not type(None))
    if isinstance(inner, type) and issubclass(inner, StrEnum):
        metavar = "[" + "|".join([AUTO, *inner]) + "]"
    else:
        metavar = f"[{AUTO}|{inner.__name__.upper()}]"
    return Annotated[kind, typer.Option(help=field.metadata["help"], parser=_auto_parser(inner),
                                        metavar=metavar, show_default=AUTO)]


_KIND_WORDS = {int: "an integer", float: "a number"}


def _auto_parser(kind: type) -> Callable[[str], Any]:
    """Command-line text -> the value of an auto field: None for ``auto``, else the field's type (a usage error
    naming what it takes otherwise)."""

    def parse(text: str) -> Any:
        if text == AUTO or text is None:
            return None
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            for member in kind:
                if member == text:
                    return member
            raise typer.BadParameter(f"expected one of {', '.join([AUTO, *kind])}, got {text!r}")
        try:
            return kind(text)
        except ValueError:
            words = _KIND_WORDS.get(kind, kind.__name__)
            raise typer.BadParameter(f"expected {AUTO} or {words}, got {text!r}") from None

    return parse


def settings_options(*, skip: Collection[str] = ()) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a Typer command one option per ``Settings`` field (but ``skip``), in place of its ``settings``
    parameter, and call it with the ``Settings`` they make.

    So ``certseg certify`` and ``certseg-bench`` take the same engine options with the same defaults, by
    construction: a field added to ``Settings`` is an option of both.
    """
    names = [f.name for f in fields(Settings) if f.name not in skip]
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(DEFAULTS, name),
                                 annotation=setting_option(name)) for name in names]

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        parameters = []
        seen_settings = False
        for parameter in signature.parameters.values():
            if parameter.name == "settings":
                parameters += options
                seen_settings = True
            elif seen_settings or parameter.kind == inspect.Parameter.KEYWORD_ONLY:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            else:  # a positional argument before the options (certify's IMAGE) stays one
                parameters.append(parameter)

        @functools.wraps(command)
        def run(**kwargs: Any) -> R:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, settings=Settings(**values))

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


DEFAULTS = Settings()

# Options certseg-export shares with `certseg certify`: the description of a bring-your-own ONNX segmenter.
SegMeanOption = setting_option("seg_mean")
SegStdOption = setting_option("seg_std")
SegInputSizeOption = setting_option("seg_input_size")
ClassesOption = setting_option("classes")

MaxPixelsOption = Annotated[int, typer.Option(
    help="refuse images and label maps with more pixels, from their header, before decoding (the default fits "
    "--batch 16 in 24 GB)")]


ThreadsOption = Annotated[int | None, typer.Option(help=THREADS_HELP)]


def run_cli(app: typer.Typer, program: str, args: list[str] | None = None) -> NoReturn:
    """A console entry point: run ``app`` and make a usage error (an unknown flag, a value of the wrong type) one
    line too, as every other failure is, instead of Typer's boxed usage block. No arguments still shows the help."""
    try:
        code = app(args=args, prog_name=program, standalone_mode=False)
    except typer.TyperException as error:  # parsing errors: the public base of Typer's usage errors
        if type(error).__name__ == "NoArgsIsHelpError":
            typer.echo(error.format_message() if hasattr(error, "format_message") else str(error), err=True)
            raise SystemExit(2) from None
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        fail_line = " ".join(message.split())
        typer.echo(f"{program}: error: {fail_line} (see {program} --help)", err=True)
        raise SystemExit(2) from None
    except typer.Abort:
        typer.echo(f"{program}: interrupted", err=True)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
