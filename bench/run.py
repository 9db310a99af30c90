"""Run the protocol: every image × method × σ × scale (× baseline), one results line each, resumable.

Images are the outer loop (each is read once, then certified under every setting), sessions are opened lazily
per setting (models are cached by the engine, so each loads once), and an entry already in ``results.jsonl`` is
never recomputed. The engine entry goes through ``certseg.engine.runtimes.session.Session.certify``, the call
``certseg certify`` makes, so its certificate equals ``certseg certify --seed <entry seed>`` on the same image.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certseg.bench.baseline import authors_certify
from certseg.bench.config import BenchConfig, Setting, image_seed, shared_settings
from certseg.bench.datasets import BenchDataset, DatasetItem, open_dataset
from certseg.bench.results import Key, ResultsFile, ResumeError, labels_digest
from certseg.bench.timing import StageTimer, gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from certseg.engine.choices import RuntimeName
from certseg.engine.core.certify import radius
from certseg.engine.core.metrics import CertifiedMetrics
from certseg.engine.core.pipeline import CertifiedSegmentation
from certseg.engine.core.radius import radius_table
from certseg.engine.errors import InputError
from certseg.engine.files.images import default_palette, write_label_png
from certseg.engine.maths.label_pipeline import LabelPipeline
from certseg.engine.runtimes.backends import LocalBackend
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.torch_runtime import resolve_device

SUPPORTED_RUNTIMES: tuple[RuntimeName, ...] = (RuntimeName.torch, RuntimeName.onnx)
"""Runtimes a local Session builds (onnx: graphs exported once from the same weights and cached); triton needs
servers, which the bench does not start or take yet."""


@dataclass
class BenchRun:
    config: BenchConfig
    dataset: BenchDataset
    items: tuple[DatasetItem, ...]
    results: ResultsFile
    device: torch.device
    run_id: str

    def wanted_keys(self) -> list[Key]:
        return [
            (item.id, s.method, s.sigma, s.scale, s.denoise_steps, variant)
            for item in self.items for s in self.config.grid() for variant in self.config.variants
        ]

    def finished_entries(self) -> list[dict[str, Any]]:
        """The entries of this run's selection (a results file may hold more, from wider earlier runs)."""
        return [self.results.entries[k] for k in self.wanted_keys() if k in self.results.entries]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def prepare(config: BenchConfig) -> BenchRun:
    """Open the dataset and the results file (checking it may be resumed), before any model is loaded."""
    if config.engine.runtime not in SUPPORTED_RUNTIMES:
        raise InputError(
            f"--runtime {config.engine.runtime}: the engine's Session does not build this runtime yet "
            f"(available: {', '.join(SUPPORTED_RUNTIMES)})"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = open_dataset(
        config.dataset, config.root, images=config.images, data_seed=config.data_seed,
        scene_size=config.scene_size, write_data=config.write_data, resize=config.resize,
        max_pixels=config.max_pixels,
    )
    items = dataset.take(config.images)
    device = resolve_device(config.engine.device)
    results = ResultsFile(config.results_path)
    header = {
        "kind": "run",
        "created": _now(),
        "compat": config.compat({"name": dataset.name, **dataset.description}, str(device)),
        "dataset": {"name": dataset.name, "classes": list(dataset.classes), "ignore_index": dataset.ignore_index,
                    **dataset.description},
        "seed_rule": "entry seed = SeedSequence([seed, image index]).generate_state(1, uint64)[0] >> 1",
    }
    results.open(header, defaults=shared_settings(Settings()))
    run_id = uuid.uuid4().hex
    results.append({"kind": "session", "run_id": run_id, "started": _now(), "config": config.record()})
    return BenchRun(config, dataset, items, results, device, run_id)


class _Sessions:
    """One engine Session per setting, opened on first use, checked against the dataset and earlier entries."""

    def __init__(self, run: BenchRun, timer: StageTimer | None) -> None:
        self.run = run
        self.timer = timer
        self.open: dict[Setting, Session] = {}
        self.pipelines: dict[tuple[Setting, tuple[int, int]], LabelPipeline] = {}

    def get(self, setting: Setting) -> Session:
        if setting in self.open:
            return self.open[setting]
        config = self.run.config
        session = Session.open(config.session_settings(setting), threads=config.threads or None)
        if self.timer is not None and session.settings.runtime == RuntimeName.torch:  # only torch entries split
            session.wrap_runtime = self.timer.wrap
        if session.num_classes != self.run.dataset.num_classes:
            raise InputError(
                f"the segmenter {session.segmenter.name} predicts {session.num_classes} classes, but "
                f"{self.run.dataset.name} has {self.run.dataset.num_classes}: pass a segmenter trained on it"
            )
        earlier = self.run.results.model_records(setting.method)
        now = _model_records(session)
        if earlier is not None and _hashes(earlier) != _hashes(now):
            raise ResumeError(
                f"{self.run.results.path} holds {setting.method} entries made with other model weights "
                f"({_hashes(earlier)} vs {_hashes(now)}); use another --out"
            )
        self.open[setting] = session
        return session

    def pipeline(self, setting: Setting, size: tuple[int, int]) -> LabelPipeline:
        """The session's models with the stage maths of its spec around them (for the baseline)."""
        if (setting, size) not in self.pipelines:
            session = self.get(setting)
            spec, _ = session.runtime_for(size)
            if not isinstance(session.backend, LocalBackend):
                raise InputError("--baseline runs the models in this process")
            pipeline = session.backend.label_pipeline(spec)
            if self.timer is not None:
                self.timer.instrument(pipeline)
            self.pipelines[(setting, size)] = pipeline
        return self.pipelines[(setting, size)]


def _model_records(session: Session) -> dict[str, Any]:
    return {"segmenter": session.segmenter.record(),
            "denoiser": None if session.denoiser is None else session.denoiser.record()}


def _hashes(models: dict[str, Any]) -> dict[str, str | None]:
    return {role: None if record is None else record["sha256"] for role, record in models.items()}


def _entry(
    run: BenchRun, item: DatasetItem, setting: Setting, variant: str, seed: int, labels: np.ndarray,
    target: np.ndarray, num_classes: int, timings: dict[str, float], session: Session, extra: dict[str, Any],
) -> dict[str, Any]:
    engine = run.config.engine
    metrics = CertifiedMetrics(num_classes, ignore_index=run.dataset.ignore_index)
    metrics.update(labels, target)
    sampling = timings["selection"] + timings["estimation"]
    samples = engine.n0 + engine.n
    return {
        "kind": "entry",
        "run_id": run.run_id,
        "finished_at": _now(),
        "image": item.id,
        "image_index": item.index,
        "image_path": None if item.path is None else str(item.path),
        "image_size": list(labels.shape),
        "method": setting.method,
        "sigma": setting.sigma,
        "scale": setting.scale,
        "denoise_steps": setting.denoise_steps,
        "variant": variant,
        "seed": seed,
        "n0": engine.n0,
        "n": engine.n,
        "alpha": engine.alpha,
        "tau": engine.tau,
        "fwer": engine.fwer.value,
        "num_classes": num_classes,
        "confusion": metrics.confusion,
        "abstain_fraction": metrics.abstain_fractions[0],
        "num_pixels": int(labels.size),
        "certified_pixels": int((labels != num_classes).sum()),
        "metrics": {"certified_accuracy": metrics.certified_accuracy, "mean_iou": metrics.mean_iou},
        "labels_sha256": labels_digest(labels),
        "timings": {**timings, "sampling": sampling},
        "samples_per_second": samples / sampling if sampling else None,
        "samples_per_second_end_to_end": samples / timings["total"] if timings["total"] else None,
        "peak_rss_mib": peak_rss_mib(),
        "gpu_peak_mib": gpu_peak_mib(run.device),
        "device": str(run.device),
        "batch": 1 if variant == "baseline" else engine.batch,
        "precision": "fp32" if variant == "baseline" else engine.precision.value,
        "models": _model_records(session),
        **extra,
    }


def _certify_engine(
    run: BenchRun, sessions: _Sessions, timer: StageTimer | None, item: DatasetItem, setting: Setting,
    image: np.ndarray, target: np.ndarray, seed: int, progress: Callable[[int], None],
) -> tuple[dict[str, Any], np.ndarray]:
    """One engine entry: exactly the ``Session.certify`` call ``certseg certify`` makes."""
    session = sessions.get(setting)
    timer = timer if session.settings.runtime == RuntimeName.torch else None  # only torch is instrumented
    if timer is not None:
        timer.reset()
    reset_gpu_peak(run.device)
    result, record = session.certify(image, seed=seed, progress=progress)
    took = record.timings
    timings = {"selection": took.selection, "estimation": took.estimation, "certify": took.certify,
               "total": took.total}
    timestep = record.pipeline.timestep
    extra: dict[str, Any] = {
        "batch": record.settings.batch,  # an auto batch as the session resolved it
        "radius": result.radius,
        "timestep": None if timestep is None else timestep.t,
        "pipeline": record.pipeline.record(),
        "min_agreements": result.certificate.min_agreements,
        "non_finite": dict(record.non_finite),
    }
    if run.config.radius_map:
        extra["radius_map"] = radius_record(result, target, run.config.engine.alpha, run.dataset.ignore_index)
    if timer is not None:
        timer.add("certify", timings["certify"])
        timings["stages"] = timer.snapshot()
        extra["gpu_utilization"] = float(np.mean(timer.gpu_utilization)) if timer.gpu_utilization else None
    entry = _entry(run, item, setting, "engine", seed, result.labels, target, result.num_classes, timings, session,
                   extra)
    return entry, result.labels


def radius_record(result: CertifiedSegmentation, target: np.ndarray, alpha: float, ignore_index: int) -> dict[str, Any]:
    """The entry's radius map, compactly and exactly: radii take one value per agreement count k, so the radius of
    each k and how many correctly guessed (non-ignored) pixels have each k give the whole accuracy-vs-radius curve."""
    agree = result.certificate.agree.astype(np.intp)
    valid = target != ignore_index
    correct = valid & (result.guess == target)
    radii = radius_table(result.n, result.sigma, alpha, int(agree.size))
    return {
        "radius_by_k": [None if np.isnan(r) else float(r) for r in radii],
        "correct_by_k": np.bincount(agree[correct], minlength=result.n + 1).tolist(),
        "valid_pixels": int(valid.sum()),
    }


def _certify_baseline(
    run: BenchRun, sessions: _Sessions, timer: StageTimer | None, item: DatasetItem, setting: Setting,
    image: np.ndarray, target: np.ndarray, seed: int, progress: Callable[[int], None],
) -> tuple[dict[str, Any], np.ndarray]:
    """One baseline entry: the authors-style certifier on the same pipeline, image and seed."""
    engine = run.config.engine
    session = sessions.get(setting)
    pipeline = sessions.pipeline(setting, tuple(image.shape[1:]))
    timer_used = timer or StageTimer(run.device)
    timer_used.reset()
    reset_gpu_peak(run.device)
    started = time.perf_counter()
    result = authors_certify(
        pipeline, image, num_classes=session.num_classes, sigma=setting.sigma, n0=engine.n0, n=engine.n,
        tau=engine.tau, alpha=engine.alpha, seed=seed, fwer=engine.fwer, noise_backend=engine.noise_backend,
        device=run.device, timer=timer_used, progress=progress,
    )
    timings = {**result.timings, "total": time.perf_counter() - started}
    spec = pipeline.spec
    extra: dict[str, Any] = {
        "radius": radius(setting.sigma, engine.tau),
        "timestep": None if spec.timestep is None else spec.timestep.t,
        "pipeline": spec.record(),
    }
    if timer is not None:
        timings["stages"] = timer.snapshot()
    entry = _entry(run, item, setting, "baseline", seed, result.labels, target, result.num_classes, timings, session,
                   extra)
    engine = run.results.entries.get(
        (item.id, setting.method, setting.sigma, setting.scale, setting.denoise_steps, "engine"))
    if engine is not None:
        entry["matches_engine"] = engine["labels_sha256"] == entry["labels_sha256"]
    return entry, result.labels


def _save_labels(run: BenchRun, session: Session, entry: dict[str, Any], labels: np.ndarray) -> None:
    folder = Path(run.config.out) / "labels"
    folder.mkdir(parents=True, exist_ok=True)
    steps = entry.get("denoise_steps", 1)
    name = (f"{entry['image']}__{entry['method']}_sigma{entry['sigma']:g}_scale{entry['scale']:g}"
            f"{'' if steps == 1 else f'_steps{steps}'}_{entry['variant']}.png")
    palette = session.segmenter.palette
    colours = (np.asarray(palette, dtype=np.uint8) if palette and len(palette) == entry["num_classes"]
               else default_palette(entry["num_classes"]))
    write_label_png(folder / name, labels, colours)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    )


