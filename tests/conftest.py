"""Shared fixtures: where the reference material (golden fixtures, state-dict layouts) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
