"""16-bit PNG decoding (libpng through OpenCV): exact round trips through an independent encoder written here
(every filter type, Adam7, every 16-bit colour type, channels in the file's order), Pillow agreement for 16-bit
gray, fallback (None) for what Pillow reads correctly, and one-line errors for damaged files and huge headers."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.engine.errors import InputError
from certseg.engine.files.png16 import PNG_SIGNATURE, read_png16

CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


# --- an independent encoder: filters computed from the known original bytes (no sequential dependency) ---


def paeth_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Written as in the spec: p = a + b - c, nearest of a, b, c, ties broken in that order."""
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_scanlines(data: np.ndarray, kinds: list[int], bpp: int) -> bytes:
    """(H, row bytes) uint8 -> filtered scanlines, row y using filter kinds[y]."""
    x = data.astype(np.int32)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b[1:] = x[:-1]
    c[1:, bpp:] = x[:-1, :-bpp]
    predictions = [np.zeros_like(x), a, b, (a + b) // 2, paeth_reference(a, b, c)]
    out = bytearray()
    for y, kind in enumerate(kinds):
        out.append(kind)
        out += ((x[y] - predictions[kind][y]) % 256).astype(np.uint8).tobytes()
    return bytes(out)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(samples: np.ndarray, colour: int, kinds: list[int] | None = None, interlace: bool = False) -> bytes:
    """(H, W, C) uint16 -> 16-bit PNG bytes; filter types cycle 0..4 unless given (per row of each pass)."""
    height, width, channels = samples.shape
    assert channels == CHANNELS[colour]
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    scanlines, used = b"", 0
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        data = sub.astype(">u2").view(np.uint8).reshape(sub.shape[0], -1)
        rows = kinds[used : used + len(data)] if kinds is not None else [(used + y) % 5 for y in range(len(data))]
        scanlines += filter_scanlines(data, rows, 2 * channels)
        used += len(data)
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, int(interlace))
    compressed = zlib.compress(scanlines, 6)
    idat = [compressed[i : i + 1000] for i in range(0, len(compressed), 1000)]  # several IDAT chunks
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"Comment\x00ancillary chunks are skipped")
        + b"".join(chunk(b"IDAT", part) for part in idat)
        + chunk(b"IEND", b"")
    )