def execute(run: BenchRun, *, console: Console | None = None, show_progress: bool = True) -> list[dict[str, Any]]:
    """Compute every missing entry (appending each as it finishes); returns this run's entries in key order."""
    config = run.config
    console = console or Console(stderr=True)
    done = set(run.results.entries)
    pending = [k for k in run.wanted_keys() if k not in done]
    timer = StageTimer(run.device) if config.stage_timing else None
    sessions = _Sessions(run, timer)
    by_item: dict[str, list[Key]] = {}
    for key in pending:
        by_item.setdefault(key[0], []).append(key)
    samples = config.engine.n0 + config.engine.n
    if run.dataset.description.get("warning"):
        console.print(f"[yellow]warning:[/] {run.dataset.description['warning']}")
    bar = _progress(console) if show_progress else None
    try:
        with bar if bar is not None else nullcontext():
            entries_task = bar.add_task("entries", total=len(pending)) if bar else None
            samples_task = bar.add_task("samples", total=samples) if bar else None
            for item in run.items:
                keys = by_item.get(item.id)
                if not keys:
                    continue
                image, target = item.load()
                seed = image_seed(config.seed, item.index)
                for _, method, sigma, scale, steps, variant in keys:
                    setting = Setting(method, scale, sigma, steps)
                    if bar is not None:
                        bar.reset(samples_task, total=samples,
                                  description=f"{item.id} {setting.label()} {variant}")

                    def advance(k: int) -> None:
                        if bar is not None:
                            bar.advance(samples_task, k)

                    certify = _certify_engine if variant == "engine" else _certify_baseline
                    entry, labels = certify(run, sessions, timer, item, setting, image, target, seed, advance)
                    run.results.append(entry)
                    if config.save_labels:
                        _save_labels(run, sessions.get(setting), entry, labels)
                    if bar is not None:
                        bar.advance(entries_task)
    finally:
        if timer is not None:
            timer.close()
    return run.finished_entries()
