"""``--report``: ``report.md`` (the paper's tables, throughput, engine vs baseline) and its figures, from entries only.

Figures need matplotlib (the ``bench`` extra); without it the report is written all the same and says so in one
line where the figures would be.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from certseg.bench import plots
from certseg.bench.plots import line_chart, stacked_bars
from certseg.bench.tables import (
    RadiusCurve,
    Row,
    accuracy_table,
    aggregate,
    compare,
    comparison_table,
    markdown,
    radius_curves,
    radius_table,
    server_rows,
    server_table,
    stage_table,
    throughput_table,
)
from certseg.bench.timing import STAGES
from certseg.engine.core.radius import ACCURACY_RADII

SHORT = {"segcertify": "SegCertify", "denoisecertify": "DenoiseCertify"}
ABBREVIATION = {"segcertify": "SC", "denoisecertify": "DC"}


SIGMA_AXIS = "noise σ (certified radius R = σ·Φ⁻¹(τ))"


def _series_name(row: Row) -> str:
    steps = "" if row.denoise_steps == 1 else f" K={row.denoise_steps}"
    return f"{SHORT.get(row.method, row.method)} scale {row.scale:g}{steps}"


def _sigma_ticks(rows: list[Row]) -> list[tuple[float, str]]:
    radii = {r.sigma: r.radius for r in rows}
    return [(sigma, f"σ = {sigma:g}\nR = {radii[sigma]:.2f}") for sigma in sorted(radii)]


def _spans_decades(values: list[float]) -> bool:
    """Whether positive values differ by more than 10× (then a log axis shows them all)."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) > 10 * min(positive)


def plot(rows: list[Row], folder: Path) -> list[Path]:
    """Certified accuracy, mIoU and abstain % vs σ (R); seconds per image; the stage split."""
    engine = [r for r in rows if r.variant == "engine"]
    if not engine:
        return []
    by_series: dict[str, list[Row]] = defaultdict(list)
    for row in engine:
        by_series[_series_name(row)].append(row)
    ticks = _sigma_ticks(engine)

    def against_sigma(name: str, title: str, value: Callable[[Row], float], y_label: str, top: float) -> Path:
        """σ on a log axis: σ grids double (0.25, 0.5, 1.0)."""
        series = {k: [(r.sigma, value(r)) for r in v] for k, v in by_series.items()}
        return line_chart(folder / f"{name}.png", title, series, x_label=SIGMA_AXIS, y_label=y_label, x_ticks=ticks,
                          y_range=(0.0, top), x_log=True)

    paths = [
        against_sigma("accuracy", "Certified accuracy", lambda r: r.accuracy, "certified accuracy", 1.0),
        against_sigma("miou", "Certified mIoU", lambda r: r.mean_iou, "mIoU", 1.0),
        against_sigma("abstain", "Abstained pixels", lambda r: r.abstain_percent, "abstain %", 100.0),
    ]
    times = {f"{ABBREVIATION.get(r.method, r.method)} ×{r.scale:g} σ={r.sigma:g} {r.variant}":
             list(enumerate(r.per_image_seconds)) for r in rows}
    seconds = [s for r in rows for s in r.per_image_seconds]
    paths.append(line_chart(folder / "time_per_image.png", "Seconds per image", times, x_label="image",
                            y_label="seconds", y_log=_spans_decades(seconds)))
    bars = [(f"{ABBREVIATION.get(r.method, r.method)} σ={r.sigma:g}\n×{r.scale:g} {r.variant}", r.stages)
            for r in rows if r.stages]
    if bars:
        paths.append(stacked_bars(folder / "stages.png", "Time per image by stage", bars, y_label="seconds"))
    return paths


def plot_radius_curves(curves: list[RadiusCurve], folder: Path, points: int = 120) -> Path:
    """Cohen et al.'s figure: certified accuracy against radius, one line per method, scale and σ."""
    top = max((float(c.radii.max()) for c in curves if c.radii.size), default=1.0)
    levels = np.linspace(0.0, top * 1.02, points)
    several_scales = len({c.scale for c in curves}) > 1
    series = {f"{SHORT.get(c.method, c.method)}{f' ×{c.scale:g}' if several_scales else ''}, σ = {c.sigma:g}"
              f"{'' if c.denoise_steps == 1 else f', K = {c.denoise_steps}'}":
              list(zip(levels.tolist(), c.accuracy_at(levels).tolist(), strict=True)) for c in curves}
    return line_chart(folder / "accuracy_vs_radius.png", "Certified accuracy vs radius (per-pixel radius maps)",
                      series, x_label="L2 radius R", y_label="certified accuracy", y_range=(0.0, 1.0), markers=False)


