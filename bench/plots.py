"""Small PNG charts drawn with Pillow (line charts and stacked bars), so reports need no plotting library.

Drawn at twice the size and downsampled, which antialiases lines and text. Labels stay ASCII: Pillow's default
font has no Greek letters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 900, 520
S = 2  # supersampling factor
MARGIN = {"left": 80, "right": 230, "top": 50, "bottom": 70}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GRID, AXIS, TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size * S)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


class _Frame:
    """Plot area, value → pixel mapping, axes, grid and legend."""

    def __init__(self, title: str, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str,
                 y_label: str) -> None:
        self.image = Image.new("RGB", (WIDTH * S, HEIGHT * S), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.top = MARGIN["left"] * S, MARGIN["top"] * S
        self.right, self.bottom = (WIDTH - MARGIN["right"]) * S, (HEIGHT - MARGIN["bottom"]) * S
        self.x_range, self.y_range = x_range, y_range
        self.draw.text(((WIDTH - MARGIN["right"]) // 2 * S, 18 * S), title, fill=TEXT, font=_font(18), anchor="mm")
        self.draw.text(((self.left + self.right) // 2, (HEIGHT - 18) * S), x_label, fill=TEXT, font=_font(14),
                       anchor="mm")
        self.draw.text((14 * S, self.top - 28 * S), y_label, fill=TEXT, font=_font(14))

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1.0) * (self.right - self.left)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.bottom - (value - low) / ((high - low) or 1.0) * (self.bottom - self.top)

    def axes(self, y_ticks: Sequence[float], x_ticks: Sequence[tuple[float, str]]) -> None:
        font = _font(12)
        for value in y_ticks:
            if self.y_range[0] - 1e-9 <= value <= self.y_range[1] + 1e-9:
                py = self.y(value)
                self.draw.line([(self.left, py), (self.right, py)], fill=GRID)
                self.draw.text((self.left - 8 * S, py), f"{value:g}", fill=TEXT, font=font, anchor="rm")
        for value, label in x_ticks:
            px = self.x(value)
            self.draw.line([(px, self.bottom), (px, self.bottom + 5 * S)], fill=AXIS, width=S)
            for i, part in enumerate(label.split("\n")):
                self.draw.text((px, self.bottom + (16 + 14 * i) * S), part, fill=TEXT, font=font, anchor="mm")
        self.draw.line([(self.left, self.top), (self.left, self.bottom), (self.right, self.bottom)], fill=AXIS,
                       width=2 * S)

    def legend(self, names: Sequence[str]) -> None:
        font = _font(12)
        for i, name in enumerate(names):
            py = self.top + (10 + 20 * i) * S
            colour = COLOURS[i % len(COLOURS)]
            self.draw.rectangle([self.right + 20 * S, py - 5 * S, self.right + 34 * S, py + 5 * S], fill=colour)
            self.draw.text((self.right + 42 * S, py), name, fill=TEXT, font=font, anchor="lm")

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS).save(path)
        return path


def line_chart(
    path: Path, title: str, series: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str,
    x_ticks: Sequence[tuple[float, str]] | None = None, y_range: tuple[float, float] | None = None,
    markers: bool = True,
) -> Path:
    """One polyline per series, with a marker at each point unless ``markers`` is off (dense curves)."""
    points = [p for values in series.values() for p in values]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x_low, x_high = min(xs), max(xs)
    pad = 0.05 * ((x_high - x_low) or 1.0)
    y_range = y_range or (0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0)
    frame = _Frame(title, (x_low - pad, x_high + pad), y_range, x_label, y_label)
    ticks = x_ticks if x_ticks is not None else [(v, f"{v:g}") for v in nice_ticks(x_low, x_high)
                                                  if x_low - pad <= v <= x_high + pad]
    frame.axes(nice_ticks(*y_range), ticks)
    for i, values in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [(frame.x(x), frame.y(y)) for x, y in sorted(values)]
        if len(pixels) > 1:
            frame.draw.line(pixels, fill=colour, width=3 * S, joint="curve")
        for px, py in pixels if markers else ():
            frame.draw.ellipse([px - 4 * S, py - 4 * S, px + 4 * S, py + 4 * S], fill=colour)
    frame.legend(list(series))
    return frame.save(path)


def stacked_bars(
    path: Path, title: str, bars: list[tuple[str, dict[str, float]]], *, y_label: str
) -> Path:
    """One bar per label, stacked by component (the same components, in order, for every bar)."""
    components = list(dict.fromkeys(c for _, parts in bars for c in parts))
    top = max((sum(parts.values()) for _, parts in bars), default=1.0) * 1.1 or 1.0
    frame = _Frame(title, (-0.5, len(bars) - 0.5), (0.0, top), "", y_label)
    frame.axes(nice_ticks(0.0, top), [(i, label) for i, (label, _) in enumerate(bars)])
    half = 0.35
    for i, (_, parts) in enumerate(bars):
        base = 0.0
        for j, component in enumerate(components):
            value = parts.get(component, 0.0)
            if value > 0:
                frame.draw.rectangle([frame.x(i - half), frame.y(base + value), frame.x(i + half), frame.y(base)],
                                     fill=COLOURS[j % len(COLOURS)])
            base += value
    frame.legend(components)
    return frame.save(path)
