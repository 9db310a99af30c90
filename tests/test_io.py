"""Image and label I/O: every accepted input format, clear errors, machine-readable certified maps."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_png16 import chunk, encode_png

from certseg.engine.errors import InputError
from certseg.engine.files import images as io
from certseg.engine.files.images import default_palette, overlay, read_image, read_labels, write_json, write_label_png
from certseg.engine.files.png16 import PNG_SIGNATURE

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, suffix", [("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("LA", ".png"),
                                          ("1", ".png"), ("L", ".jpg")])
def test_8bit_modes_keep_their_own_channels(tmp_path: Path, mode: str, suffix: str) -> None:
    """Colour becomes (3, H, W), gray (1, H, W): a gray image is certified in its own space, not as 3 copies."""
    path = tmp_path / f"im{suffix}"
    Image.fromarray(RGB8).convert(mode).save(path, **({"quality": 100} if suffix == ".jpg" else {}))
    image = read_image(path)
    gray = mode in ("L", "LA", "1")
    assert image.shape == ((1 if gray else 3), 5, 7) and image.dtype == np.float32
    with Image.open(path) as stored:
        expected = np.asarray(stored.convert("L" if gray else "RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(image, expected.reshape(5, 7, -1).transpose(2, 0, 1), atol=1e-7)


def test_16bit_gray_png_keeps_precision(tmp_path: Path) -> None:
    gray = RNG.integers(0, 65536, size=(4, 6), dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (1, 4, 6)
    np.testing.assert_allclose(image[0], gray / 65535.0, atol=1e-7)


@pytest.mark.parametrize("colour, channels", [(0, 1), (4, 1), (2, 3), (6, 3)])
def test_16bit_png_samples_reach_the_image_exactly(tmp_path: Path, colour: int, channels: int) -> None:
    """Every 16-bit colour type (written by the test's own encoder): gray (+ alpha) stays one channel, RGB keeps its
    order, alpha is dropped, and each value is its stored sample / 65535 in float32."""
    samples = RNG.integers(0, 65536, size=(5, 7, {0: 1, 4: 2, 2: 3, 6: 4}[colour]), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(encode_png(samples, colour))
    image = read_image(tmp_path / "deep.png")
    expected = samples[:, :, :channels].astype(np.float32) / np.float32(65535.0)
    np.testing.assert_array_equal(image, expected.transpose(2, 0, 1))


def test_jpeg_and_palette_images(tmp_path: Path) -> None:
    Image.fromarray(RGB8).save(tmp_path / "im.jpg", quality=95)
    assert read_image(tmp_path / "im.jpg").shape == (3, 5, 7)
    Image.fromarray(RGB8).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (3, 5, 7)


def test_unreadable_and_missing_files_give_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="bad.png: not a readable image") as error:
        read_image(tmp_path / "bad.png")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="no such image"):
        read_image(tmp_path / "missing.png")


def test_label_maps_round_trip_with_abstain_visible(tmp_path: Path) -> None:
    labels = RNG.integers(0, 20, size=(6, 9)).astype(np.uint8)  # 19 classes + abstain 19
    labels[0, :3] = [0, 5, 19]  # two classes and abstain, whatever the random draw
    palette = default_palette(19)
    write_label_png(tmp_path / "c.png", labels, palette)
    np.testing.assert_array_equal(read_labels(tmp_path / "c.png"), labels)
    with Image.open(tmp_path / "c.png") as image:
        assert image.mode == "P"
        drawn = np.asarray(image.convert("RGB"))
    expected = np.concatenate([palette, np.array([io.ABSTAIN_COLOUR], dtype=np.uint8)])[labels]
    np.testing.assert_array_equal(drawn, expected)  # every pixel its class colour, abstain white
    assert tuple(drawn[0, 2]) == (255, 255, 255) and tuple(drawn[0, 1]) == tuple(palette[5])
    wide = RNG.integers(0, 301, size=(3, 4)).astype(np.uint16)
    write_label_png(tmp_path / "w.png", wide, default_palette(300))
    np.testing.assert_array_equal(read_labels(tmp_path / "w.png"), wide)


def test_rgb_label_file_is_refused(tmp_path: Path) -> None:
    Image.fromarray(RGB8).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="single-channel"):
        read_labels(tmp_path / "rgb.png")


def test_overlay_marks_abstained_pixels() -> None:
    image = np.full((3, 8, 8), 0.5, dtype=np.float32)
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[:, 4:] = 3  # abstain for K = 3
    rgb = overlay(image, labels, default_palette(3))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[:, :4], rgb[:, 4:])


def test_json_is_written_atomically_and_is_valid(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"),
                                     "d": {"e": Path("x/y.png"), "f": np.bool_(True), "g": -np.inf},
                                     "h": np.array([[0.5, np.nan]], dtype=np.float32)})
    parsed = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert parsed == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": {"e": "x/y.png", "f": True, "g": None},
                      "h": [[0.5, None]]}
    assert not list(tmp_path.glob("*.partial"))


def png_header_only(path: Path, width: int, height: int, depth: int = 8, colour: int = 0) -> Path:
    """A tiny PNG whose header claims width x height (a decompression bomb as far as any reader that trusts the
    header can tell: the pixel data is never reached when the limit is checked first)."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    path.write_bytes(PNG_SIGNATURE + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("depth, colour", [(8, 0), (8, 2), (16, 2)])
@pytest.mark.parametrize("reader", [read_image, read_labels])
def test_huge_header_is_refused_before_decoding_in_one_line(tmp_path: Path, reader, depth: int, colour: int) -> None:
    """14000x14000 (over twice Pillow's own limit, which raised DecompressionBombError), 8-bit (Pillow) and 16-bit
    (OpenCV): the data is never reached (it holds 64 bytes; decoding it would fail with another message)."""
    path = png_header_only(tmp_path / "bomb.png", 14000, 14000, depth, colour)
    with pytest.raises(InputError) as error:
        reader(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "14000x14000" in message and f"{io.DEFAULT_MAX_PIXELS:,}" in message and "--max-pixels" in message


def test_a_raised_limit_replaces_pillows_own_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's MAX_IMAGE_PIXELS (here made tiny) neither refuses nor warns about what --max-pixels allows."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    Image.fromarray(RGB8).save(tmp_path / "im.png")  # 35 pixels: Pillow would raise above 20 and warn above 10
    Image.fromarray(RGB8[:, :, 0]).save(tmp_path / "labels.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "im.png", max_pixels=35) * 255, RGB8.transpose(2, 0, 1))
        np.testing.assert_array_equal(read_labels(tmp_path / "labels.png", max_pixels=35), RGB8[:, :, 0])
    assert Image.MAX_IMAGE_PIXELS == 10  # restored
    with pytest.raises(InputError, match="7x5 = 35 pixels exceeds the limit of 34"):
        read_image(tmp_path / "im.png", max_pixels=34)


def test_a_folder_is_called_a_folder(tmp_path: Path) -> None:
    for reader in (read_image, read_labels):
        with pytest.raises(InputError, match="is a folder"):
            reader(tmp_path)


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_jpeg_exif_orientation_is_applied_to_images_and_labels(tmp_path: Path) -> None:
    """Orientation 6 (stored sideways, shown rotated 90° clockwise): read as a viewer shows it."""
    stored = np.repeat(np.repeat(RGB8, 8, axis=0), 8, axis=1)  # 40x56, blocks survive JPEG well
    Image.fromarray(stored).save(tmp_path / "im.jpg", quality=100, exif=exif_with(6))
    with Image.open(tmp_path / "im.jpg") as raw:
        decoded = np.asarray(raw.convert("RGB"))  # the stored pixels, as decoded, not turned
    image = read_image(tmp_path / "im.jpg")
    assert image.shape == (3, 56, 40)
    np.testing.assert_array_equal(image.transpose(1, 2, 0) * 255, np.rot90(decoded, -1).astype(np.float32))
    labels = (np.arange(40 * 56) % 7).astype(np.uint8).reshape(40, 56)
    Image.fromarray(labels).save(tmp_path / "labels.png", exif=exif_with(6))
    np.testing.assert_array_equal(read_labels(tmp_path / "labels.png"), np.rot90(labels, -1))
    assert read_labels(tmp_path / "labels.png").shape == image.shape[1:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_png_orientation_matches_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    """OpenCV decodes 16-bit PNGs unturned; certseg's turn must equal what Pillow does for an 8-bit copy."""
    samples = (np.arange(3 * 4 * 3, dtype=np.uint16).reshape(3, 4, 3) * 1000).astype(np.uint16)
    data = encode_png(samples, 2)
    exif = exif_with(orientation).tobytes()
    data = data[:33] + chunk(b"eXIf", exif) + data[33:]  # after IHDR, before IDAT
    (tmp_path / "deep.png").write_bytes(data)
    eight = Image.fromarray((samples // 256).astype(np.uint8))
    expected = np.asarray(ImageOps.exif_transpose(_with_exif(eight, exif)))
    got = read_image(tmp_path / "deep.png").transpose(1, 2, 0) * 65535
    np.testing.assert_array_equal(np.round(got).astype(np.uint16) // 256, expected)


def _with_exif(image: Image.Image, exif: bytes) -> Image.Image:
    image.info["exif"] = exif
    return image


def test_16bit_png_orientation_is_read_without_a_second_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV decodes 16-bit PNGs; Pillow only reads their header chunks (for an eXIf chunk)."""
    from PIL import PngImagePlugin

    samples = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
    (tmp_path / "deep.png").write_bytes(encode_png(samples, 2))

    def no_decode(self: object) -> None:
        raise AssertionError("Pillow decoded the image")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    np.testing.assert_array_equal(np.round(read_image(tmp_path / "deep.png") * 65535).transpose(1, 2, 0), samples)
