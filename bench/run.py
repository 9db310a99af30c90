"""Run the protocol: every image × method × σ × scale (× baseline), one results line each, resumable.

Images are the outer loop (each is read once, then certified under every setting), sessions are opened lazily
per setting (models are cached by the engine, so each loads once), and an entry already in ``results.jsonl`` is
never recomputed. The engine entry goes through ``certseg.engine.runtimes.session.Session.certify``, the call
``certseg certify`` makes, so its certificate equals ``certseg certify --seed <entry seed>`` on the same image.

``--runtime triton``: the same per image, on the given servers or a bundled one started for the run
(``certseg.bench.servers``), with ``images_in_flight`` images at once (``certseg.bench.pool``) sharing one
connection per setting; the Triton client spreads each image's sample ranges over the servers and moves a lost
server's ranges to the others.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from certseg.bench import servers as served
from certseg.bench.baseline import authors_certify
from certseg.bench.config import BenchConfig, Setting, compat_defaults, image_seed
from certseg.bench.datasets import BenchDataset, DatasetItem, open_dataset
from certseg.bench.datasets.loader import detect
from certseg.bench.machine import describe_machine
from certseg.bench.pool import run_bounded
from certseg.bench.protocols import ProtocolPreset, resolve_protocol
from certseg.bench.results import Key, ResultsFile, ResumeError, labels_digest
from certseg.bench.timing import StageTimer, gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from certseg.engine.choices import Dataset, RuntimeName
from certseg.engine.core.certify import radius
from certseg.engine.core.metrics import CertifiedMetrics
from certseg.engine.core.pipeline import CertifiedSegmentation
from certseg.engine.core.radius import radius_table
from certseg.engine.errors import InputError, ServerError
from certseg.engine.files.images import default_palette, write_label_png
from certseg.engine.maths.label_pipeline import LabelPipeline
from certseg.engine.runtimes.backends import LocalBackend, TritonBackend
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.torch_runtime import resolve_device

SUPPORTED_RUNTIMES: tuple[RuntimeName, ...] = (RuntimeName.torch, RuntimeName.onnx, RuntimeName.triton)
"""torch and onnx run in this process (onnx: graphs exported once from the same weights and cached); triton on
``--server``s, or on the bundled tritonserver started for the run."""


@dataclass
class BenchRun:
    config: BenchConfig
    dataset: BenchDataset
    items: tuple[DatasetItem, ...]
    results: ResultsFile
    device: torch.device
    run_id: str
    protocol: ProtocolPreset

    def engine_settings(self, setting: Setting) -> Settings:
        """The engine settings of one grid cell under the run's protocol (what its Session is made with)."""
        return self.protocol.engine_settings(self.config.session_settings(setting))

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
    if config.baseline and config.engine.runtime == RuntimeName.triton:
        raise InputError("--baseline runs the models in this process; it does not go with --runtime triton "
                         "(run it with --runtime onnx on the same model files)")
    if config.threads:
        torch.set_num_threads(config.threads)
    kind = config.dataset or (Dataset.procedural if config.root is None else detect(config.root))
    protocol = resolve_protocol(config.protocol, kind, config.resize)
    dataset = open_dataset(
        kind, config.root, images=config.images, data_seed=config.data_seed,
        scene_size=config.scene_size, write_data=config.write_data, resize=protocol.squash,
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
        "protocol": protocol.describe(),
    }
    results.open(header, defaults=compat_defaults())
    run_id = uuid.uuid4().hex
    results.append({"kind": "session", "run_id": run_id, "started": _now(), "config": config.record(),
                    "machine": describe_machine()})
    return BenchRun(config, dataset, items, results, device, run_id, protocol)


