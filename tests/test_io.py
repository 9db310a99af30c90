"""Image and label I/O: every accepted input format, clear errors, machine-readable certified maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.engine.errors import InputError
from certseg.engine.io import default_palette, overlay, read_image, read_labels, write_json, write_label_png

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, suffix", [("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("LA", ".png")])
def test_8bit_png_modes(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"im{suffix}"
    Image.fromarray(RGB8).convert(mode).save(path)
    image = read_image(path)
    assert image.shape == (3, 5, 7) and image.dtype == np.float32
    expected = np.asarray(Image.fromarray(RGB8).convert(mode).convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(image, expected.transpose(2, 0, 1), atol=1e-7)


def test_16bit_gray_png_keeps_precision(tmp_path: Path) -> None:
    gray = RNG.integers(0, 65536, size=(4, 6), dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    for channel in image:
        np.testing.assert_allclose(channel, gray / 65535.0, atol=1e-7)


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
    palette = default_palette(19)
    write_label_png(tmp_path / "c.png", labels, palette)
    np.testing.assert_array_equal(read_labels(tmp_path / "c.png"), labels)
    with Image.open(tmp_path / "c.png") as image:
        assert image.mode == "P"
        assert image.convert("RGB").getpixel((0, 0)) is not None
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
    write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan")})
    assert (tmp_path / "r.json").read_text().count("\n") > 1
    assert not list(tmp_path.glob("*.partial"))
