"""The paper's tables, computed from results entries alone: one confusion matrix per (variant, method, scale, σ, K).

Rows follow the paper (Table 2 order: scale, method, σ, with R = σ·Φ⁻¹(τ)); accuracy and mIoU over the K real
classes come from the summed confusion matrices, abstain % is the mean per-image abstain fraction (void pixels
included), exactly as ``certseg.engine.core.metrics.CertifiedMetrics`` computes them for one run. K, the denoising
steps, gets a column only where the rows hold more than one value (entries without it were made with K = 1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from certseg.bench.config import VARIANTS
from certseg.bench.timing import STAGES
from certseg.engine.choices import Method
from certseg.engine.core.metrics import CertifiedMetrics

METHOD_ORDER: tuple[str, ...] = tuple(Method)
"""Rows of each method in this order."""


@dataclass
class Row:
    variant: str
    method: str
    scale: float
    sigma: float
    radius: float
    images: int
    accuracy: float
    mean_iou: float
    abstain_percent: float
    seconds_per_image: float
    sampling_seconds_per_image: float
    certify_seconds_per_image: float
    samples_per_second: float
    """Sampling throughput: (n0 + n) samples over the sampling time (selection + estimation)."""
    end_to_end_samples_per_second: float
    images_per_hour: float | None = None
    """End to end: the row's entries over the wall time during which they were being made (``busy_seconds``),
    so images certified at once (``--images-in-flight``) and the time between entries count as they happened."""
    stages: dict[str, float] = field(default_factory=dict)
    """Mean seconds per image per stage (empty when stage timing was off)."""
    peak_rss_mib: float = 0.0
    gpu_peak_mib: float | None = None
    gpu_utilization: float | None = None
    timestep: int | None = None
    per_image_seconds: list[float] = field(default_factory=list)
    denoise_steps: int = 1


def _metrics(entries: list[dict[str, Any]]) -> CertifiedMetrics:
    metrics = CertifiedMetrics(int(entries[0]["num_classes"]))
    metrics.confusion = np.sum([np.asarray(e["confusion"], dtype=np.int64) for e in entries], axis=0)
    metrics.abstain_fractions = [float(e["abstain_fraction"]) for e in entries]
    return metrics


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _interval(entry: dict[str, Any]) -> tuple[float, float]:
    """When an entry was being made, in POSIX seconds (entries written before ``started_at`` existed: its total time
    back from when it finished)."""
    finished = datetime.fromisoformat(entry["finished_at"]).timestamp()
    started = entry.get("started_at")
    return (finished - float(entry["timings"]["total"]) if started is None
            else datetime.fromisoformat(started).timestamp()), finished


def busy_seconds(entries: Iterable[dict[str, Any]]) -> float:
    """The wall time covered by the entries' [started, finished] intervals, overlaps counted once: the time the
    run spent making them, without the pauses between interrupted and resumed runs."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(_interval(e) for e in entries):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _per_hour(count: int, seconds: float) -> float | None:
    return 3600.0 * count / seconds if seconds > 0 else None


def steps_of(entry: dict[str, Any]) -> int:
    """An entry's denoising steps K (1 for entries written before the option existed)."""
    return int(entry.get("denoise_steps", 1))


def _row(group: tuple[str, str, float, float, int], entries: list[dict[str, Any]]) -> Row:
    variant, method, scale, sigma, steps = group
    metrics = _metrics(entries)
    samples = sum(e["n0"] + e["n"] for e in entries)
    sampling = sum(e["timings"]["sampling"] for e in entries)
    total = sum(e["timings"]["total"] for e in entries)
    count = len(entries)
    stages: dict[str, float] = {}
    if all(e["timings"].get("stages") for e in entries):
        stages = {s: sum(e["timings"]["stages"].get(s, 0.0) for e in entries) / count for s in STAGES}
    timestep = entries[0].get("timestep")
    return Row(
        variant=variant, method=method, scale=scale, sigma=sigma, radius=float(entries[0]["radius"]), images=count,
        accuracy=metrics.certified_accuracy, mean_iou=metrics.mean_iou, abstain_percent=metrics.abstain_percent,
        seconds_per_image=total / count, sampling_seconds_per_image=sampling / count,
        certify_seconds_per_image=sum(e["timings"]["certify"] for e in entries) / count,
        samples_per_second=samples / sampling if sampling else 0.0,
        end_to_end_samples_per_second=samples / total if total else 0.0,
        images_per_hour=_per_hour(count, busy_seconds(entries)),
        stages=stages,
        peak_rss_mib=max(float(e.get("peak_rss_mib") or 0.0) for e in entries),
        gpu_peak_mib=max((e["gpu_peak_mib"] for e in entries if e.get("gpu_peak_mib") is not None), default=None),
        gpu_utilization=_mean(e.get("gpu_utilization") for e in entries),
        timestep=None if timestep is None else int(timestep),
        per_image_seconds=[float(e["timings"]["total"]) for e in sorted(entries, key=lambda e: e["image_index"])],
        denoise_steps=steps,
    )


