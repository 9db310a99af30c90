"""``--compile``: the models run as AOTInductor packages (``compile_model``; their caching is tested in
test_aot_compile.py) and the label step through torch.compile, the other stage maths stay eager, so labels match
the eager models and non-finite outputs still abstain; runtimes that cannot compile refuse it in one line."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_non_finite import (
    InfiniteDenoiser,
    SpikeSegmenter,
    assert_spike_certificate,
    certify,
    small_image,
    spec,
    spike_for,
)
from torch import nn
from torch._dynamo.utils import counters
from torch.export.pt2_archive._package import AOTICompiledModel
from typer.testing import CliRunner

from certseg.engine.commands.cli import app
from certseg.engine.errors import InputError
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.maths.stages import labels_from_logits
from certseg.engine.runtimes.aoti_runner import NativeModel, native_runner
from certseg.engine.runtimes.session import Session, Settings
from certseg.engine.runtimes.torch_runtime import (
    INDUCTOR_CACHE,
    compile_model,
    compiled_argmax,
    torch_runtime,
    use_certseg_inductor_cache,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("own_package_cache")  # conftest: a fresh folder for the packages


def labels(runtime, image: np.ndarray, count: int) -> np.ndarray:
    return np.concatenate(list(runtime.labels(image, sigma=0.25, seed=3, start=0, count=count)))


def test_a_compiled_segmenter_labels_as_the_eager_one_and_is_really_compiled(own_package_cache: Path) -> None:
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))
    segmenter[1].running_mean.uniform_(-0.1, 0.1)  # a batch norm inductor fuses
    segmenter.eval()
    image = np.random.default_rng(0).random((3, 32, 64), dtype=np.float32)
    pipeline = LabelPipeline(make_spec("segcertify", 0.25, (32, 64)), segmenter)
    eager = labels(torch_runtime(pipeline, device=torch.device("cpu"), batch_size=3), image, 6)
    runtime = torch_runtime(pipeline, device=torch.device("cpu"), batch_size=3, compile=True)
    compiled = labels(runtime, image, 6)
    segmenter = runtime.pipeline.segmenter  # the AOTInductor package ran each batch: the model did not run eager
    assert segmenter.runs == 2 and len(segmenter.packages) == 1 and segmenter.packages[0].is_file()
    assert segmenter.packages[0].parent == own_package_cache / "aoti"
    # Fused kernels sum in another order, so a near-tie may flip; the classes are otherwise the eager ones.
    assert compiled.shape == eager.shape and (compiled == eager).mean() >= 0.999


def test_the_compiled_label_step_gives_the_eager_labels_and_abstains_on_non_finite_scores() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 7, 8, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    logits[0, 3, 2, 5] = float("nan")
    logits[1, 0, 6, 1] = float("inf")
    logits[1, :, 4:6, 4:6] = 0.5  # a tie: the lowest class (upsampled pixels 18..21 read only these)
    graphs = counters["stats"]["unique_graphs"]
    compiled = labels_from_logits(logits, (32, 64), argmax=compiled_argmax())
    assert counters["stats"]["unique_graphs"] > graphs  # the label step ran compiled
    eager = labels_from_logits(logits, (32, 64))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert (compiled[0] == 7).any() and (compiled[1] == 7).any() and compiled[1, 19, 19] == 0


def test_a_compiled_pipeline_runs_the_compiled_label_step() -> None:
    pipeline = LabelPipeline(make_spec("segcertify", 0.25, (8, 8)), nn.Conv2d(3, 4, 1))
    runtime = torch_runtime(pipeline, device=torch.device("cpu"), compile=True)
    assert pipeline.argmax is None and runtime.pipeline.argmax is not None
    # torch's AOTInductor runner holds the GIL through its call: compiled runs overlap only through certseg's.
    assert runtime.overlaps() == (native_runner() is not None)
    assert torch_runtime(pipeline, device=torch.device("cpu")).overlaps()


def test_certsegs_package_runner_lets_go_of_the_gil_and_gives_torchs_outputs(tmp_path: Path, monkeypatch) -> None:
    """A Python thread keeps running while a package runs (torch's own runner holds the GIL throughout), and the
    outputs are bit for bit those of torch's runner on the same package."""
    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    assert native_runner() is not None  # CI has a compiler: --compile needs one anyway
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(6)]).eval()
    image = torch.randn(1, 3, 512, 1024)
    compiled = compile_model(net)
    with torch.inference_mode():
        compiled(image)  # builds the package
    path = compiled.packages[-1]
    ours = NativeModel(str(path))
    theirs = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1))
    weights = {name: tensor.detach() for name, tensor in compiled.wrapped.named_parameters()}
    for model in (ours, theirs):
        model.load_constants({k: weights[k] for k in model.get_constant_fqns()}, check_full_update=True,
                             user_managed=True)

    def python_steps_during(model) -> tuple[int, torch.Tensor]:
        steps, done = [0], threading.Event()

        def spin() -> None:
            while not done.is_set():
                steps[0] += 1

        thread = threading.Thread(target=spin)
        with torch.inference_mode():
            thread.start()
            while steps[0] == 0:
                pass
            before = steps[0]
            out = [model(image) for _ in range(5)][-1]
            during = steps[0] - before
        done.set()
        thread.join()
        return during, out

    ours_steps, ours_out = python_steps_during(ours)
    theirs_steps, theirs_out = python_steps_during(theirs)
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=0)
    assert ours_steps > 5 * max(theirs_steps, 1)


