"""Which software made a result: recorded in every JSON and export manifest, so any number can be re-made."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Python's version and each package's installed version (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
