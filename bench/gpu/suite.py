"""The suite's sections, in order of what matters most, each inside the time budget: environment, models, FLOPs,
eager fp16 / bf16 (DenoiseCertify fp16 first: the headline), compiled fp16, eager fp32, compiled bf16, the served
path. A configuration that would not fit in the time left, or a part that is missing, is one line under
``skipped``; the files are rewritten after every configuration."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from certseg.bench.gpu import report as files
from certseg.bench.gpu.flops import count_flops, device_peaks, matmul_tflops, peak_for
from certseg.bench.gpu.measure import compiled, measure
from certseg.bench.gpu.models import DRY_RUN, FULL, Profile, build_models, parameter_count, suite_image
from certseg.bench.machine import cpu_name

TARGET_SECONDS = 1.5
"""Issue 12: DenoiseCertify, fp16, full size, n0 = 10, n = 100 on an H100/H200 (the paper: 131 s per image)."""
COMPILE_GUESS_S = {"full": 150.0, "dry-run": 10.0}
"""Seconds a compile is assumed to take before one has been timed (a compile cannot be interrupted)."""


def installed(name: str) -> bool:
    """Whether a top-level package can be imported (without importing it; a broken one counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Suite:
    def __init__(self, profile: Profile, out: Path, device: torch.device, budget: Budget) -> None:
        self.profile, self.out, self.device, self.budget = profile, out, device, budget
        self.image = suite_image(profile)
        self.models: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self.report: dict[str, Any] = {
            "suite": "certseg.bench.gpu_suite", "version": 1, "dry_run": profile.name == DRY_RUN.name,
            "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "budget_s": budget.seconds, "environment": {}, "profile": profile.record(), "models": {}, "flops": {},
            "peak": None, "measured_matmul_tflops": {}, "runs": [], "served": None, "target": None,
            "skipped": [], "sections": {},
        }
        self.report["target"] = self.target(None)
        self.seconds_per_image: dict[tuple[str, str], float] = {}
        self.compile_guess_s = COMPILE_GUESS_S[profile.name]

    # ------------------------------------------------------------------------------------------------ helpers
    def save(self) -> None:
        files.write(self.out, self.report)

    def skip(self, line: str) -> None:
        self.report["skipped"].append(line)
        print(f"skipped: {line}", flush=True)
        self.save()

    def section(self, name: str, body: Callable[[], None]) -> None:
        started = time.perf_counter()
        status = "done"
        try:
            body()
        except Exception as error:  # one section's failure must not lose the others' results
            status = "failed"
            self.skip(f"{name}: failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self.report["sections"][name] = {"status": status, "seconds": time.perf_counter() - started}
        print(f"section {name}: {status} in {time.perf_counter() - started:.1f} s, {self.budget.left():.0f} s left",
              flush=True)
        self.save()

    # ------------------------------------------------------------------------------------------------ sections
    def environment(self) -> None:
        env = self.report["environment"]
        host = cpu_name()  # the device's name too until CUDA names it below
        env.update({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                    "device": str(self.device), "device_name": host, "host_cpu": host,
                    "torch_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cupy": installed("cupy"), "triton": installed("triton")})
        if self.device.type != "cuda":
            self.skip("cuda: no CUDA device; GPU memory, FLOP-limit fractions and matmul peaks are not measured")
            return
        properties = torch.cuda.get_device_properties(self.device)
        env.update({"device_name": properties.name, "gpu_memory_gib": properties.total_memory / 2**30,
                    "capability": f"{properties.major}.{properties.minor}"})
        self.report["peak"] = device_peaks(self.device)
        if self.report["peak"] is None:
            self.skip(f"peak: no datasheet peak for {properties.name}; FLOP-limit fractions are not reported")
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            self.report["measured_matmul_tflops"][name] = matmul_tflops(self.device, dtype)

    def build(self) -> None:
        started = time.perf_counter()
        denoiser, segmenter = build_models(self.profile, self.device)
        self.models = (denoiser, segmenter)
        self.report["models"] = {"denoiser_parameters": parameter_count(denoiser),
                                 "segmenter_parameters": parameter_count(segmenter),
                                 "build_s": time.perf_counter() - started}

    def flops(self) -> None:
        for method in self.profile.methods:
            self.report["flops"][method] = count_flops(self.profile, method)

    def low_precisions(self) -> list[str]:
        return [p for p in self.profile.precisions if p != "fp32"]

    def eager(self) -> None:
        """fp16 and bf16 (what ships fast), then the headline with cuDNN's autotuner (the engine leaves it off)."""
        for precision in self.low_precisions():
            for method in self.profile.methods:
                self.run(method, precision, "eager", self.models)
        if self.device.type == "cuda":
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                self.run("denoisecertify", self.profile.precisions[0], "eager-cudnn-benchmark", self.models)
            finally:
                torch.backends.cudnn.benchmark = before

    def eager_fp32(self) -> None:
        for method in self.profile.methods:
            self.run(method, "fp32", "eager", self.models)

    def compiled_first(self) -> None:
        self.compiled_runs(self.low_precisions()[:1])

    def compiled_rest(self) -> None:
        self.compiled_runs(self.low_precisions()[1:])

    def compiled_runs(self, precisions: list[str]) -> None:
        """Each mode in turn: a new (mode, precision) compiles on its first image, which is taken to last as long as
        the last compile did (or a guess)."""
        backend = self.profile.compile_backend
        for precision in precisions:
            for mode in self.profile.compile_modes:
                label = f"compiled-{mode}" if backend == "inductor" else f"compiled-{backend}-backend"
                models = tuple(compiled(module, backend, mode) for module in self.models)
                for index, method in enumerate(self.profile.methods):
                    record = self.run(method, precision, label, models,
                                      compile_s=self.compile_guess_s if index == 0 else 0.0)
                    if record is not None and index == 0:
                        self.compile_guess_s = max(record["warm_up_s"] - record["seconds_per_image"], 1.0)
                torch._dynamo.reset()  # frees this mode's graphs before the next compile

    def served(self) -> None:
        """The bundled tritonserver with torch on the GPU in its python backend: only where every part is here."""
        missing = [name for name in ("tritonclient", "pytriton") if not installed(name)]
        server = shutil.which("tritonserver")
        if server is None and "pytriton" in missing:
            self.report["served"] = {"status": "skipped: no tritonserver (neither nvidia-pytriton nor one on PATH)"}
        elif "tritonclient" in missing:
            self.report["served"] = {"status": "skipped: tritonclient is not installed"}
        else:
            self.report["served"] = {"status": "skipped: a tritonserver is here, but this suite version builds no "
                                               "torch-on-GPU python-backend repository yet"}
        self.skip(f"served: {self.report['served']['status'].removeprefix('skipped: ')}")

    # ------------------------------------------------------------------------------------------------ one run
    def estimate(self, method: str, precision: str) -> float:
        """Seconds per image expected from what ran already (fp32 taken as 4× fp16, unknown as 0)."""
        if (method, precision) in self.seconds_per_image:
            return self.seconds_per_image[(method, precision)]
        known = [s for (m, _), s in self.seconds_per_image.items() if m == method]
        return (4.0 if precision == "fp32" else 1.0) * min(known) if known else 0.0

    def run(
        self, method: str, precision: str, variant: str, models: Any, compile_s: float = 0.0,
    ) -> dict[str, Any] | None:
        """Measure one configuration if it fits in the time left; its record, or None (one skipped line)."""
        name = f"{method} {precision} {variant}"
        needed = compile_s + (self.profile.images + 2) * self.estimate(method, precision)
        if self.budget.left() < needed or self.budget.left() <= 0:
            self.skip(f"{name}: {self.budget.left():.0f} s left, about {needed:.0f} s needed")
            return None
        if self.device.type == "cpu" and precision == "fp16":
            self.skip(f"{name}: fp16 autocast is a GPU precision (CPU runs fp32 and bf16)")
            return None
        print(f"measuring {name} ...", flush=True)
        try:
            record = measure(self.profile, method, precision, variant, models, self.device, self.image)
        except Exception as error:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.skip(f"{name}: failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}")
            return None
        flops = self.report["flops"].get(method)
        peak, rate = peak_for(self.report["peak"], precision)
        limit = flops["per_image"] / (peak * 1e12) if flops and peak else None
        record.update({"flop_limit_s": limit, "peak_rate": rate,
                       "flop_limit_fraction": limit / record["seconds_per_image"] if limit else None})
        if variant == "eager":
            self.seconds_per_image[(method, precision)] = record["seconds_per_image"]
        self.report["runs"].append(record)
        print(f"  {record['seconds_per_image']:.3f} s/image, {record['samples_per_s']:.1f} samples/s, "
              f"certificate {record['certificate_sha256'][:12]}", flush=True)
        self.update_target()
        self.save()
        return record

    def target(self, best: dict[str, Any] | None) -> dict[str, Any]:
        """Issue 12's goal and the best DenoiseCertify fp16 run so far (met: only said of the full size on a GPU
        whose peak is known)."""
        full_size_gpu = self.profile.name == FULL.name and self.report.get("peak") is not None
        return {
            "config": "DenoiseCertify fp16, ADM-256 + HRNetV2-W48, 1024×2048, n0 = 10, n = 100",
            "seconds_per_image_goal": TARGET_SECONDS,
            "best_seconds_per_image": best["seconds_per_image"] if best else None,
            "best_variant": best["variant"] if best else None,
            "met": best["seconds_per_image"] <= TARGET_SECONDS if best and full_size_gpu else None,
        }

    def update_target(self) -> None:
        runs = [r for r in self.report["runs"] if r["method"] == "denoisecertify" and r["precision"] == "fp16"]
        if runs:
            self.report["target"] = self.target(min(runs, key=lambda r: r["seconds_per_image"]))

    def run_all(self) -> dict[str, Any]:
        self.save()
        for name, body in (("environment", self.environment), ("models", self.build), ("flops", self.flops),
                           ("eager", self.eager), ("compiled", self.compiled_first), ("eager-fp32", self.eager_fp32),
                           ("compiled-more", self.compiled_rest), ("served", self.served)):
            if self.models is None and name.startswith(("eager", "compiled")):
                self.skip(f"{name}: no models were built")
                continue
            self.section(name, body)
        return self.report


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m certseg.bench.gpu_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny models, small image, CPU (the test suite's run)")
    parser.add_argument("--budget-s", type=float, default=None, help="time box (default 420 s; dry run 50 s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    parser.add_argument("--images", type=int, default=None, help="timed images per configuration")
    parser.add_argument("--compile-modes", default=None,
                        help="comma-separated torch.compile modes (default,reduce-overhead,...); 'none' to skip")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    profile = DRY_RUN if args.dry_run else FULL
    if args.images is not None:
        if args.images < 1:
            print("error: --images must be >= 1", file=sys.stderr)
            return 2
        profile = _replace(profile, images=args.images)
    if args.compile_modes is not None:
        modes = () if args.compile_modes == "none" else tuple(m for m in args.compile_modes.split(",") if m)
        profile = _replace(profile, compile_modes=modes)
    default_device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    device = torch.device(args.device or default_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: device {device} asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.dry_run:
        print("error: the full-size suite needs a CUDA device; on a CPU run --dry-run", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.dry_run and device.type == "cpu":
        # One thread: on a loaded CPU, OpenMP's spin-waiting made the tiny models 10-20x slower. (bf16 results on
        # the CPU depend on the thread count; the record says which.)
        torch.set_num_threads(1)
    budget = Budget(args.budget_s if args.budget_s is not None else (50.0 if args.dry_run else 420.0))
    try:
        report = Suite(profile, args.out, device, budget).run_all()
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} ({len(report['runs'])} runs, "
          f"{len(report['skipped'])} skipped lines)", flush=True)
    return 0


def _replace(profile: Profile, **changes: Any) -> Profile:
    import dataclasses

    return dataclasses.replace(profile, **changes)
