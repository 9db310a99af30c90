"""A small decoder for 16-bit PNGs, because Pillow 13 opens 48/64-bit RGB(A) PNGs as 8-bit and drops precision.

``read_png16`` handles exactly the 16-bit files (gray, gray + alpha, RGB, RGBA; Adam7 too) and returns ``None``
for everything else, so the caller falls back to Pillow. Decoding follows the W3C PNG specification: CRC-checked
chunks, one zlib stream over the concatenated IDAT chunks, then per-row filters undone ("Filtering").

Undoing Average and Paeth is sequential along a row (each byte needs its decoded left neighbour), which is slow
per byte in Python. Instead the rows are decoded along anti-diagonals (a wavefront): pixel (y, x) needs only
(y, x-1), (y-1, x) and (y-1, x-1), all on earlier diagonals, so every diagonal is one vectorised numpy step.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from certseg.engine.errors import InputError
from certseg.engine.limits import DEFAULT_MAX_PIXELS, check_pixel_limit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
"""Samples per pixel for the colour types decoded here: gray, RGB, gray + alpha, RGBA."""
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Adam7 passes as (x0, y0, dx, dy): pass pixels are (y0 + i*dy, x0 + j*dx)."""
MIN_BAND_ROWS, MAX_BAND_ROWS = 64, 1024
"""Wavefront bands hold the width in rows, clamped to these: a band of R rows takes R + width - 1 numpy steps and
(R + width) * R pixels of scratch, so about width rows amortises the steps while bounding the memory."""
_KNOWN_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
_MAX_CHUNK = 2**31 - 1
_INFLATE_STEP = 1 << 24


@dataclass(frozen=True)
class Header:
    """The IHDR fields that matter for a 16-bit image."""

    width: int
    height: int
    channels: int
    interlaced: bool

    @property
    def bpp(self) -> int:
        """Bytes per pixel: the filter offset for Sub, Average and Paeth."""
        return 2 * self.channels


