"""The memory estimate: tracked tensor bytes, the per-op fit, the check before sampling, and reality (peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certseg.engine.commands.certify_command import CertifyRequest, run_certify
from certseg.engine.errors import InputError
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.models.registry import shipped_models
from certseg.engine.runtimes import memory
from certseg.engine.runtimes import session as session_module
from certseg.engine.runtimes.process import allocators_environment
from certseg.engine.runtimes.session import Session, Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-hrnet-noise025", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)


def test_live_tensor_bytes_follow_allocations_views_and_frees() -> None:
    with memory.LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        view = b.view(10, 100)  # same storage: no new bytes
        del a  # 4000 live
        c = torch.zeros(250, dtype=torch.float64)  # 2000 more: 6000
        del b  # the view still holds b's storage
        d = view + 0  # 10000
        del view, d, c
        e = torch.ones(10)  # noqa: F841 - 40 bytes, still live at the end
    assert tracker.timeline[:4] == [4000, 8000, 8000, 6000]
    assert tracker.peak == 10000 and tracker.current == 40


def test_probe_keeps_a_line_per_op_so_the_peak_moves_between_stages() -> None:
    """A fixed-size stage (a denoiser at its own size) and a per-pixel stage: the peak is the larger of the two
    at every size, which a straight line through the two probe peaks would get wrong at large sizes."""
    fixed, per_pixel = 600_000, 3.0

    def make_run(size: tuple[int, int]):
        pixels = size[0] * size[1]

        def run() -> None:
            stage = torch.empty(int(fixed) * memory.PROBE_BATCH, dtype=torch.uint8)
            del stage
            stage = torch.empty(int(per_pixel * pixels) * memory.PROBE_BATCH, dtype=torch.uint8)
            del stage

        return run

    probed = memory.probe_pipeline_memory(make_run, scale=1.0)
    for pixels in (100, 128 * 128, 256 * 256, 12000 * 12000):
        assert probed.per_sample(pixels) == pytest.approx(max(fixed, per_pixel * pixels))
    assert probed.probe["fit"] == "one line per op"


def test_probe_results_are_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    first = memory.cached_pipeline_memory(["models", 1.0], lambda: memory.PipelineMemory(((1.0, 2.0),), {"a": 1}))

    def must_not_run() -> memory.PipelineMemory:
        raise AssertionError("probed again")

    again = memory.cached_pipeline_memory(["models", 1.0], must_not_run)
    assert again == first and len(list((tmp_path / "memory").glob("*.json"))) == 1


def fake_available(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(memory, "host_available_bytes", lambda: available)


def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampling started")

    monkeypatch.setattr(session_module, "certify_image", refuse)


@needs_shipped
def test_an_image_that_cannot_fit_is_refused_before_sampling_naming_a_batch_that_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = Session.open(Settings(method="segcertify", batch=16))
    estimate = session.memory_estimate((128, 256))
    assert estimate is not None
    available = (estimate.needs(batch=3)["host"] + estimate.needs(batch=4)["host"]) // 2  # 3 fits, 4 does not
    fake_available(monkeypatch, available)
    no_sampling(monkeypatch)
    request = CertifyRequest(image=EXAMPLE, settings=Settings(method="segcertify", batch=16), out=tmp_path / "out",
                             progress=False)
    with pytest.raises(InputError) as error:
        run_certify(request)
    message = str(error.value)
    assert "\n" not in message and "128x256" in message and "--batch 16" in message
    assert memory.format_bytes(available) in message and "--batch 3 fits" in message
    assert not (tmp_path / "out").exists()


@needs_shipped
@pytest.mark.parametrize("method", ["segcertify", "denoisecertify"])
def test_a_12000_pixel_side_is_refused_in_seconds_with_one_line(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raising --max-pixels does not turn a 12000x12000 image into a MemoryError after minutes: the estimate
    refuses it before sampling (the image is a broadcast view: it takes no memory here)."""
    fake_available(monkeypatch, 24 * 10**9)
    no_sampling(monkeypatch)
    image = np.broadcast_to(np.float32(0.5), (3, 12000, 12000))
    with pytest.raises(InputError) as error:
        Session.open(Settings(method=method)).certify(image, seed=0)
    message = str(error.value)
    assert "12000x12000" in message and "even --batch 1 needs" in message and "pixels fit" in message


