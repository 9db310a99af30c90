"""Shared fixtures: where the reference material (golden fixtures, state-dict layouts) lives."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_cityscapesscripts = pytest.mark.skipif(
    importlib.util.find_spec("cityscapesscripts") is None,
    reason="real Cityscapes needs cityscapesscripts' label table (pip install 'certseg[bench]')",
)


def reference_dir() -> Path:
    """``$CERTSEG_REFERENCE_DIR`` or ``../shared/reference`` beside the checkout (where CI has it)."""
    return Path(os.environ.get("CERTSEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.skip(f"reference material not found at {path} (set CERTSEG_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def golden(reference: Path) -> Path:
    return reference / "golden"


def interrupt_when(process: subprocess.Popen, ready: Callable[[], bool], wait_s: float) -> str:
    """Send SIGINT to ``process`` once ``ready()`` (asserting it still runs then); return what it wrote on stderr."""
    try:
        deadline = time.monotonic() + wait_s
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="session")
def default_server():
    """The bundled tritonserver on ``certseg serve``'s default repository (the shipped models, exported), one for
    the whole run; skips where tritonclient is missing or tritonserver cannot start here."""
    pytest.importorskip("tritonclient.grpc")
    from certseg.engine.errors import ServerError
    from certseg.engine.runtimes.serve import TritonServer
    from certseg.export.default_repository import default_repository

    try:
        server = TritonServer(default_repository(max_batch=16), exit_timeout_s=0).start()
    except ServerError as error:
        pytest.skip(f"tritonserver cannot start on this machine: {error}")
    try:
        yield server
    finally:
        server.stop()