def read_png16(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray | None:
    """(H, W, C) uint16 in native byte order for a 16-bit PNG; None for any other file (let Pillow read it).

    Raises ``InputError`` (one line naming the file) when a 16-bit PNG is corrupt or truncated, or when its
    header says it has more than ``max_pixels`` pixels (checked before the file's data is read).
    """
    try:
        loaded = load_scanlines(path, max_pixels)
        return None if loaded is None else decode_image(*loaded)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def load_scanlines(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Header, np.ndarray] | None:
    """The header and the inflated (still filtered) scanlines; the file's bytes are released on return."""
    with open(path, "rb") as file:
        head = file.read(33)  # signature + IHDR chunk: enough to leave every other file to Pillow
        if head[:8] != PNG_SIGNATURE:
            return None
        header = parse_header(head)
        if header is None:
            return None
        check_pixel_limit(header.width, header.height, max_pixels)
        file.seek(0)
        data = file.read()
    expected = sum(height * (1 + width * header.bpp) for *_, width, height in pass_sizes(header))
    return header, inflate(idat_chunks(data), expected)


def parse_header(head: bytes) -> Header | None:
    """Parse and check the IHDR chunk; None when the image is not 16-bit gray/RGB with or without alpha."""
    if len(head) < 33:
        raise InputError("truncated PNG (the header chunk is cut short)")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise InputError(f"corrupt PNG: the first chunk is {kind!r} of {length} bytes, not a 13-byte IHDR")
    check_crc(head, 8, 13)
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if depth != 16 or colour not in CHANNELS:
        return None
    if not (0 < width <= _MAX_CHUNK and 0 < height <= _MAX_CHUNK):
        raise InputError(f"corrupt PNG: invalid size {width}x{height}")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise InputError(
            f"corrupt PNG: unknown compression/filter/interlace methods ({compression}, {filtering}, {interlace})"
        )
    return Header(width, height, CHANNELS[colour], interlace == 1)


def check_crc(data: bytes | memoryview, start: int, length: int) -> None:
    """Raise unless the CRC after the chunk at ``start`` matches its type and data (catches corrupt files)."""
    kind = bytes(data[start + 4 : start + 8])
    stored = struct.unpack(">I", data[start + 8 + length : start + 12 + length])[0]
    if zlib.crc32(data[start + 4 : start + 8 + length]) != stored:
        raise InputError(f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')} chunk at byte {start}")


def idat_chunks(data: bytes) -> Iterator[memoryview]:
    """Walk every chunk after the signature up to IEND, checking CRCs; yield the IDAT data without copying it."""
    view = memoryview(data)
    position, found = 8, False
    while True:
        if position + 8 > len(data):
            raise InputError(f"truncated PNG (file ends at byte {len(data)} before the IEND chunk)")
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if length > _MAX_CHUNK or not kind.isalpha():
            raise InputError(f"corrupt PNG: invalid chunk header at byte {position}")
        if position + 12 + length > len(data):
            name = kind.decode("latin-1")
            raise InputError(f"truncated PNG (the {name} chunk at byte {position} is cut short)")
        check_crc(view, position, length)
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            found = True
            yield view[position + 8 : position + 8 + length]
        elif kind[:1].isupper() and kind not in _KNOWN_CRITICAL:
            raise InputError(f"unsupported PNG: unknown critical chunk {kind.decode('latin-1')}")
        position += 12 + length
    if not found:
        raise InputError("corrupt PNG: no image data (IDAT chunk)")


def inflate(parts: Iterable[memoryview], expected: int) -> np.ndarray:
    """Decompress the IDAT stream into exactly ``expected`` bytes, at most ``_INFLATE_STEP`` bytes at a time.

    Every chunk is still walked (CRCs, truncation); data past ``expected`` is ignored, as libpng does.
    """
    out = np.empty(expected, dtype=np.uint8)
    filled, decompressor = 0, zlib.decompressobj()
    try:
        for part in parts:
            pending: bytes | memoryview = part
            while pending and filled < expected:
                piece = decompressor.decompress(pending, min(expected - filled, _INFLATE_STEP))
                out[filled : filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                filled += len(piece)
                pending = decompressor.unconsumed_tail
    except zlib.error as error:
        raise InputError(f"corrupt PNG: the compressed image data is invalid ({error})") from None
    if filled < expected:
        cause = "compressed stream ends early" if not decompressor.eof else "too little data"
        raise InputError(f"truncated PNG: image data holds {filled} of {expected} bytes ({cause})")
    return out


def pass_sizes(header: Header) -> list[tuple[int, int, int, int, int, int]]:
    """(x0, y0, dx, dy, width, height) of each non-empty pass: one full-image pass, or up to seven for Adam7."""
    passes = ADAM7 if header.interlaced else ((0, 0, 1, 1),)
    sizes = []
    for x0, y0, dx, dy in passes:
        width = (header.width - x0 + dx - 1) // dx
        height = (header.height - y0 + dy - 1) // dy
        if width > 0 and height > 0:
            sizes.append((x0, y0, dx, dy, width, height))
    return sizes


def decode_image(header: Header, raw: np.ndarray) -> np.ndarray:
    """Unfilter each pass in place and scatter its big-endian samples into the (H, W, C) native uint16 image."""
    image = np.empty((header.height, header.width, header.channels), dtype=np.uint16)
    offset = 0
    for x0, y0, dx, dy, width, height in pass_sizes(header):
        size = height * (1 + width * header.bpp)
        scanlines = raw[offset : offset + size].reshape(height, 1 + width * header.bpp)
        unfilter(scanlines, header.bpp)
        image[y0::dy, x0::dx] = scanlines[:, 1:].view(">u2").reshape(height, width, header.channels)
        offset += size
    return image


def unfilter(scanlines: np.ndarray, bpp: int) -> None:
    """Undo the per-row filters of (H, 1 + row bytes) scanlines in place (decoded bytes in ``scanlines[:, 1:]``).

    Runs of rows using only None/Sub/Up are decoded row by row (vectorised within a row); bands holding any
    Average or Paeth row are decoded as a wavefront (see the module docstring).
    """
    kinds = scanlines[:, 0]
    if kinds.max() > 4:
        row = int(np.argmax(kinds > 4))
        raise InputError(f"corrupt PNG: unknown filter type {kinds[row]} in row {row}")
    height, width = scanlines.shape[0], (scanlines.shape[1] - 1) // bpp
    band = min(max(width, MIN_BAND_ROWS), MAX_BAND_ROWS)
    for start in range(0, height, band):
        stop = min(start + band, height)
        sequential = np.flatnonzero(kinds[start:stop] >= 3)
        if len(sequential) == 0:
            unfilter_rows(scanlines, start, stop, bpp)
            continue
        first, last = start + int(sequential[0]), start + int(sequential[-1]) + 1
        unfilter_rows(scanlines, start, first, bpp)
        unfilter_wavefront(scanlines, first, last, bpp)
        unfilter_rows(scanlines, last, stop, bpp)


def unfilter_rows(scanlines: np.ndarray, start: int, stop: int, bpp: int) -> None:
    """Rows [start, stop) filtered with None (0), Sub (1) or Up (2), one vectorised row at a time."""
    for y in range(start, stop):
        kind, row = scanlines[y, 0], scanlines[y, 1:]
        if kind == 1:  # cumulative sum per byte lane, wrapping modulo 256
            lanes = row.reshape(-1, bpp)
            np.cumsum(lanes, axis=0, dtype=np.uint8, out=lanes)
        elif kind == 2 and y > 0:
            np.add(row, scanlines[y - 1, 1:], out=row)


def unfilter_wavefront(scanlines: np.ndarray, start: int, stop: int, bpp: int) -> None:
    """Rows [start, stop), any filter types, decoded one anti-diagonal at a time.

    The band is skewed into ``grid[d + 2, y + 1]`` = pixel (y, x) of diagonal d = x + y (row 0 of the grid holds
    the already decoded row above the band, the zero padding stands for pixels left of x = 0), so the left, up
    and up-left neighbours of a whole diagonal are contiguous slices of the previous two grid planes.
    """
    rows, width = stop - start, (scanlines.shape[1] - 1) // bpp
    grid = np.zeros((rows + width + 1, rows + 1, bpp), dtype=np.uint8)
    skewed = as_strided(
        grid[1:], shape=(rows + 1, width, bpp), strides=((rows + 2) * bpp, (rows + 1) * bpp, 1), writeable=True
    )
    if start > 0:
        skewed[0] = scanlines[start - 1, 1:].reshape(width, bpp)
    skewed[1:] = scanlines[start:stop, 1:].reshape(rows, width, bpp)
    kinds = scanlines[start:stop, 0]
    masks = {int(kind): (kinds == kind)[:, None] for kind in np.unique(kinds) if kind != 0}
    if len(masks) == 1 and 0 not in kinds:
        masks = dict.fromkeys(masks)  # one filter for every row: no selection needed
    for diagonal in range(rows + width - 1):
        low, high = max(0, diagonal - width + 1), min(rows, diagonal + 1)
        previous, earlier = grid[diagonal + 1], grid[diagonal]
        current = grid[diagonal + 2, low + 1 : high + 1]
        prediction = predict(previous[low + 1 : high + 1], previous[low:high], earlier[low:high], masks, low, high)
        np.add(current, prediction, out=current)
    scanlines[start:stop, 1:] = skewed[1:].reshape(rows, width * bpp)


def predict(
    left: np.ndarray,
    up: np.ndarray,
    up_left: np.ndarray,
    masks: dict[int, np.ndarray | None],
    low: int,
    high: int,
) -> np.ndarray:
    """Predictions (uint8) for rows [low, high) of a band's diagonal; ``masks[kind]`` marks the rows of each
    filter type (None: every row), rows in no mask use None (prediction 0)."""
    a, b = left.astype(np.int16), up.astype(np.int16)
    predictions: dict[int, np.ndarray] = {}
    if 1 in masks:
        predictions[1] = a
    if 2 in masks:
        predictions[2] = b
    if 3 in masks:
        predictions[3] = (a + b) >> 1
    if 4 in masks:
        predictions[4] = paeth(a, b, up_left.astype(np.int16))
    only_kind, only_prediction = next(iter(predictions.items()))
    if masks[only_kind] is None:  # a band that uses one filter type throughout
        return only_prediction.astype(np.uint8)
    result = np.zeros(a.shape, dtype=np.int16)
    for kind, prediction in predictions.items():
        np.copyto(result, prediction, where=masks[kind][low:high])
    return result.astype(np.uint8)


def paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The Paeth predictor of the PNG spec: whichever of a, b, c is nearest a + b - c, ties to a then b."""
    vertical, horizontal = b - c, a - c  # p - a and p - b
    pa, pb, pc = np.abs(vertical), np.abs(horizontal), np.abs(vertical + horizontal)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
