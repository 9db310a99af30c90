"""The machine record benchmarks write: the CPU read from /proc/cpuinfo and two calibrations of its unit costs."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from certseg.bench import machine
from certseg.bench.baseline import per_pixel_pvalues

TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: another name
"""


def test_cpu_name_is_the_first_processors_name_with_its_family_and_model() -> None:
    assert machine.cpu_name(TWO_PROCESSORS) == "AMD EPYC (family 25, model 1)"
    assert machine.cpu_name("model name\t: Some CPU\n") == "Some CPU"


def test_cpu_name_without_a_model_name_falls_back_to_the_platform() -> None:
    assert machine.cpu_name("processor\t: 0\n") == (platform.processor() or platform.machine())
    assert machine.cpu_name("") == (platform.processor() or platform.machine())


@pytest.mark.parametrize(("channels", "height", "width"), [(32, 128, 256), (3, 5, 7)])
def test_conv_flops_counts_what_torchs_flop_counter_counts(channels: int, height: int, width: int) -> None:
    x, weight = torch.rand(2, channels, height, width), torch.rand(channels, channels, 3, 3)
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, weight, padding=1)
    assert machine.conv_flops(2, channels, height, width) == counter.get_total_flops()


def test_pvalue_microseconds_times_the_baselines_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration runs ``per_pixel_pvalues`` on counts in n/2..n: what it timed is that loop."""
    seen: list[np.ndarray] = []

    def spy(agree: np.ndarray, n: int, tau: float) -> np.ndarray:
        seen.append(agree)
        return per_pixel_pvalues(agree, n, tau)

    monkeypatch.setattr("certseg.bench.baseline.per_pixel_pvalues", spy)
    assert machine.pvalue_microseconds(pixels=60, n=10, seconds=0.0) > 0
    assert len(seen) == 6  # one warm-up, then at least five timed
    assert all(a.size == 60 and a.min() == 5 and a.max() == 10 for a in seen)


def test_describe_machine_records_the_cpu_and_calibrates_only_when_asked() -> None:
    plain = machine.describe_machine()
    assert plain["cpu"] == machine.cpu_name()
    assert plain["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert plain["cores"] >= 1 and "conv3x3_gflops" not in plain
    calibrated = machine.describe_machine(calibrate=True)
    assert calibrated["conv3x3_gflops"] > 0 and calibrated["baseline_pvalue_us"] > 0
    assert calibrated["calibration_threads"] == torch.get_num_threads()
    line = machine.machine_line(calibrated)
    assert line.startswith(plain["cpu"]) and "GFLOP/s" in line and "us per pixel" in line
