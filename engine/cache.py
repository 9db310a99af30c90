"""Where certseg keeps derived files (ONNX exports, Triton repositories, backend folders) between runs, and the
one way they are written: built in a staging folder beside their place, renamed into place when complete.

A folder's name is a hash of everything that decides its content, so a cached folder is either complete and
right or absent; a killed build leaves only ``<key>.partial-<pid>``, removed by the next build once that process
is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$CERTSEG_CACHE_DIR`` or ``$XDG_CACHE_HOME/certseg`` (default ``~/.cache/certseg``)."""
    if os.environ.get("CERTSEG_CACHE_DIR"):
        return Path(os.environ["CERTSEG_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "certseg"


def cache_key(parts: Any) -> str:
    """16 hex digits of the sha256 of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_json_file(path: Path, data: Any) -> bool:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file beside it, renamed into place), so a reader
    sees the whole file or none; False where it cannot be written (a read-only cache only costs recomputing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".partial")
        with os.fdopen(handle, "w") as file:
            json.dump(data, file)
        os.replace(temporary, path)
    except OSError:
        return False
    return True


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove what builds killed mid-way left in ``folder``: ``<key>.partial-<pid>`` staging folders and
    ``.<key>.partial-<pid>-<random>`` staging files (``aot_compile``'s packages) whose building process is gone; a
    running build's are left alone. Returns what was removed."""
    removed = []
    for staging in folder.glob("*.partial-*") if folder.is_dir() else ():
        pid = staging.name.rpartition(".partial-")[2].partition("-")[0]
        if not pid.isdigit() or pid_running(int(pid)):
            continue
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        removed.append(staging)
    return removed


def cached_folder(kind: str, parts: Any, build: Callable[[Path], None], *, complete: str,
                  refresh: bool = False) -> Path:
    """``cache_dir()/kind/<key of parts>``, built once by ``build(staging)``; ``complete`` is the file whose
    presence says a folder is finished. Concurrent builders each stage their own folder; the first rename wins."""
    folder = cache_dir() / kind / cache_key(parts)
    if (folder / complete).is_file() and not refresh:
        return folder
    remove_stale_staging(folder.parent)
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists() and (refresh or not (folder / complete).is_file()):
        shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():  # another process finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.replace(folder)
    return folder