@needs_shipped
@pytest.mark.parametrize("method", ["segcertify", "denoisecertify"])
def test_the_default_pixel_limit_fits_batch_16_in_24_gb(method: str) -> None:
    """On CPU the model calls hold one 2048x2048 sample each; the other 15 hold their noise buffers meanwhile."""
    estimate = Session.open(Settings(method=method, batch=16, device="cpu")).memory_estimate((2048, 2048))
    assert estimate is not None and estimate.num_pixels == DEFAULT_MAX_PIXELS and estimate.batch == 16
    one_call = estimate.needs(batch=1)["host"]
    buffers = memory.MARGIN * 15 * (memory.BATCH_BUFFER_BYTES_PER_PIXEL + memory.NUMPY_NOISE_BYTES_PER_PIXEL) \
        * estimate.num_pixels
    assert estimate.needs()["host"] == pytest.approx(one_call + buffers, rel=0.01)
    assert estimate.needs()["host"] <= 24 * 10**9


def auto_budget(estimate: memory.MemoryEstimate, batch: int) -> int:
    """Host memory available with which an auto batch is ``batch``: its estimate fits the auto fraction of it, the
    next batch's does not."""
    fits, next_one = (estimate.needs(batch=b)["host"] / memory.AUTO_MEMORY_FRACTION for b in (batch, batch + 1))
    return int((fits + next_one) / 2)


@needs_shipped
def test_an_auto_batch_shrinks_with_the_memory_and_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With memory for 2 samples in the auto fraction, ``certseg certify`` with --batch auto certifies at batch 2 and
    records it (JSON ``settings.batch`` and ``memory.batch``)."""
    estimate = Session.open(Settings(method="segcertify", batch=16)).memory_estimate((128, 256))
    assert estimate is not None
    fake_available(monkeypatch, auto_budget(estimate, 2))
    summary = run_certify(CertifyRequest(image=EXAMPLE, settings=Settings(method="segcertify", n0=4, n=70),
                                         out=tmp_path / "out", seed=3, progress=False))
    report = json.loads((tmp_path / "out" / "street.json").read_text())
    assert "certified" in summary and report["settings"]["batch"] == 2 and report["memory"]["batch"] == 2


@needs_shipped
def test_a_huge_image_gets_a_batch_that_fits_instead_of_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3000x3000 image with memory for about two samples: auto picks 2 and passes the check (sampling is where
    this test stops it); at the memory where not even 1 fits in full, the refusal names the size that fits."""
    size = (3000, 3000)
    image = np.broadcast_to(np.float32(0.5), (3, *size))  # a view: no memory here
    estimate = Session.open(Settings(method="segcertify", batch=16)).memory_estimate(size)
    assert estimate is not None
    fake_available(monkeypatch, auto_budget(estimate, 2))
    monkeypatch.setattr(memory, "CPU_BATCH_PIXELS", 1 << 40)  # let the memory decide, as on a GPU
    no_sampling(monkeypatch)
    session = Session.open(Settings(method="segcertify"))
    assert session.batch_for(size) == 2
    with pytest.raises(AssertionError, match="sampling started"):
        session.certify(image, seed=0)
    fake_available(monkeypatch, estimate.needs(batch=1)["host"] - 1)
    with pytest.raises(InputError, match="even --batch 1 needs"):
        Session.open(Settings(method="segcertify")).certify(image, seed=0)


