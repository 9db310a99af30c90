"""16-bit PNGs, decoded by libpng through OpenCV, because Pillow opens 48/64-bit RGB(A) PNGs as 8-bit.

Only the IHDR chunk (which the PNG specification fixes as the first chunk, at byte 8) is read here: to leave
every other file to Pillow, and to refuse an image over the pixel limit before anything is decoded. libpng does the
rest (chunk CRCs, inflate, all filters, Adam7). libpng says why a file is unreadable by printing to the process's
stderr (file descriptor 2), not through OpenCV's return value; that text is caught while decoding and quoted in
the one-line error, so a damaged file still costs one line.

Why OpenCV's libpng and not pypng (both keep 16 bits): on a 1024x2048 16-bit RGB PNG libpng decodes in 70-120 ms,
pypng (pure Python) in 1.6-3.4 s, and libpng is the maintained, fuzzed reference decoder; OpenCV's wheel is the
price (50 MB, 137 MB installed, against pypng's 58 KB).
"""

from __future__ import annotations

import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from certseg.engine.errors import InputError
from certseg.engine.limits import DEFAULT_MAX_PIXELS, check_pixel_limit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
"""Samples per pixel of the 16-bit colour types: gray, RGB, gray + alpha, RGBA."""


@dataclass(frozen=True)
class Header:
    """The IHDR fields that decide who decodes the file and whether it may be decoded at all."""

    width: int
    height: int
    depth: int
    colour: int


def read_header(path: str | os.PathLike[str]) -> Header | None:
    """The IHDR of a PNG file (CRC checked); None when the file is not a PNG."""
    with open(path, "rb") as file:
        head = file.read(33)  # signature + IHDR chunk
    if head[:8] != PNG_SIGNATURE:
        return None
    if len(head) < 33:
        raise InputError("truncated PNG (the header chunk is cut short)")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise InputError(f"corrupt PNG: the first chunk is {kind!r} of {length} bytes, not a 13-byte IHDR")
    if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
        raise InputError("corrupt PNG: CRC mismatch in the IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return Header(width, height, depth, colour)


def read_png16(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray | None:
    """(H, W, C) uint16 in native byte order, samples as stored (gray, gray + alpha, RGB, RGBA), for a 16-bit
    PNG; None for any other file (let Pillow read it).

    Raises ``InputError`` (one line naming the file) when the header says it has more than ``max_pixels`` pixels
    (before the rest of the file is read), or when the file is damaged.
    """
    try:
        header = read_header(path)
        if header is None or header.depth != 16:
            return None
        if header.colour not in CHANNELS:
            raise InputError(f"corrupt PNG: colour type {header.colour} cannot have 16-bit samples")
        check_pixel_limit(header.width, header.height, max_pixels)
        return _decode(np.fromfile(path, dtype=np.uint8), header)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def _decode(data: np.ndarray, header: Header) -> np.ndarray:
    """libpng's samples, reordered from OpenCV's BGR(A) to the file's own channel order."""
    import cv2  # about 0.1 s to import; only 16-bit PNGs need it

    with _stderr_caught() as caught:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # IMREAD_UNCHANGED: 16 bits, alpha, no EXIF turn
    if decoded is None:
        raise InputError(f"damaged 16-bit PNG ({_reason(caught)})")
    if decoded.ndim == 2:
        decoded = decoded[:, :, None]
    if header.colour == 4:  # OpenCV expands gray + alpha to BGRA with B = G = R = gray
        decoded = decoded[:, :, [0, 3]]
    elif header.colour in (2, 6):
        decoded = decoded[:, :, [2, 1, 0, 3][: decoded.shape[2]]]
    expected = (header.height, header.width, CHANNELS[header.colour])
    if decoded.dtype != np.uint16 or decoded.shape != expected:
        raise InputError(f"decoded to {decoded.dtype} {decoded.shape}; its header says uint16 {expected}")
    return np.ascontiguousarray(decoded)


_OPENCV_LOG = re.compile(r"^\[\s*\w+:[^\]]*\]\s+\S+\s+\S+:\d+\s+\S+\s+(?P<message>.+)$")
"""OpenCV's log lines: ``[ WARN:0@0.1] global grfmt_png.cpp:678 read_from_io PNG input buffer is incomplete``."""


def _reason(caught: list[str]) -> str:
    """libpng's own words ("IDAT: CRC error", "bad adaptive filter value"), else OpenCV's last log message."""
    errors = [line.split("libpng error:", 1)[1].strip() for line in caught if "libpng error:" in line]
    if errors:
        return f"libpng: {errors[0]}"
    if not caught:
        return "OpenCV could not decode it"
    logged = _OPENCV_LOG.match(caught[-1].strip())
    return f"OpenCV: {logged['message'] if logged else caught[-1].strip()}"


@contextmanager
def _stderr_caught() -> Iterator[list[str]]:
    """Divert file descriptor 2 to a temporary file for the block; the lines written there fill the list after it.

    The whole process's stderr is diverted for the decode (tens of milliseconds), so anything another thread
    prints meanwhile is caught too.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]
    finally:
        os.close(saved)