def random_samples(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Uniform 16-bit values plus many near 0 and 65535, so wrap-around in every filter is exercised."""
    samples = rng.integers(0, 65536, size=(height, width, channels), dtype=np.uint16)
    extremes = np.array([0, 1, 2, 255, 256, 65279, 65280, 65533, 65534, 65535], dtype=np.uint16)
    pick = rng.random(samples.shape) < 0.4
    samples[pick] = rng.choice(extremes, size=int(pick.sum()))
    return samples


def write(tmp_path: Path, data: bytes, name: str = "image.png") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- round trips ---


@pytest.mark.parametrize("colour", [0, 2, 4, 6])
@pytest.mark.parametrize("width", [1, 7, 33])
def test_round_trip_every_filter(tmp_path: Path, colour: int, width: int) -> None:
    rng = np.random.default_rng(1000 * colour + width)
    samples = random_samples(rng, 11, width, CHANNELS[colour])
    result = read_png16(write(tmp_path, encode_png(samples, colour)))
    assert result is not None and result.dtype == np.uint16 and result.dtype.isnative
    assert result.shape == samples.shape
    np.testing.assert_array_equal(result, samples)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_round_trip_single_filter(tmp_path: Path, kind: int) -> None:
    samples = random_samples(np.random.default_rng(kind), 20, 17, 3)
    result = read_png16(write(tmp_path, encode_png(samples, 2, kinds=[kind] * 20)))
    np.testing.assert_array_equal(result, samples)


@pytest.mark.parametrize("shape", [(150, 5), (3, 200), (70, 70)])
def test_round_trip_random_filters(tmp_path: Path, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0])
    samples = random_samples(rng, *shape, 4)
    kinds = rng.choice([0, 1, 2, 3, 4], size=shape[0], p=[0.3, 0.2, 0.3, 0.1, 0.1]).tolist()
    result = read_png16(write(tmp_path, encode_png(samples, 6, kinds=kinds)))
    np.testing.assert_array_equal(result, samples)


@pytest.mark.parametrize("colour", [0, 2, 4, 6])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 10), (17, 23)])
def test_round_trip_interlaced(tmp_path: Path, colour: int, shape: tuple[int, int]) -> None:
    samples = random_samples(np.random.default_rng(shape[1]), *shape, CHANNELS[colour])
    result = read_png16(write(tmp_path, encode_png(samples, colour, interlace=True)))
    np.testing.assert_array_equal(result, samples)


# --- agreement with Pillow, and what is left to Pillow ---


def test_gray_matches_pillow(tmp_path: Path) -> None:
    """Pillow reads 16-bit gray correctly: it checks our encoder, filters and Adam7 table independently."""
    samples = random_samples(np.random.default_rng(3), 19, 23, 1)
    ours = write(tmp_path, encode_png(samples, 0), "ours.png")
    interlaced = write(tmp_path, encode_png(samples, 0, interlace=True), "interlaced.png")
    pillows = tmp_path / "pillow.png"
    Image.fromarray(samples[:, :, 0]).save(pillows)
    for path in (ours, interlaced, pillows):
        with Image.open(path) as image:
            assert image.mode == "I;16"
            expected = np.asarray(image, dtype=np.uint16)
        result = read_png16(path)
        assert result is not None and result.shape == (19, 23, 1)
        np.testing.assert_array_equal(result[:, :, 0], expected)
        np.testing.assert_array_equal(result[:, :, 0], samples[:, :, 0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_eight_bit_and_lower_return_none(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "eight.png"
    Image.new(mode, (5, 4)).save(path)
    assert read_png16(path) is None


def test_non_png_returns_none(tmp_path: Path) -> None:
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg)
    assert read_png16(jpeg) is None
    assert read_png16(write(tmp_path, b"", "empty.png")) is None


# --- damaged files: one line that names the file and the problem ---


def raises_one_line(path: Path, *words: str) -> None:
    with pytest.raises(InputError) as error:
        read_png16(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


@pytest.fixture()
def good_png() -> bytes:
    return encode_png(random_samples(np.random.default_rng(5), 30, 30, 3), 2)


@pytest.mark.parametrize("keep", [20, 40, 100, -30, -5, -1])
def test_truncated(tmp_path: Path, good_png: bytes, keep: int) -> None:
    words = ("truncated",) if keep < 33 else ("damaged 16-bit PNG", "incomplete")
    raises_one_line(write(tmp_path, good_png[:keep]), *words)


def test_bad_crc(tmp_path: Path, good_png: bytes) -> None:
    damaged = bytearray(good_png)
    damaged[200] ^= 0x40  # inside the first IDAT chunk
    raises_one_line(write(tmp_path, bytes(damaged)), "libpng: IDAT: CRC error")
    damaged = bytearray(good_png)
    damaged[20] ^= 0x01  # the width, inside IHDR
    raises_one_line(write(tmp_path, bytes(damaged)), "CRC mismatch", "IHDR")


def test_bad_filter_type_and_short_data(tmp_path: Path) -> None:
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0))
    end = chunk(b"IEND", b"")
    bad_filter = bytes([0, 1, 2, 3, 4, 7, 1, 2, 3, 4])
    data = PNG_SIGNATURE + header + chunk(b"IDAT", zlib.compress(bad_filter)) + end
    raises_one_line(write(tmp_path, data), "libpng: bad adaptive filter value")
    data = PNG_SIGNATURE + header + chunk(b"IDAT", zlib.compress(bad_filter[:7])) + end
    raises_one_line(write(tmp_path, data), "libpng: Not enough image data")
    data = PNG_SIGNATURE + header + chunk(b"IDAT", b"not zlib data") + end
    raises_one_line(write(tmp_path, data), "libpng: IDAT: incorrect header check")


def test_libpng_messages_stay_off_stderr(tmp_path: Path, good_png: bytes, capfd: pytest.CaptureFixture[str]) -> None:
    """libpng prints its reason to file descriptor 2; it is quoted in the error instead, and fd 2 is restored."""
    damaged = bytearray(good_png)
    damaged[200] ^= 0x40
    with pytest.raises(InputError, match="CRC error"):
        read_png16(write(tmp_path, bytes(damaged)))
    read_png16(write(tmp_path, good_png, "good.png"))
    os.write(2, b"still stderr\n")
    assert capfd.readouterr().err == "still stderr\n"


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    """The pixel limit is checked from IHDR, before the (absent) data: the default, then an explicit one."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 16, 2, 0, 0, 0))
    data = PNG_SIGNATURE + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    raises_one_line(write(tmp_path, data), "50000x50000", "exceeds the limit", "--max-pixels 2500000000")
    samples = np.arange(4 * 6 * 3, dtype=np.uint16).reshape(4, 6, 3)
    path = write(tmp_path, encode_png(samples, 2))
    with pytest.raises(InputError, match="6x4 = 24 pixels exceeds the limit of 23 pixels"):
        read_png16(path, max_pixels=23)
    np.testing.assert_array_equal(read_png16(path, max_pixels=24), samples)