@needs_shipped
def test_an_auto_batch_is_capped_per_device_and_by_the_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_available(monkeypatch, 1 << 50)
    assert Session.open(Settings(method="segcertify")).batch_for((64, 128)) == memory.AUTO_BATCH_LIMITS["cpu"] == 4
    assert Session.open(Settings(method="segcertify", n0=2, n=3)).batch_for((64, 128)) == 3  # by the samples
    assert Session.open(Settings(method="segcertify", batch=40)).batch_for((64, 128)) == 40  # as asked
    assert [memory.auto_batch_limit(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == [4, 64, 64, 4]
    # on CPU a batch holds at most CPU_BATCH_PIXELS image pixels: 4 at 256x512, 1 from 512x1024 on
    sizes = [(64, 128), (256, 512), (300, 600), (512, 1024), (1024, 2048)]
    assert [memory.auto_batch_limit("cpu", size) for size in sizes] == [4, 4, 2, 1, 1]
    assert [memory.auto_batch_limit("cuda", size) for size in sizes] == [64] * 5
    assert Session.open(Settings(method="segcertify")).batch_for((512, 1024)) == 1


def test_auto_batch_is_the_largest_that_fits_the_fraction() -> None:
    """Bisection against a plain scan over every batch, at several budgets, host and device both counted."""
    pipeline = memory.PipelineMemory(((1e6, 300.0),), {})
    for device in ("cpu", "cuda:0"):
        for available in (10**8, 5 * 10**8, 2 * 10**9, 10**10, 10**12):
            estimate = memory.MemoryEstimate((512, 1024), 16, device, 19, pipeline, True,
                                             {"host": available, device: available} if device != "cpu"
                                             else {"host": available})
            scan = [b for b in range(1, 65) if all(need <= 0.75 * available
                                                   for need in estimate.needs(batch=b).values())]
            assert estimate.auto_batch(64) == (scan[-1] if scan else 1), (device, available)


@needs_shipped
def test_auto_and_explicit_batches_give_identical_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise is drawn per sample index: whatever batch auto picks (here 3, from the memory), each sample gets the
    same noise, and on this image (SegCertify, 64×128) the models' batch-shape-dependent last bits flip no count,
    so the certificate is that of any explicit batch, bit for bit. (At 256×512 DenoiseCertify they flip a few
    pixels' counts between batch 1, 4 and 16: ``certseg.bench.batch_sweep`` reports it.)"""
    image = np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[:, :64, :128] / 255
    estimate = Session.open(Settings(method="segcertify", batch=16)).memory_estimate((64, 128))
    assert estimate is not None
    fake_available(monkeypatch, auto_budget(estimate, 3))
    results = {}
    for batch in (None, 1, 7, 16):
        session = Session.open(Settings(method="segcertify", n0=5, n=40, alpha=0.1, batch=batch))
        result, record = session.certify(image, seed=11)
        results[batch] = result
        assert record.settings.batch == (3 if batch is None else batch)
    for batch in (1, 7, 16):
        np.testing.assert_array_equal(results[batch].labels, results[None].labels)
        np.testing.assert_array_equal(results[batch].certificate.agree, results[None].certificate.agree)
        np.testing.assert_array_equal(results[batch].guess, results[None].guess)


MEASURE = """
import json, sys, numpy as np, torch
from pathlib import Path
from certseg.engine.files.outputs import write_outputs
from certseg.engine.runtimes.session import Session, Settings

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

method, height, width, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
session = Session.open(Settings(method=method, batch=batch, n0=10, n=100))
image = np.random.default_rng(0).random((3, height, width), dtype=np.float32)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here on
result, record = session.certify(image, seed=0)
write_outputs(Path(sys.argv[5]), "x", image, result, {})
print(json.dumps({"growth": status("VmHWM:") - before, "estimate": record["memory"]["needs_bytes"]["host"]}))
"""


@needs_shipped
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("method", ["segcertify", "denoisecertify"])
def test_estimate_covers_the_measured_peak_of_a_real_run_within_a_sane_factor(method: str, tmp_path: Path) -> None:
    """A fresh process (probe included, as on a first run; glibc's malloc and torch's allocator set as the
    commands set them) certifies a 384x768 image at batch 4 and writes the outputs: its peak resident memory growth
    stays under the estimate, and the estimate under 2.5× the growth."""
    env = dict(os.environ, CERTSEG_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    allocators_environment(env)
    done = subprocess.run([sys.executable, "-c", MEASURE, method, "384", "768", "4", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["growth"] <= measured["estimate"] <= 2.5 * measured["growth"], measured


def test_available_memory_is_capped_by_the_cgroup_headroom(tmp_path: Path) -> None:
    """MemAvailable of the host, and a container's limit minus what it uses (droppable page cache not counted)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683652 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.host_available_bytes(meminfo, cgroup) == 20000000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{3 << 30}\n")
    assert memory.host_available_bytes(meminfo, cgroup) == 20000000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    (cgroup / "memory.stat").write_text(f"anon {2 << 30}\ninactive_file {1 << 30}\nactive_file 5\n")
    assert memory.host_available_bytes(meminfo, cgroup) == (8 << 30) - (3 << 30) + (1 << 30)
    assert memory.host_available_bytes(tmp_path / "no-such-file", cgroup) is None


@needs_shipped
def test_a_model_that_cannot_run_at_the_probe_sizes_is_not_refused_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))  # nothing probed before, on disk or in this process
    monkeypatch.setattr(session_module, "_PIPELINE_MEMORY", {})
    session = Session.open(Settings(method="segcertify"))

    def cannot_run(*args: object, **kwargs: object) -> None:
        raise RuntimeError("input too small for this model\nsecond line")

    monkeypatch.setattr(session, "_probe_run", cannot_run)
    estimate = session.memory_estimate((128, 256))
    assert estimate is not None and estimate.pipeline.per_sample(10**6) == 0.0
    assert estimate.record()["pipeline"]["failed"] == "RuntimeError: input too small for this model"
    estimate.check()  # the engine's own arrays fit


def test_cpu_model_calls_hold_at_most_the_pixel_budget() -> None:
    from certseg.engine.runtimes.memory import CPU_MODEL_CALL_PIXELS, cpu_model_batch

    assert CPU_MODEL_CALL_PIXELS == 4 * 256 * 512
    assert [cpu_model_batch("cpu", size) for size in ((128, 256), (256, 512), (512, 1024), (1024, 2048),
                                                      (4096, 4096))] == [16, 4, 1, 1, 1]
    assert cpu_model_batch("cuda", (1024, 2048)) is None and cpu_model_batch("cuda:1", (8, 8)) is None
