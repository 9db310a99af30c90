"""The pixel limit: how big an image certseg decodes at all, checked from the header before any pixel is decoded.

A small file can decode to gigabytes (a decompression bomb: 191 KB of PNG holds 14000×14000 pixels), and every
pixel costs hundreds of bytes per sample while certifying (``certseg.engine.runtimes.memory``). So images and label maps
are refused from their header alone when they exceed ``--max-pixels``, with one line that says how to raise it.
"""

from __future__ import annotations

from certseg.engine.errors import InputError

DEFAULT_MAX_PIXELS = 1 << 22
"""4,194,304 pixels (2048×2048, twice a 1024×2048 Cityscapes image), chosen so that the default batch fits a 24 GB
machine: with the shipped models a sample costs 234 bytes per pixel in tensors, and ``certseg.engine.runtimes.memory``
estimates 22.2 GB for a batch of 16 at this size, margins included (real runs peak about 1.3× below their
estimate). Larger images need ``--max-pixels`` and, usually, a smaller ``--batch``."""


def check_pixel_limit(width: int, height: int, max_pixels: int | None, source: object = None) -> None:
    """Raise (one line, naming ``source`` when given) when width × height exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is None:
        return
    if max_pixels < 1:
        raise InputError(f"--max-pixels must be >= 1, got {max_pixels}")
    pixels = int(width) * int(height)
    if pixels > max_pixels:
        prefix = "" if source is None else f"{source}: "
        raise InputError(
            f"{prefix}{width}x{height} = {pixels:,} pixels exceeds the limit of {max_pixels:,} pixels "
            f"(raise it with --max-pixels {pixels} if memory allows)"
        )
