"""A bounded pool: at most ``width`` jobs at once, each with one of ``width`` workspaces (a Triton bench: one
image in flight each, with its own sessions), stopping at the first failure.

On a failure or Ctrl-C no further job starts and ``stop`` is set, so running jobs end after their current step
(what they finished is kept); the first error is raised. One workspace runs the jobs in the caller's thread, so a
pool of one behaves exactly as a plain loop (an in-process bench).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

W = TypeVar("W")
J = TypeVar("J")


def run_bounded(jobs: Iterable[J], workspaces: Sequence[W], work: Callable[[W, J, threading.Event], None]) -> None:
    """``work(workspace, job, stop)`` for every job, ``len(workspaces)`` at a time; a workspace serves one job at
    once. ``work`` should return early once ``stop`` is set."""
    stop = threading.Event()
    if len(workspaces) == 1:
        for job in jobs:
            work(workspaces[0], job, stop)
        return
    free: queue.SimpleQueue[W] = queue.SimpleQueue()
    for workspace in workspaces:
        free.put(workspace)

    def one(job: J) -> None:
        workspace = free.get_nowait()  # never empty: at most len(workspaces) jobs run
        try:
            work(workspace, job, stop)
        finally:
            free.put(workspace)

    todo = iter(jobs)
    running: set[Future[None]] = set()
    error: BaseException | None = None
    executor = ThreadPoolExecutor(max_workers=len(workspaces), thread_name_prefix="certseg-bench")
    try:
        while True:
            while error is None and len(running) < len(workspaces):
                job = next(todo, None)
                if job is None:
                    break
                running.add(executor.submit(one, job))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                if error is None and future.exception() is not None:
                    error = future.exception()
                    stop.set()
    finally:
        stop.set()
        executor.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        raise error
