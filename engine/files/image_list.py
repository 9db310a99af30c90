"""What ``certseg certify A B ...`` certifies: files, folders and glob patterns turned into one list of images.

Order is the arguments' order; a folder gives the images directly inside it and a pattern its matches, each
sorted by name, so a run's list (and hence each image's index and seed) does not depend on the file system's
listing order. A folder is not searched recursively (a folder of results or of label maps beside the images
would be swept in); a pattern is expanded by certseg, with ``**`` matching any depth (``'data/**/*.png'``).
An image named twice (the same resolved path) keeps its first place. Two images with one stem would write
the same ``<stem>.*`` outputs, so such a list is refused up front.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from certseg.engine.errors import InputError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""What a folder or a pattern picks up (any case): the formats certseg reads. A file named on its own is read
whatever its name, as before."""

_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class ImageList:
    """The images of one run, in order, and whether the run named exactly one image file."""

    paths: tuple[Path, ...]
    single_file: bool
    """One argument, a path that is neither a folder nor a pattern: the given seed is that image's seed, as a
    one-image command always was (several images derive theirs, ``certseg.engine.seeds.image_seed``)."""


def is_pattern(argument: str) -> bool:
    """A glob pattern for certseg to expand: it has ``*``, ``?`` or ``[`` and is not the name of an existing path."""
    return bool(_GLOB_CHARACTERS & set(argument)) and not Path(argument).exists()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _expand(argument: str) -> list[Path]:
    """One argument's images: a folder's, a pattern's matches (each sorted), or the path itself."""
    if is_pattern(argument):
        return sorted(p for p in map(Path, glob.glob(argument, recursive=True)) if _is_image(p))
    path = Path(argument)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _is_image(p))
    return [path]  # a file, or a missing one: reported when it is read, like any unreadable image


def expand_images(arguments: Sequence[str | Path]) -> ImageList:
    """The run's images (see the module docstring); one line when nothing matches or two images share a stem."""
    if not arguments:
        raise InputError("no image given")
    found: dict[Path, Path] = {}  # resolved -> as given, first occurrence first
    for argument in map(str, arguments):
        for path in _expand(argument):
            found.setdefault(path.resolve(), path)
    paths = tuple(found.values())
    if not paths:
        named = ", ".join(map(str, arguments))
        raise InputError(f"{named}: no image ({', '.join(IMAGE_SUFFIXES)}) found")
    by_stem: dict[str, Path] = {}
    for path in paths:
        other = by_stem.setdefault(path.stem, path)
        if other is not path:
            raise InputError(f"{other} and {path} would both write <out>/{path.stem}.* (rename one, or certify "
                             "them into separate --out folders)")
    single = len(arguments) == 1 and not is_pattern(str(arguments[0])) and not Path(arguments[0]).is_dir()
    return ImageList(paths, single)