def _rank(known: tuple[str, ...], value: str) -> int:
    return known.index(value) if value in known else len(known)


def aggregate(entries: Iterable[dict[str, Any]]) -> list[Row]:
    """One row per (variant, method, scale, σ, K), in the paper's order, engine rows before baseline rows."""
    groups: dict[tuple[str, str, float, float, int], list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        groups[(entry["variant"], entry["method"], float(entry["scale"]), float(entry["sigma"]),
                steps_of(entry))].append(entry)
    order = sorted(groups, key=lambda g: (_rank(VARIANTS, g[0]), g[2], _rank(METHOD_ORDER, g[1]), g[1], g[3], g[4]))
    return [_row(group, groups[group]) for group in order]


@dataclass(frozen=True)
class Comparison:
    """Engine vs authors-style baseline on the same images, settings and seeds."""

    method: str
    scale: float
    sigma: float
    images: int
    engine_samples_per_second: float
    baseline_samples_per_second: float
    engine_seconds_per_image: float
    baseline_seconds_per_image: float
    engine_certify_seconds: float
    baseline_certify_seconds: float
    identical_certificates: bool
    engine_peak_rss_mib: float = 0.0
    """The largest process peak RSS over the pairs' engine entries: the engine's own only where the two variants
    ran in separate processes (``baseline_compare --isolate``); in one process the later variant's includes the
    earlier's."""
    baseline_peak_rss_mib: float = 0.0

    @property
    def sampling_speedup(self) -> float:
        return self.engine_samples_per_second / self.baseline_samples_per_second

    @property
    def end_to_end_speedup(self) -> float:
        return self.baseline_seconds_per_image / self.engine_seconds_per_image

    @property
    def certify_speedup(self) -> float:
        return self.baseline_certify_seconds / max(self.engine_certify_seconds, 1e-12)


def _rate(pairs: list[tuple[dict, dict]], side: int) -> float:
    return sum(p[side]["n0"] + p[side]["n"] for p in pairs) / sum(p[side]["timings"]["sampling"] for p in pairs)


def _per_image(pairs: list[tuple[dict, dict]], side: int, key: str) -> float:
    return sum(p[side]["timings"][key] for p in pairs) / len(pairs)


def compare(entries: Iterable[dict[str, Any]]) -> list[Comparison]:
    """Pairs of engine and baseline entries with the same key; only images both variants finished count."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for entry in entries:
        key = (entry["method"], float(entry["scale"]), float(entry["sigma"]), steps_of(entry), entry["image"])
        by_key[key][entry["variant"]] = entry
    groups: dict[tuple[str, float, float, int], list[tuple[dict, dict]]] = defaultdict(list)
    for (method, scale, sigma, steps, _), pair in by_key.items():
        if "engine" in pair and "baseline" in pair:
            groups[(method, scale, sigma, steps)].append((pair["engine"], pair["baseline"]))
    out = []
    for (method, scale, sigma, _), pairs in sorted(groups.items(), key=lambda kv: (
            kv[0][1], _rank(METHOD_ORDER, kv[0][0]), kv[0][0], kv[0][2], kv[0][3])):
        out.append(Comparison(
            method=method, scale=scale, sigma=sigma, images=len(pairs),
            engine_samples_per_second=_rate(pairs, 0), baseline_samples_per_second=_rate(pairs, 1),
            engine_seconds_per_image=_per_image(pairs, 0, "total"),
            baseline_seconds_per_image=_per_image(pairs, 1, "total"),
            engine_certify_seconds=_per_image(pairs, 0, "certify"),
            baseline_certify_seconds=_per_image(pairs, 1, "certify"),
            identical_certificates=all(e["labels_sha256"] == b["labels_sha256"] for e, b in pairs),
            engine_peak_rss_mib=max(float(e.get("peak_rss_mib") or 0.0) for e, _ in pairs),
            baseline_peak_rss_mib=max(float(b.get("peak_rss_mib") or 0.0) for _, b in pairs),
        ))
    return out


def _with_steps(
    rows: list[Row], header: list[str], body: list[list[str]], after: str
) -> tuple[list[str], list[list[str]]]:
    """The table with a K column after ``after`` where ``rows`` (one per body row) hold several K values."""
    if len({r.denoise_steps for r in rows}) < 2:
        return header, body
    at = header.index(after) + 1
    return (header[:at] + ["K"] + header[at:],
            [line[:at] + [str(r.denoise_steps)] + line[at:] for r, line in zip(rows, body, strict=True)])


def accuracy_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """The paper's table: scale, method, σ, R, acc, mIoU, abstain % (engine rows; the baseline certifies the same)."""
    header = ["scale", "method", "σ", "R", "t*", "acc", "mIoU", "abstain %", "images"]
    rows = [r for r in rows if r.variant == "engine"]
    body = [
        [f"{r.scale:.2f}", r.method, f"{r.sigma:.2f}", f"{r.radius:.2f}",
         "-" if r.timestep is None else str(r.timestep), f"{r.accuracy:.2f}", f"{r.mean_iou:.2f}",
         f"{r.abstain_percent:.1f}", str(r.images)]
        for r in rows
    ]
    return _with_steps(rows, header, body, "t*")


def throughput_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Seconds per image, samples/s (sampling only and end to end) and peak memory."""
    header = ["variant", "scale", "method", "σ", "s/image", "sampling s", "certify s", "samples/s", "samples/s e2e",
              "images/hour", "peak RSS MiB", "GPU peak MiB", "GPU util %"]
    body = [
        [r.variant, f"{r.scale:.2f}", r.method, f"{r.sigma:.2f}", f"{r.seconds_per_image:.3f}",
         f"{r.sampling_seconds_per_image:.3f}", f"{r.certify_seconds_per_image:.4f}", f"{r.samples_per_second:.1f}",
         f"{r.end_to_end_samples_per_second:.1f}", "-" if r.images_per_hour is None else f"{r.images_per_hour:.0f}",
         f"{r.peak_rss_mib:.0f}",
         "-" if r.gpu_peak_mib is None else f"{r.gpu_peak_mib:.0f}",
         "-" if r.gpu_utilization is None else f"{r.gpu_utilization:.0f}"]
        for r in rows
    ]
    return _with_steps(rows, header, body, "σ")


@dataclass(frozen=True)
class ServerRow:
    """One Triton server's part in the served entries, as the client counted it."""

    address: str
    entries: int
    """Entries it answered samples of."""
    samples: int
    share: float
    samples_per_second: float | None
    """Its samples over the wall time of the entries it took part in (``busy_seconds``)."""
    lost: bool
    """Whether the client found it gone during the run (its ranges went to the others)."""
    images_per_hour: float | None = None
    """The ``all`` row: served entries per hour end to end (over ``busy_seconds`` of all of them)."""


def server_rows(entries: Iterable[dict[str, Any]]) -> list[ServerRow]:
    """Per-server throughput over the served entries (``samples_by_server``), busiest first, plus an ``all`` row
    (every server's samples over the wall time of all served entries); empty for in-process runs."""
    served = [e for e in entries if e.get("samples_by_server") is not None]
    if not served:
        return []
    by_server: dict[str, list[tuple[dict[str, Any], int]]] = defaultdict(list)
    lost: set[str] = set()
    for entry in served:
        for address, samples in entry["samples_by_server"].items():
            by_server[address].append((entry, int(samples)))
        lost.update(entry.get("lost_servers") or {})
    total = sum(samples for parts in by_server.values() for _, samples in parts)

    def row(address: str, parts: list[tuple[dict[str, Any], int]], is_lost: bool = False) -> ServerRow:
        samples = sum(count for _, count in parts)
        seconds = busy_seconds(entry for entry, _ in parts)
        return ServerRow(address, len(parts), samples, samples / total if total else 0.0,
                         samples / seconds if seconds > 0 else None, is_lost)

    rows = sorted((row(a, parts, a in lost) for a, parts in by_server.items()), key=lambda r: (-r.samples, r.address))
    everything = row("all", [(e, sum(map(int, e["samples_by_server"].values()))) for e in served])
    return [*rows, replace(everything, images_per_hour=_per_hour(len(served), busy_seconds(served)))]


def server_table(rows: list[ServerRow]) -> tuple[list[str], list[list[str]]]:
    """Samples/s per server (what the client measured) and the served entries' end-to-end images/hour."""
    header = ["server", "entries", "samples", "share %", "samples/s", "images/hour", "lost"]
    body = [[r.address, str(r.entries), str(r.samples), f"{100 * r.share:.1f}",
             "-" if r.samples_per_second is None else f"{r.samples_per_second:.1f}",
             "-" if r.images_per_hour is None else f"{r.images_per_hour:.0f}", "yes" if r.lost else ""]
            for r in rows]
    return header, body


def stage_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Mean seconds per image in each stage (rows without stage timing are left out)."""
    header = ["variant", "scale", "method", "σ", *STAGES]
    rows = [r for r in rows if r.stages]
    body = [[r.variant, f"{r.scale:.2f}", r.method, f"{r.sigma:.2f}", *(f"{r.stages[s]:.4f}" for s in STAGES)]
            for r in rows]
    return _with_steps(rows, header, body, "σ")


def comparison_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["scale", "method", "σ", "images", "engine samples/s", "baseline samples/s", "sampling ×",
              "engine s/image", "baseline s/image", "end-to-end ×", "certify ×", "identical",
              "engine peak RSS MiB", "baseline peak RSS MiB"]
    body = [
        [f"{c.scale:.2f}", c.method, f"{c.sigma:.2f}", str(c.images), f"{c.engine_samples_per_second:.1f}",
         f"{c.baseline_samples_per_second:.1f}", f"{c.sampling_speedup:.2f}", f"{c.engine_seconds_per_image:.3f}",
         f"{c.baseline_seconds_per_image:.3f}", f"{c.end_to_end_speedup:.2f}", f"{c.certify_speedup:.0f}",
         "yes" if c.identical_certificates else "NO", f"{c.engine_peak_rss_mib:.0f}", f"{c.baseline_peak_rss_mib:.0f}"]
        for c in comparisons
    ]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RadiusCurve:
    """Certified accuracy as a function of radius for one (method, scale, σ), from the entries' radius maps.

    Pooled over images as the accuracy column is: correctly guessed pixels whose radius reaches r, over all
    non-ignored pixels.
    """

    method: str
    scale: float
    sigma: float
    images: int
    radii: np.ndarray
    """Every radius some pixel got, with ``counts`` the correctly guessed pixels that got it."""
    counts: np.ndarray
    valid_pixels: int
    denoise_steps: int = 1

    def accuracy_at(self, levels: Iterable[float]) -> np.ndarray:
        levels = np.asarray(list(levels), dtype=np.float64)
        reached = self.radii[None, :] >= levels[:, None] - 1e-9
        return (reached * self.counts[None, :]).sum(axis=1) / max(self.valid_pixels, 1)


def radius_curves(entries: Iterable[dict[str, Any]]) -> list[RadiusCurve]:
    """One curve per (method, scale, σ) over the engine entries that carry a radius map, in the paper's order."""
    groups: dict[tuple[str, float, float, int], list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        if entry["variant"] == "engine" and entry.get("radius_map"):
            groups[(entry["method"], float(entry["scale"]), float(entry["sigma"]), steps_of(entry))].append(entry)
    curves = []
    order = sorted(groups, key=lambda g: (g[1], _rank(METHOD_ORDER, g[0]), g[0], g[2], g[3]))
    for method, scale, sigma, steps in order:
        members = groups[(method, scale, sigma, steps)]
        radii, counts = [], []
        for entry in members:
            record = entry["radius_map"]
            for value, count in zip(record["radius_by_k"], record["correct_by_k"], strict=True):
                if value is not None and count:
                    radii.append(float(value))
                    counts.append(int(count))
        curves.append(RadiusCurve(method, scale, sigma, len(members), np.asarray(radii), np.asarray(counts),
                                  sum(int(e["radius_map"]["valid_pixels"]) for e in members), steps))
    return curves


def radius_table(curves: list[RadiusCurve], levels: tuple[float, ...]) -> tuple[list[str], list[list[str]]]:
    """Certified accuracy of the per-pixel radius maps at fixed radii (Cohen et al.'s table)."""
    header = ["scale", "method", "σ", *(f"acc @ R={level:g}" for level in levels), "images"]
    body = [[f"{c.scale:.2f}", c.method, f"{c.sigma:.2f}", *(f"{a:.3f}" for a in c.accuracy_at(levels)),
             str(c.images)] for c in curves]
    if len({c.denoise_steps for c in curves}) > 1:
        header = [*header[:3], "K", *header[3:]]
        body = [[*line[:3], str(c.denoise_steps), *line[3:]] for c, line in zip(curves, body, strict=True)]
    return header, body
