"""The suite's two files, rewritten after every measured configuration so a run cut short keeps what it measured:
``gpu.json`` (everything) and ``gpu.md`` (the table a person reads)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from certseg.bench.timing import STAGES


def plain(value: Any) -> Any:
    """Strict JSON: tuples to lists, numpy scalars to numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write(out: Path, report: dict[str, Any]) -> None:
    """Write gpu.json and gpu.md atomically (temp file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(plain(report), indent=2, allow_nan=False) + "\n"),
                       ("gpu.md", markdown(report))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env, profile = report.get("environment", {}), report.get("profile", {})
    lines = [f"# certseg GPU suite: {profile.get('name', '?')} profile", "",
             f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '–')}, "
             f"Python {env.get('python', '?')}; {report.get('started_utc', '')}", ""]
    if profile:
        lines += [f"Image {profile['image_size'][0]}×{profile['image_size'][1]}, n0 = {profile['n0']}, "
                  f"n = {profile['n']}, batch {profile['batch']}, σ = {profile['sigma']}; denoiser: "
                  f"{profile.get('denoiser', '?')}; segmenter: {profile.get('segmenter', '?')}.", ""]
    for method, flops in report.get("flops", {}).items():
        lines.append(f"- {method}: {flops['per_sample'] / 1e12:.3g} TFLOP per sample "
                     f"(denoiser {flops['denoiser_per_sample'] / 1e12:.3g}, segmenter "
                     f"{flops['segmenter_per_sample'] / 1e12:.3g}), {flops['per_image'] / 1e12:.3g} per image")
    peaks = report.get("peak")
    if peaks:
        lines.append(f"- FLOP limit against {peaks['device']}'s peak ({peaks['source']}): "
                     + ", ".join(f"{k} {v} TFLOP/s" for k, v in peaks["tflops"].items()))
    for dtype, tflops in report.get("measured_matmul_tflops", {}).items():
        lines.append(f"- measured {dtype} matmul 8192³: {tflops:.0f} TFLOP/s")
    target = report.get("target")
    if target:
        lines.append(f"- target: {target['config']} ≤ {target['seconds_per_image_goal']} s per image: "
                     f"best {_number(target.get('best_seconds_per_image'))} s ({target.get('best_variant') or '–'}), "
                     f"met: {_number(target.get('met'))}")
    header = ["method", "precision", "variant", "s / image", "samples / s", "FLOP limit reached", "peak GPU MiB",
              *STAGES, "certificate"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in report.get("runs", []):
        stages = run.get("stages", {})
        fraction = run.get("flop_limit_fraction")
        reached = "–" if fraction is None else f"{100 * fraction:.1f} % of {run['peak_rate']}"
        cells = [run["method"], run["precision"], run["variant"], _number(run["seconds_per_image"]),
                 _number(run["samples_per_s"]), reached,
                 _number(run.get("peak_gpu_mib"), 5), *(_number(stages.get(stage)) for stage in STAGES),
                 run["certificate_sha256"][:12] + ("" if run["certificates_identical"] else " (differ!)")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Stages: seconds of one image, synchronised at every boundary (slower than the throughput runs)."]
    served = report.get("served")
    if served:
        lines += ["", f"Served: {served.get('status', '?')}"]
    if report.get("skipped"):
        lines += ["", "Skipped:", *(f"- {line}" for line in report["skipped"])]
    sections = report.get("sections", {})
    if sections:
        lines += ["", "Sections: " + ", ".join(f"{name} {info['status']} ({info['seconds']:.0f} s)"
                                               for name, info in sections.items())]
    return "\n".join(lines) + "\n"