class _Sessions:
    """One engine Session per setting, opened on first use (in-process) or over the setting's server connection
    (``backends``), checked against the dataset and earlier entries."""

    def __init__(self, run: BenchRun, timer: StageTimer | None,
                 backends: dict[Setting, TritonBackend] | None = None) -> None:
        self.run = run
        self.timer = timer
        self.backends = backends
        self.open: dict[Setting, Session] = {}
        self.plain: dict[Setting, Session] = {}
        self.pipelines: dict[tuple[Setting, tuple[int, int]], LabelPipeline] = {}

    def get(self, setting: Setting) -> Session:
        if setting in self.open:
            return self.open[setting]
        if self.backends is not None:  # checked once, when connected
            self.open[setting] = Session(self.backends[setting])
            return self.open[setting]
        config = self.run.config
        session = Session.open(self.run.engine_settings(setting), threads=config.threads or None)
        if self.timer is not None and session.settings.runtime == RuntimeName.torch:  # only torch entries split
            session.wrap_runtime = self.timer.wrap
        _check_session(self.run, setting, session)
        self.open[setting] = session
        return session

    def baseline(self, setting: Setting) -> Session:
        """The baseline's session: the engine's models as published, BatchNorm unfolded and HRNet's head in the
        official order, as the authors' code runs them (the engine's own session where it rewrites neither)."""
        settings = self.run.engine_settings(setting)
        plain = replace(settings, fold_batchnorm=False, factor_head=False)
        if self.backends is not None or plain == settings:
            return self.get(setting)
        if setting not in self.plain:
            session = Session.open(plain, threads=self.run.config.threads or None)
            _check_session(self.run, setting, session)
            self.plain[setting] = session
        return self.plain[setting]

    def pipeline(self, setting: Setting, size: tuple[int, int]) -> LabelPipeline:
        """The baseline session's models with the stage maths of its spec around them."""
        if (setting, size) not in self.pipelines:
            session = self.baseline(setting)
            spec, _ = session.runtime_for(size)
            if not isinstance(session.backend, LocalBackend):
                raise InputError("--baseline runs the models in this process")
            pipeline = session.backend.label_pipeline(spec)
            if self.timer is not None:
                self.timer.instrument(pipeline)
            self.pipelines[(setting, size)] = pipeline
        return self.pipelines[(setting, size)]


def _check_session(run: BenchRun, setting: Setting, session: Session) -> None:
    """The segmenter fits the dataset, and the models (and, served, the servers' pipeline) are those of the
    earlier entries of this method."""
    if session.num_classes != run.dataset.num_classes:
        raise InputError(
            f"the segmenter {session.segmenter.name} predicts {session.num_classes} classes, but "
            f"{run.dataset.name} has {run.dataset.num_classes}: pass a segmenter trained on it"
        )
    earlier = run.results.model_records(setting.method)
    now = _model_records(session)
    if earlier is not None and _hashes(earlier) != _hashes(now):
        raise ResumeError(
            f"{run.results.path} holds {setting.method} entries made with other model weights "
            f"({_hashes(earlier)} vs {_hashes(now)}); use another --out"
        )
    if isinstance(session.backend, TritonBackend):
        served.check_sample_fields(run.results.recorded(setting.method, "served"), session.backend,
                                   run.results.path, setting.method)


@contextmanager
def _connections(run: BenchRun, settings: list[Setting]) -> Iterator[dict[Setting, TritonBackend] | None]:
    """For a Triton run: the servers (a bundled one started and, at the end, stopped) and one checked connection
    per setting; None in-process."""
    config = run.config
    if config.engine.runtime != RuntimeName.triton or not settings:  # nothing to certify: no server either
        yield None
        return
    with served.bench_servers(config) as pool:
        if pool.started is not None:
            run.results.append({"kind": "server", "run_id": run.run_id, "started": _now(), **pool.started})
        backends: dict[Setting, TritonBackend] = {}
        try:
            for setting in settings:
                backends[setting] = served.connect(config, run.engine_settings(setting), pool)
                _check_session(run, setting, Session(backends[setting]))
            yield backends
        finally:
            for backend in backends.values():
                backend.close()


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
        "precision": "fp32" if variant == "baseline" else str(session.settings.precision),
        "runtime": str(session.settings.runtime),
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
    remote = served.served_runtime(session, (int(image.shape[-2]), int(image.shape[-1])))
    before = {} if remote is None else dict(remote.samples_served)
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
        **({} if remote is None else served.served_record(remote, session, before)),
    }
    if record.quantization is not None:  # int8: the recipe and calibration set, as certify's JSON has them
        extra["quantization"] = dict(record.quantization)
    if run.config.radius_map:
        extra["radius_map"] = radius_record(result, target, run.config.engine.alpha, run.dataset.ignore_index)
    if timer is not None:
        timer.add("certify", timings["certify"])
        timings["stages"] = timer.snapshot()
        timings["stages_overlapped"] = timer.overlapped
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
    session = sessions.baseline(setting)
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