def test_compiled_models_still_fail_closed() -> None:
    """Batches of 2 divide N0 and N: one input shape, so one package per model (each costs seconds to build)."""
    image = small_image()
    pixel, threshold, sample = spike_for(image)
    segcertify = LabelPipeline(spec(image, "segcertify"), SpikeSegmenter(pixel, threshold))
    runtime = torch_runtime(segcertify, device=torch.device("cpu"), batch_size=2, compile=True)
    assert_spike_certificate(certify(runtime, image), pixel, sample)
    assert runtime.pipeline.segmenter.runs > 0 and len(runtime.pipeline.segmenter.packages) == 1  # not eager
    denoisecertify = LabelPipeline(spec(image, "denoisecertify"), SpikeSegmenter(), InfiniteDenoiser())
    runtime = torch_runtime(denoisecertify, device=torch.device("cpu"), batch_size=2, compile=True)
    result = certify(runtime, image)
    assert result.certificate.certified.sum() == 0 and (result.certificate.agree == 0).all()
    assert runtime.pipeline.denoiser.runs > 0 and len(runtime.pipeline.denoiser.packages) == 1  # (x_t, t) too


@pytest.mark.parametrize("runtime", ["onnx"])
def test_runtimes_that_do_not_run_torch_models_refuse_compile(runtime: str) -> None:
    with pytest.raises(InputError, match="--compile compiles torch models: use --runtime torch") as error:
        Session.open(Settings(method="segcertify", compile=True, runtime=runtime, device="cpu"))
    assert "\n" not in str(error.value)


def test_servers_refuse_compile() -> None:
    from certseg.engine.runtimes.backends import TritonBackend

    with pytest.raises(InputError, match="drop --compile or --server"):
        TritonBackend.connect(Settings(method="segcertify", compile=True), ("127.0.0.1:1",))


@pytest.mark.full
def test_certify_compile_end_to_end_records_it(tmp_path: Path) -> None:
    """The shipped HRNet compiled (about a minute on a cold cache): the command works and the JSON says compiled."""
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["certify", str(REPO / "examples" / "street.png"), "--method", "segcertify",
                                    "--compile", "--n0", "4", "--n", "60", "--alpha", "0.01", "--out", str(out),
                                    "--seed", "1"])
    assert done.exit_code == 0, done.output
    record = json.loads((out / "street.json").read_text())
    assert record["settings"]["compile"] is True and record["settings"]["runtime"] == "torch"


def test_the_bench_stage_timer_times_compiled_models() -> None:
    """Its hooks sit on the compiled wrappers the runtime runs, outside the graphs: the split is real."""
    import time

    from certseg.bench.timing import StageTimer

    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    image = np.random.default_rng(1).random((3, 32, 64), dtype=np.float32)
    runtime = torch_runtime(LabelPipeline(make_spec("segcertify", 0.25, (32, 64)), segmenter),
                            device=torch.device("cpu"), batch_size=2, compile=True)
    labels(runtime, image, 2)  # compiled here, outside the timed run
    timer = StageTimer("cpu")
    try:
        started = time.perf_counter()
        labels(timer.wrap(runtime), image, 6)
        wall = time.perf_counter() - started
        stages = timer.snapshot()
    finally:
        timer.close()
    assert stages["segment"] > 0 and stages["argmax"] > 0
    assert timer.overlapped == runtime.overlaps()
    if timer.overlapped:  # two threads (certseg's runner built): each one's stages fit in the wall time, not their
        # sum; preprocess is left out, as both threads add to it (the helper's normalisation, the models' thread the
        # maths between its models)
        assert stages["segment"] + stages["denoise"] + stages["count"] <= wall * 1.05  # the models' thread
        assert stages["noise"] + stages["argmax"] + stages["transfer"] <= wall * 1.05  # the helper thread
    else:
        assert sum(stages.values()) <= wall * 1.05


def test_inductor_cache_goes_to_certseg_unless_the_user_chose_a_folder(monkeypatch, tmp_path: Path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir


    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path / "certseg"))
    for unset in (None, default_cache_dir()):  # torch writes its default in before certseg compiles
        if unset is None:
            monkeypatch.delenv(INDUCTOR_CACHE, raising=False)
        else:
            monkeypatch.setenv(INDUCTOR_CACHE, unset)
        use_certseg_inductor_cache()
        assert Path(os.environ[INDUCTOR_CACHE]) == tmp_path / "certseg" / "inductor"
    monkeypatch.setenv(INDUCTOR_CACHE, str(tmp_path / "mine"))
    use_certseg_inductor_cache()
    assert os.environ[INDUCTOR_CACHE] == str(tmp_path / "mine")
