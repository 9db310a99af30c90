"""Which CPU a benchmark ran on, and the two unit costs that set the engine-to-baseline ratio on it.

Why: that ratio moves with the machine far more than from run to run. The same code and command measured 3.67-3.95x
at 1024x2048 on an AVX-512 core and 5.49x on an AVX2 core, where the baseline's per-pixel p-value loop (pure Python
around scipy) was 3.4x slower and the convolutions only ~1.5x. The engine's time is its models' convolutions, the
baseline's is those convolutions plus that loop, so a ratio means little without the CPU's name and both costs
measured in the same process: the time of one p-value as the baseline computes it, and a 3x3 convolution's rate.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The first processor's model name, with its family and model numbers (a virtual machine may show only
    "AMD EPYC", which the numbers tell apart: family 25 model 1 is Zen 3, model 17 Zen 4); elsewhere
    ``platform.processor()`` or the architecture."""
    if cpuinfo is None:
        cpuinfo = CPUINFO.read_text(errors="replace") if CPUINFO.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if key in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def conv_flops(batch: int, channels: int, height: int, width: int) -> int:
    """Multiply-adds, counted twice, of a stride-1, same-padded 3x3 ``channels`` -> ``channels`` convolution."""
    return 2 * batch * channels * height * width * channels * 9


def _steady_seconds(call: Callable[[], object], seconds: float, least: int = 5) -> float:
    """The median time of ``call`` repeated for ``seconds`` (at least ``least`` times) after one warm-up call. Not
    the best: on the development machine the first ~50 ms of Python-bound work ran up to 1.6x faster than what a
    long loop settles at (per-pixel p-values: 122 us, then 175-210 us), and the runs this calibrates last minutes."""
    call()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < least or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def conv_gflops(channels: int = 32, height: int = 128, width: int = 256, seconds: float = 0.5) -> float:
    """GFLOP/s of one fp32 3x3 convolution in channels-last layout (the shipped HRNet's widest kind of work), on
    the threads torch runs with now (``_steady_seconds``)."""
    import torch
    import torch.nn.functional as F

    x = torch.rand(1, channels, height, width).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        taken = _steady_seconds(lambda: F.conv2d(x, weight, padding=1), seconds)
    return conv_flops(1, channels, height, width) / taken / 1e9


def pvalue_microseconds(pixels: int = 100, n: int = 100, tau: float = 0.75, seconds: float = 1.0) -> float:
    """Microseconds per pixel of the authors-style baseline's p-value loop (``baseline.per_pixel_pvalues``), in
    calls of ``pixels`` counts spread over n/2..n, where an image's mostly lie (a count of 0 costs scipy less than
    half as much); ``_steady_seconds``."""
    import numpy as np

    from certseg.bench.baseline import per_pixel_pvalues

    agree = n // 2 + np.arange(pixels) % (n - n // 2 + 1)
    return _steady_seconds(lambda: per_pixel_pvalues(agree, n, tau), seconds) / pixels * 1e6


def describe_machine(calibrate: bool = False) -> dict[str, Any]:
    """JSON-ready: the CPU's name, the vector instructions torch's kernels use, the cores this process may run on;
    ``calibrate``: also ``conv_gflops`` and ``pvalue_microseconds``, measured now (about 1.5 s)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record: dict[str, Any] = {"cpu": cpu_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "cores": cores}
    if calibrate:
        record["conv3x3_gflops"] = round(conv_gflops(), 1)
        record["baseline_pvalue_us"] = round(pvalue_microseconds(), 1)
        record["calibration_threads"] = torch.get_num_threads()
    return record


def machine_line(record: dict[str, Any]) -> str:
    """One line for a console: the CPU, and the calibration where measured."""
    line = f"{record['cpu']}, {record['torch_cpu_capability']}, {record['cores']} cores"
    if "conv3x3_gflops" in record:
        line += (f"; 3x3 convolution {record['conv3x3_gflops']} GFLOP/s on {record['calibration_threads']} "
                 f"thread(s), the baseline's p-value {record['baseline_pvalue_us']} us per pixel")
    return line
