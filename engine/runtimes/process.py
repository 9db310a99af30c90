"""What a certseg process sets before its models run: torch's huge-page CPU allocator, one malloc heap, the CPU
threads.

All are process-wide. The allocator setting is an environment variable torch reads before its first large
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


MALLOC_ARENAS = "MALLOC_ARENA_MAX"
"""glibc's cap on its heaps (arenas); by default each thread that allocates may get its own."""

_M_ARENA_MAX = -8
"""``mallopt``'s parameter number for the arena cap (glibc's malloc.h)."""

_ONE_ARENA = False
"""Whether ``one_malloc_arena`` capped this process's heaps."""


def one_malloc_arena(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Keep this process's allocations in one glibc heap unless the user set ``MALLOC_ARENA_MAX``; returns whether
    it did. Call before any thread allocates.

    Why: the runtime's helper thread (``LocalRuntime.overlaps``) allocates the next call's input and the label
    step's scores while the models' thread allocates activations; with a heap per thread, memory freed in one is
    not reused by the other. Measured (512x1024 SegCertify, one torch thread, engine alone): 708 → 584 MiB peak RSS
    with another job loading the machine, but 574 vs 571 MiB when it was quiet, so the gain is not established;
    it costs nothing measurable either. Only this process: a child (a Triton server) keeps glibc's default. No-op
    off glibc.
    """
    if MALLOC_ARENAS in environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    global _ONE_ARENA
    _ONE_ARENA = bool(mallopt(_M_ARENA_MAX, 1))
    return _ONE_ARENA


def malloc_arenas(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """glibc's heap cap in this process as set by the user or by ``one_malloc_arena`` (None: glibc's default)."""
    value = environ.get(MALLOC_ARENAS)
    if value is not None:
        return int(value) if value.isdigit() else None
    return 1 if _ONE_ARENA else None


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
            "thp_mem_alloc": huge_pages_enabled(), "malloc_arena_max": malloc_arenas()}
