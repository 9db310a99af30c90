"""``--report``: ``report.md`` (the paper's tables, throughput, engine vs baseline) and PNG plots, from entries only."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

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
    stage_table,
    throughput_table,
)
from certseg.bench.timing import STAGES
from certseg.engine.radius import ACCURACY_RADII

SHORT = {"segcertify": "SegCertify", "denoisecertify": "DenoiseCertify"}
ABBREVIATION = {"segcertify": "SC", "denoisecertify": "DC"}


def _series_name(row: Row) -> str:
    return f"{SHORT.get(row.method, row.method)} scale {row.scale:g}"


def _sigma_ticks(rows: list[Row]) -> list[tuple[float, str]]:
    radii = {r.sigma: r.radius for r in rows}
    return [(sigma, f"sigma={sigma:g}\nR={radii[sigma]:.2f}") for sigma in sorted(radii)]


def plot(rows: list[Row], folder: Path) -> list[Path]:
    """Certified accuracy, mIoU and abstain % vs σ (R); seconds per image; the stage split."""
    engine = [r for r in rows if r.variant == "engine"]
    if not engine:
        return []
    by_series: dict[str, list[Row]] = defaultdict(list)
    for row in engine:
        by_series[_series_name(row)].append(row)
    ticks = _sigma_ticks(engine)
    paths = [
        line_chart(folder / "accuracy.png", "Certified accuracy",
                   {k: [(r.sigma, r.accuracy) for r in v] for k, v in by_series.items()},
                   x_label="noise sigma (certified radius R)", y_label="accuracy", x_ticks=ticks, y_range=(0.0, 1.0)),
        line_chart(folder / "miou.png", "Certified mIoU",
                   {k: [(r.sigma, r.mean_iou) for r in v] for k, v in by_series.items()},
                   x_label="noise sigma (certified radius R)", y_label="mIoU", x_ticks=ticks, y_range=(0.0, 1.0)),
        line_chart(folder / "abstain.png", "Abstained pixels",
                   {k: [(r.sigma, r.abstain_percent) for r in v] for k, v in by_series.items()},
                   x_label="noise sigma (certified radius R)", y_label="abstain %", x_ticks=ticks,
                   y_range=(0.0, 100.0)),
    ]
    times = {f"{ABBREVIATION.get(r.method, r.method)} x{r.scale:g} s{r.sigma:g} {r.variant}":
             list(enumerate(r.per_image_seconds)) for r in rows}
    paths.append(line_chart(folder / "time_per_image.png", "Seconds per image", times, x_label="image",
                            y_label="seconds"))
    bars = [(f"{ABBREVIATION.get(r.method, r.method)} s{r.sigma:g}\nx{r.scale:g} {r.variant[:4]}", r.stages)
            for r in rows if r.stages]
    if bars:
        paths.append(stacked_bars(folder / "stages.png", "Time per image by stage", bars, y_label="seconds"))
    return paths


def plot_radius_curves(curves: list[RadiusCurve], folder: Path, points: int = 120) -> Path:
    """Cohen et al.'s figure: certified accuracy against radius, one line per method, scale and σ."""
    top = max((float(c.radii.max()) for c in curves if c.radii.size), default=1.0)
    levels = np.linspace(0.0, top * 1.02, points)
    series = {f"{SHORT.get(c.method, c.method)} x{c.scale:g} sigma={c.sigma:g}":
              list(zip(levels.tolist(), c.accuracy_at(levels).tolist(), strict=True)) for c in curves}
    return line_chart(folder / "accuracy_vs_radius.png", "Certified accuracy vs radius (per-pixel radius maps)",
                      series, x_label="L2 radius R", y_label="certified accuracy", y_range=(0.0, 1.0), markers=False)


def _settings_lines(header: dict[str, Any] | None, entries: list[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    first = entries[0]
    lines = [f"- n0 = {first['n0']}, n = {first['n']}, α = {first['alpha']}, τ = {first['tau']}, "
             f"FWER: {first['fwer']}; device {first['device']}"]
    if header is not None:
        dataset = header.get("dataset", {})
        lines.insert(0, f"- dataset: {dataset.get('name')} ({dataset.get('selection', '')})")
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
             "peak RSS is the process's peak so far (CPU), GPU peak the allocator's peak for the entry.", "",
             markdown(*throughput_table(rows)), "### Time split per stage (mean seconds per image)", "",
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
    plots = plot(rows, folder)
    if curves:
        plots.append(plot_radius_curves(curves, folder))
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path
