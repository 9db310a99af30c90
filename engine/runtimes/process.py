"""What a certseg process sets before its models run: torch's huge-page CPU allocator and the CPU threads.

Both are process-wide. The allocator setting is an environment variable torch reads before its first large
allocation, so the console entry points set it first thing, before torch is imported (this module imports torch
only inside ``set_threads``, and only when threads are set).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any

from certseg.engine.errors import InputError

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
"""torch's switch ("1") for 2 MiB-aligned CPU allocations advised as transparent huge pages (Linux): fewer page
faults for the large noise, activation and logit tensors (measured at 256x512: kernel time 4.29 -> 3.05 s)."""

THREADS_HELP = (
    "CPU threads for torch and ONNX Runtime (default: their own, all cores); on a machine other busy processes "
    "share, pick 1: beside one busy process 2-thread runs were up to 9x slower while 1-thread runs stayed stable"
)
"""The help of every command's ``--threads``."""


def enable_huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Turn torch's huge-page allocator on unless the user set the variable (either way); returns whether it is
    on. Call before torch is imported."""
    environ.setdefault(HUGE_PAGES, "1")
    return huge_pages_enabled(environ)


def huge_pages_enabled(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether torch's huge-page allocator is on (torch takes "1" only)."""
    return environ.get(HUGE_PAGES) == "1"


def check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"--threads must be an integer >= 1, got {threads!r}")


def set_threads(threads: int | None) -> None:
    """Cap torch's intra-op CPU threads at ``threads`` (None: leave torch's default). ONNX Runtime sessions take
    the same number where they are made (``LocalBackend``'s ``threads``)."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def process_record(threads: int | None) -> dict[str, Any]:
    """JSON-ready: the threads asked for and those torch runs with, and whether huge pages are on.

    torch's threads are null where this process never imported torch (a client of Triton servers): no torch op ran
    here, and importing torch only to ask would cost the client more than a second."""
    torch = sys.modules.get("torch")
    return {"threads": {"requested": threads, "torch": None if torch is None else torch.get_num_threads()},
            "thp_mem_alloc": huge_pages_enabled()}
