"""``results.jsonl``: the run's only state, appended one fsync'd line per finished entry.

Line kinds: one ``run`` header first (the settings that must agree to resume), a ``session`` line per invocation,
then ``entry`` lines (one per image × method × σ × scale × K × variant, with its per-image confusion matrix, so every
table can be recomputed from this file alone). A run killed mid-write leaves at most one partial last line; it is
cut off on the next start. Finished keys are never recomputed, and the tables are computed from the file, so a
resumed run ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from certseg.engine.errors import InputError
from certseg.engine.files.images import jsonable

Key = tuple[str, str, float, float, int, str]
"""(image id, method, σ, scale, denoising steps K, variant)."""


class ResumeError(InputError):
    """The results file belongs to a run with other settings, or is damaged beyond its last line."""


def entry_key(entry: dict[str, Any]) -> Key:
    """An entry's key; entries written before ``--denoise-steps`` existed lack it and were made with K = 1."""
    return (str(entry["image"]), str(entry["method"]), float(entry["sigma"]), float(entry["scale"]),
            int(entry.get("denoise_steps", 1)), str(entry["variant"]))


def labels_digest(labels: np.ndarray) -> str:
    """SHA-256 of a certified label map (shape + values as uint16), whatever dtype or file it came from."""
    array = np.ascontiguousarray(np.asarray(labels), dtype=np.uint16)
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()


def read_lines(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """All complete lines; a partial last line (a kill mid-write) is ignored, and cut off when ``repair``."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data) and repair:
        with path.open("r+b") as handle:
            handle.truncate(complete)
            handle.flush()
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ResumeError(f"{path}: line {number} is not valid JSON; move the file away to start afresh") from None
    return records


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the file, {b!r} now")
    return out


class ResultsFile:
    """Append-only JSON lines with a compatibility header; safe to append to from several threads (the images a
    Triton bench has in flight)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header: dict[str, Any] | None = None
        self.entries: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def open(self, header: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
        """Check (or write) the header and load the finished entries; refuses a file made with other settings.

        ``defaults``: the value of each compat key that a header written before the key existed stands for. Keys
        the file has and ``header`` lacks (no longer compared, such as the batch) are not compared.
        """
        records = read_lines(self.path, repair=True)
        runs = [r for r in records if r.get("kind") == "run"]
        if runs:
            self.header = runs[0]
            written = {k: v for k, v in {**(defaults or {}), **runs[0]["compat"]}.items() if k in header["compat"]}
            problems = _differences(jsonable(written), jsonable(header["compat"]))
            if problems:
                raise ResumeError(
                    f"{self.path} was written with other settings, so it cannot be resumed ({'; '.join(problems)}); "
                    "use another --out, or the same settings"
                )
        elif records:
            raise ResumeError(f"{self.path} has no run header; it was not written by certseg-bench")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.append(header)
            self.header = header
        for record in records:
            if record.get("kind") == "entry":
                self.entries[entry_key(record)] = record

    def append(self, record: dict[str, Any]) -> None:
        """One line, flushed and fsync'd before returning: a finished entry survives any kill after this."""
        with self._lock:
            append_line(self.path, record)
            if record.get("kind") == "entry":
                self.entries[entry_key(record)] = record

    def model_records(self, method: str) -> dict[str, Any] | None:
        """The models an earlier entry of ``method`` was made with (to refuse resuming with other weights)."""
        return self.recorded(method, "models")

    def recorded(self, method: str, key: str) -> Any:
        """``key`` of the first earlier entry of ``method`` that has it (None: no such entry)."""
        with self._lock:
            for entry in self.entries.values():
                if entry["method"] == method and key in entry:
                    return entry[key]
        return None


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, flushed and fsync'd before returning, so a finished result survives
    any kill after this (``read_lines`` ignores a line cut short before it)."""
    line = json.dumps(jsonable(record), sort_keys=True, separators=(",", ":")) + "\n"
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def load_entries(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and entries of a results file (read-only; for reports)."""
    records = read_lines(Path(path))
    header = next((r for r in records if r.get("kind") == "run"), None)
    return header, [r for r in records if r.get("kind") == "entry"]
