"""Shared fixtures: where the reference material (golden fixtures, state-dict layouts) lives."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
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


PINNED_TORCH_THREADS = 2
"""The torch thread count the pinned certificate bytes were made at. torch's bilinear resize (the stage maths
around the models) rounds a few values differently with another count on some CPUs (AVX2: 1 thread against 2
moved one pixel's count of the DenoiseCertify sample on ONNX Runtime), so tests that compare bytes fix it."""


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's (process-wide) thread count, directly or through ``Session.open(threads=...)``,
    must not change the bytes a later test computes: the count is put back after each test."""
    torch = sys.modules.get("torch")
    before = None if torch is None else torch.get_num_threads()
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_server():
    """The bundled tritonserver on ``certseg serve``'s default repository (the shipped models, exported, its steps
    on ``PINNED_TORCH_THREADS``), one for the whole run; skips where tritonclient is missing or tritonserver cannot
    start here."""
    pytest.importorskip("tritonclient.grpc")
    from certseg.engine.errors import ServerError
    from certseg.engine.runtimes.serve import TritonServer
    from certseg.export.default_repository import default_repository

    try:
        server = TritonServer(default_repository(max_batch=16, threads=PINNED_TORCH_THREADS), exit_timeout_s=0).start()
    except ServerError as error:
        pytest.skip(f"tritonserver cannot start on this machine: {error}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_package_cache(monkeypatch, tmp_path: Path) -> Path:
    """--compile's packages go to a fresh certseg cache folder; inductor's own cache (the label step's) stays where
    it was, shared, as in the user's runs."""
    from certseg.engine.runtimes.torch_runtime import INDUCTOR_CACHE, use_certseg_inductor_cache

    use_certseg_inductor_cache()
    monkeypatch.setenv(INDUCTOR_CACHE, os.environ[INDUCTOR_CACHE])
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def small_adm_and_hrnet():
    """A small ADM (16×16) and HRNet (5 classes) of the shipped architectures, random weights, eval mode."""
    import torch

    from certseg.engine.models.adm import build_adm
    from certseg.engine.models.hrnet import build_hrnet
    from certseg.training.architectures import SMALL_ADM, SMALL_HRNET

    torch.manual_seed(0)
    denoiser = build_adm(SMALL_ADM | {"image_size": 16, "attention_resolutions": "4"}).eval()
    segmenter = build_hrnet(SMALL_HRNET, 5).eval()
    return denoiser, segmenter
