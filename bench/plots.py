"""The report's figures, drawn with matplotlib (the ``bench`` extra: ``pip install 'certseg[bench]'``).

Every figure is written three times beside each other: PNG for ``report.md`` and the README, PDF and SVG as vector
figures for papers (text kept as text in both, so it stays editable and Greek letters survive). Figures are built
on ``matplotlib.figure.Figure`` directly, not pyplot: no screen, no global backend switch, nothing left open. Files
carry no creation date, so re-rendering the same results gives the same bytes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
"""Written for every figure; the PNG is the one the report links."""
SIZE_INCHES, DPI = (9.0, 5.2), 100
"""900 × 520 pixels as PNG."""
MISSING = "plots skipped: they need matplotlib (pip install 'certseg[bench]')"
STYLE: dict[str, Any] = {
    "pdf.fonttype": 42,  # TrueType: text stays text in PDF editors
    "svg.fonttype": "none",  # text as <text>, not outlines
    "svg.hashsalt": "certseg",  # stable element ids
    "axes.grid": True,
    "grid.color": "0.9",
    "axes.spines.top": False,
    "axes.spines.right": False,
}
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}
"""Dates and tool versions left out of the files, so the same data gives the same bytes."""


def available() -> bool:
    """Whether matplotlib can be imported (the report then says in one line why it has no plots)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module object without a spec, e.g. a placeholder in sys.modules
        return False


def _styled() -> AbstractContextManager[Any]:
    """The house style, for building and for saving (the font types apply when the file is written)."""
    from matplotlib import rc_context

    return rc_context(STYLE)


def _figure(title: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    return figure, axes


def _save(figure: Figure, path: Path) -> Path:
    """Write ``path`` (a .png) and its PDF and SVG siblings; returns the PNG's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in FORMATS:
        figure.savefig(path.with_suffix(f".{suffix}"), metadata=METADATA[suffix])
    return path


def _legend(figure: Figure, axes: Axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        figure.legend(loc="outside right upper", fontsize="small", frameon=False)


def line_chart(
    path: Path, title: str, series: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str,
    x_ticks: Sequence[tuple[float, str]] | None = None, y_range: tuple[float, float] | None = None,
    markers: bool = True, x_log: bool = False, y_log: bool = False,
) -> Path:
    """One line per series (points sorted by x), markers unless ``markers`` is off (dense curves); log axes on
    request (σ grids are geometric; seconds of engine and baseline differ by orders of magnitude)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    with _styled():
        figure, axes = _figure(title)
        for name, points in series.items():
            xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
            axes.plot(xs, ys, marker="o" if markers else None, markersize=4, linewidth=1.8, label=name)
        if x_log:
            axes.set_xscale("log", base=2)
        if y_log:
            axes.set_yscale("log")
            axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ...
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        if all(float(x).is_integer() for points in series.values() for x, _ in points):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # image indices: no tick at 2.5
        if x_ticks is not None:
            axes.set_xticks([value for value, _ in x_ticks], [label for _, label in x_ticks], multialignment="center")
            axes.minorticks_off()
        if y_range is not None:
            axes.set_ylim(*y_range)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        _legend(figure, axes)
        return _save(figure, path)


def stacked_bars(path: Path, title: str, bars: list[tuple[str, dict[str, float]]], *, y_label: str) -> Path:
    """One bar per label, stacked by component (the same components, in order, for every bar)."""
    components = list(dict.fromkeys(c for _, parts in bars for c in parts))
    with _styled():
        figure, axes = _figure(title)
        positions = range(len(bars))
        base = [0.0] * len(bars)
        for component in components:
            values = [parts.get(component, 0.0) for _, parts in bars]
            axes.bar(positions, values, bottom=base, width=0.7, label=component)
            base = [b + v for b, v in zip(base, values, strict=True)]
        axes.set_xticks(list(positions), [label for label, _ in bars], fontsize="small",
                        rotation=0 if len(bars) <= 6 else 45, ha="center" if len(bars) <= 6 else "right",
                        multialignment="center")
        axes.grid(axis="x", visible=False)
        axes.set_ylabel(y_label)
        _legend(figure, axes)
        return _save(figure, path)
