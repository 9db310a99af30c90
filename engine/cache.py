"""Where certseg keeps derived files (ONNX exports, Triton repositories, backend folders) between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CERTSEG_CACHE_DIR`` or ``$XDG_CACHE_HOME/certseg`` (default ``~/.cache/certseg``)."""
    if os.environ.get("CERTSEG_CACHE_DIR"):
        return Path(os.environ["CERTSEG_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "certseg"