def protocol_line(header: dict[str, Any] | None) -> str:
    """Which protocol a results file used (a file from before protocols existed used certseg's own)."""
    if header is None:
        return "unknown"
    return str(header.get("protocol") or header.get("compat", {}).get("protocol") or "certseg")


def _settings_lines(header: dict[str, Any] | None, entries: list[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    first = entries[0]
    lines = [f"- n0 = {first['n0']}, n = {first['n']}, α = {first['alpha']}, τ = {first['tau']}, "
             f"FWER: {first['fwer']}; device {first['device']}"]
    if header is not None:
        dataset = header.get("dataset", {})
        lines.insert(0, f"- dataset: {dataset.get('name')} ({dataset.get('selection', '')})")
        lines.insert(1, f"- protocol: {protocol_line(header)}")
        compat = header.get("compat", {})
        lines.append(f"- seed {compat.get('seed')} ({header.get('seed_rule', '')}); runtime {compat.get('runtime')}, "
                     f"precision {compat.get('precision')}, batch {compat.get('batch')}, "
                     f"t* rule {compat.get('t_rule')}")
    models = {}
    for entry in entries:
        for role, record in entry["models"].items():
            if record is not None:
                models[f"{entry['method']} {role}"] = f"{record['name']} (sha256 {record['sha256'][:12]})"
    lines += [f"- {name}: {text}" for name, text in sorted(models.items())]
    return lines


def write_report(folder: Path, header: dict[str, Any] | None, entries: list[dict[str, Any]]) -> Path:
    """Write ``report.md`` and the plots into ``folder``; returns the Markdown file's path."""
    folder = Path(folder)
    rows = aggregate(entries)
    parts = ["# certseg-bench report", "", *_settings_lines(header, entries), "",
             "## Certified segmentation (the paper's table format)", "",
             "acc = certified per-pixel accuracy, mIoU over the real classes, abstain % = mean per-image share of "
             "abstained pixels (void included), R = σ·Φ⁻¹(τ).", "", markdown(*accuracy_table(rows)),
             "## Throughput", "",
             "s/image = wall time per image; samples/s = (n0 + n) / sampling time; e2e includes the certify step; "
             "images/hour = entries over the wall time they were being made (images in flight at once overlap); "
             "peak RSS is the process's peak so far (CPU), GPU peak the allocator's peak for the entry.", "",
             markdown(*throughput_table(rows))]
    servers = server_rows(entries)
    if servers:
        parts += ["### Triton servers", "",
                  "Samples each server answered (the client's count), over the wall time of the entries it took part "
                  "in; `all`: every server together, and the served entries per hour end to end.", "",
                  markdown(*server_table(servers))]
    parts += ["### Time split per stage (mean seconds per image)", "",
             f"Stages: {', '.join(STAGES)} (see certseg.bench.timing).", "", markdown(*stage_table(rows))]
    comparisons = compare(entries)
    if comparisons:
        parts += ["## Engine vs authors-style baseline (same images, models, seeds)", "",
                  "Baseline: batch 1, fp32 eager, per-pixel `binomtest` loop, statsmodels FWER.", "",
                  markdown(*comparison_table(comparisons))]
    curves = radius_curves(entries)
    if curves:
        parts += ["## Certified accuracy vs radius (per-pixel radius maps)", "",
                  "Each pixel's own radius R_i = σ·Φ⁻¹(p̲_i), p̲_i its Clopper–Pearson lower bound at 1 − α/N (valid for "
                  "all pixels at once with probability ≥ 1 − α); accuracy = correct pixels with R_i ≥ R over all "
                  "non-ignored pixels.", "", markdown(*radius_table(curves, ACCURACY_RADII))]
    if not plots.available():
        parts += ["## Plots", "", plots.MISSING, ""]
    else:
        figures = plot(rows, folder) + ([plot_radius_curves(curves, folder)] if curves else [])
        if figures:
            parts += ["## Plots", "", "Each figure is also beside its PNG as PDF and SVG (vector, text kept as text).",
                      ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path
