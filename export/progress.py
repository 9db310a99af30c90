"""Progress lines of an export: the exporters report each step through an optional ``log`` callable."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]
"""Receives one human-readable line per finished step (``certseg-export`` prints them; tests pass None)."""


def note(log: Log | None, message: str) -> None:
    """Tell ``log`` about a finished step, if anyone listens."""
    if log is not None:
        log(message)
