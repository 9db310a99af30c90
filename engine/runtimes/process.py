"""What a certseg process sets before its models run: glibc's malloc (one heap, large blocks kept in it), torch's
huge-page CPU allocator where glibc does not keep them, the CPU threads.

All are process-wide. The allocator setting is an environment variable torch reads before its first large
allocation, so the console entry points set it first thing, before torch is imported (this module imports torch
only inside ``set_threads``, and only when threads are set).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from certseg.engine.errors import InputError

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
"""torch's switch ("1") for 2 MiB-aligned CPU allocations advised as transparent huge pages (Linux): fewer page
faults for large tensors that glibc maps fresh from the kernel on every call (measured with glibc's defaults, at
256x512: kernel time 4.29 -> 3.05 s). Where ``tune_malloc`` keeps large blocks in the heap, pages are faulted once
and reused, and the 2 MiB alignment only fragments the heap: shipped HRNet, SegCertify, one thread, engine alone,
2 runs each, on / off: 1024x2048 71.9-75.0 / 71.7-71.7 s, peak RSS 1297-1809 / 1116-1169 MiB; 512x1024
18.6-18.9 / 17.9-18.3 s, 505-740 / 491-522 MiB. So it is on only where glibc maps large blocks."""

THREADS_HELP = (
    "CPU threads for torch and ONNX Runtime (default: their own, all cores); on a machine other busy processes "
    "share, pick 1: beside one busy process 2-thread runs were up to 9x slower while 1-thread runs stayed stable"
)
"""The help of every command's ``--threads``."""


def enable_huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Turn torch's huge-page allocator on where glibc maps large blocks (``HUGE_PAGES``: the user set
    ``MALLOC_MMAP_MAX_`` to allow them, or ``tune_malloc`` did not run or cannot), unless the user set the variable
    (either way); returns whether it is on. Call before torch is imported, after ``tune_malloc`` where it runs."""
    if not heap_keeps_large_blocks(environ):
        environ.setdefault(HUGE_PAGES, "1")
    return huge_pages_enabled(environ)


MALLOC_ARENAS = "MALLOC_ARENA_MAX"
"""glibc's cap on its heaps (arenas); by default each thread that allocates may get its own."""


MMAP_MAX = "MALLOC_MMAP_MAX_"
"""glibc's cap on blocks it maps from the kernel (each over its mmap threshold); 0: none, all come from the heap."""

TRIM_THRESHOLD = "MALLOC_TRIM_THRESHOLD_"
"""How much free memory at the top of glibc's heap it keeps before handing the rest back to the kernel."""


@dataclass(frozen=True)
class MallocSetting:
    """One glibc malloc parameter certseg sets for its own process: the environment variable glibc reads at start
    (a user's value there wins), ``mallopt``'s number for it (glibc's malloc.h) and certseg's value."""

    variable: str
    mallopt_number: int
    value: int


MALLOC_SETTINGS: tuple[MallocSetting, ...] = (
    MallocSetting(MALLOC_ARENAS, -8, 1),
    MallocSetting(MMAP_MAX, -4, 0),
    MallocSetting(TRIM_THRESHOLD, -1, 2**31 - 1),
)
"""One heap, no ``mmap``'d blocks, nothing handed back to the kernel: freed memory is reused, not refaulted.

Why one heap: the runtime's helper thread (``LocalRuntime.overlaps``) allocates the next call's input and the
label step's scores while the models' thread allocates activations; with a heap per thread, memory freed in one is
not reused by the other.
Why no ``mmap`` and no trimming: glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh pages from
the kernel and returns them on free, so every such tensor (at 1024x2048 the stem's activations, the head's and the
full-size scores, 67-134 MB each) is page-faulted and zeroed by the kernel again on every call. Kept in the heap,
the next call reuses the same memory. Measured (shipped HRNet, 1024x2048 SegCertify, one torch thread, engine
alone): 88.3 s → 73.4 s, peak RSS 929 → 1095 MiB (the baseline's: 1164); at 512x1024, where the tensors mostly fit
under the threshold anyway, 18.9-19.9 s → 18.4-19.1 s and 523-645 → 497-634 MiB.
Only this process: a child (a Triton server) keeps glibc's defaults. No-op off glibc.
"""

_TUNED: dict[str, int] = {}
"""The settings ``tune_malloc`` applied in this process, by variable."""


def _mallopt() -> Any:
    """glibc's ``mallopt`` in this process, or None (another C library)."""
    try:
        import ctypes

        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def heap_keeps_large_blocks(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether large blocks stay in glibc's heap (``MALLOC_MMAP_MAX_`` 0) in a process with ``environ``: as the
    user set the variable there, else as ``tune_malloc`` set it in this process. A command that never tunes malloc
    (``certseg-export``) keeps glibc's default, which maps them."""
    if _mallopt() is None:
        return False
    if MMAP_MAX in environ:
        return environ[MMAP_MAX].strip() == "0"
    return _TUNED.get(MMAP_MAX) == 0


def tune_malloc(environ: MutableMapping[str, str] = os.environ) -> dict[str, int]:
    """Apply ``MALLOC_SETTINGS`` to this process with ``mallopt``, each unless the user set its variable; returns
    those applied. Call before any thread allocates."""
    mallopt = _mallopt()
    if mallopt is None:
        return {}
    for setting in MALLOC_SETTINGS:
        if setting.variable not in environ and mallopt(setting.mallopt_number, setting.value):
            _TUNED[setting.variable] = setting.value
    return dict(_TUNED)


def malloc_environment(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``environ`` for a child process that should allocate as certseg does: ``MALLOC_SETTINGS`` as the variables
    glibc reads at start, where the user did not set them."""
    for setting in MALLOC_SETTINGS:
        environ.setdefault(setting.variable, str(setting.value))
    return environ


def tune_allocators(environ: MutableMapping[str, str] = os.environ) -> None:
    """This process's allocators as certseg's commands set them: glibc's malloc (``tune_malloc``), then torch's
    huge pages where glibc still maps large blocks (``enable_huge_pages``, which reads what ``tune_malloc`` applied).
    Call first thing: before torch is imported and before any thread allocates."""
    tune_malloc(environ)
    enable_huge_pages(environ)


def allocators_environment(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``environ`` for a child process that should allocate as certseg's commands do (``malloc_environment``,
    then ``enable_huge_pages``, which reads it); the variables already set there win."""
    enable_huge_pages(malloc_environment(environ))
    return environ


def malloc_setting(variable: str, environ: MutableMapping[str, str] = os.environ) -> int | None:
    """One glibc parameter in this process as set by the user or by ``tune_malloc`` (None: glibc's default)."""
    value = environ.get(variable)
    if value is not None:
        return int(value) if value.isdigit() else None
    return _TUNED.get(variable)


def malloc_arenas(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """glibc's heap cap in this process (None: glibc's default)."""
    return malloc_setting(MALLOC_ARENAS, environ)


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
    """JSON-ready: the threads asked for and those torch runs with, whether huge pages are on, glibc's malloc settings.

    torch's threads are null where this process never imported torch (a client of Triton servers): no torch op ran
    here, and importing torch only to ask would cost the client more than a second."""
    torch = sys.modules.get("torch")
    return {"threads": {"requested": threads, "torch": None if torch is None else torch.get_num_threads()},
            "thp_mem_alloc": huge_pages_enabled(), "malloc_arena_max": malloc_arenas(),
            "malloc_mmap_max": malloc_setting(MMAP_MAX),
            "malloc_trim_threshold": malloc_setting(TRIM_THRESHOLD)}