class _Bars:
    """The progress bars (or none): entries done, and samples, either of the entry under way (one image at a
    time) or of every pending entry together (several images in flight)."""

    def __init__(self, console: Console, show: bool, entries: int, samples: int, per_entry: bool) -> None:
        self.progress = _progress(console) if show else None
        self.samples = samples
        self.per_entry = per_entry
        if self.progress is not None:
            self.entries_task = self.progress.add_task("entries", total=entries)
            self.samples_task = self.progress.add_task("samples", total=samples * (1 if per_entry else entries))

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def entry_started(self, description: str) -> None:
        if self.progress is not None and self.per_entry:
            self.progress.reset(self.samples_task, total=self.samples, description=description)

    def advance(self, samples: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.samples_task, samples)

    def entry_done(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.entries_task)


def _certify_item(run: BenchRun, sessions: _Sessions, timer: StageTimer | None, bars: _Bars, item: DatasetItem,
                  keys: list[Key], stop: threading.Event) -> None:
    """Every pending entry of one image, appended to the results as each finishes (none more once ``stop``)."""
    image, target = item.load()
    run.protocol.check_image(item.id, image.shape[1:])
    seed = image_seed(run.config.seed, item.index)
    for _, method, sigma, scale, steps, variant in keys:
        if stop.is_set():
            return
        setting = Setting(method, scale, sigma, steps)
        bars.entry_started(f"{item.id} {setting.label()} {variant}")
        started = _now()
        certify = _certify_engine if variant == "engine" else _certify_baseline
        entry, labels = certify(run, sessions, timer, item, setting, image, target, seed, bars.advance)
        entry["started_at"] = started
        run.results.append(entry)
        if run.config.save_labels:
            _save_labels(run, sessions.get(setting) if variant == "engine" else sessions.baseline(setting), entry,
                         labels)
        bars.entry_done()


def execute(run: BenchRun, *, console: Console | None = None, show_progress: bool = True) -> list[dict[str, Any]]:
    """Compute every missing entry (appending each as it finishes); returns this run's entries in key order.

    In-process, one image at a time; on Triton servers, ``images_in_flight`` at once. A server error ends the run
    in one line that says the finished entries are kept (a rerun resumes)."""
    config = run.config
    console = console or Console(stderr=True)
    done = set(run.results.entries)
    pending = [k for k in run.wanted_keys() if k not in done]
    triton = config.engine.runtime == RuntimeName.triton
    timer = StageTimer(run.device) if config.stage_timing and not triton else None
    by_item: dict[str, list[Key]] = {}
    for key in pending:
        by_item.setdefault(key[0], []).append(key)
    work = [(item, by_item[item.id]) for item in run.items if item.id in by_item]
    settings = list(dict.fromkeys(Setting(method, scale, sigma, steps)
                                  for _, method, sigma, scale, steps, _ in pending))
    if run.dataset.description.get("warning"):
        console.print(f"[yellow]warning:[/] {run.dataset.description['warning']}")
    width = min(config.images_in_flight, len(work)) if triton else 1
    bars = _Bars(console, show_progress, len(pending), config.engine.n0 + config.engine.n, per_entry=width == 1)
    try:
        with _connections(run, settings) as backends, bars:
            workspaces = [_Sessions(run, timer, backends) for _ in range(max(width, 1))]
            run_bounded(work, workspaces,
                        lambda sessions, job, stop: _certify_item(run, sessions, timer, bars, *job, stop))
    except ServerError as error:
        raise ServerError(f"{error} (the finished entries stay in {run.results.path}: rerun to resume)") from None
    finally:
        if timer is not None:
            timer.close()
    return run.finished_entries()
