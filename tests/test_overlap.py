"""On CPU the local runtime runs the stage maths around the models in a second thread (``LocalRuntime.overlaps``):
the labels must be those of the plain loop bit for bit, for every method and batch shape; errors and early stops
must leave no thread behind; the bench's stage timer must still split the time."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch
from test_multi_step import ElementwiseUNet

from certseg.bench.timing import StageTimer
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec
from certseg.engine.runtimes.torch_runtime import autocast_label_fn

SIZE = (24, 40)


def stage_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("certseg-stages")]


def runtime(label_fn, overlap: bool, **options) -> LocalRuntime:
    made = LocalRuntime(label_fn, prefetch=overlap, **options)
    assert made.overlaps() == overlap
    return made


def run(made: LocalRuntime, image: np.ndarray, start: int = 3, count: int = 11) -> np.ndarray:
    return np.concatenate(list(made.labels(image, sigma=0.3, seed=5, start=start, count=count)))


@pytest.mark.parametrize("method, steps", [("segcertify", 1), ("denoisecertify", 1), ("denoisecertify", 3)])
@pytest.mark.parametrize("channels", [3, 1])
def test_overlapped_labels_equal_the_plain_loops_bit_for_bit(small_adm_and_hrnet, method: str, steps: int,
                                                              channels: int) -> None:
    denoiser, segmenter = small_adm_and_hrnet
    if steps > 1:
        denoiser = ElementwiseUNet()  # K steps of the small ADM would take long; the chain is what matters here
    spec = make_spec(method, 0.3, SIZE, denoiser_size=(16, 16), denoise_steps=steps, scale=0.75)
    label_fn = autocast_label_fn(LabelPipeline(spec, segmenter, denoiser), torch.device("cpu"))
    image = np.random.default_rng(channels).random((channels, *SIZE), dtype=np.float32)
    plain = run(runtime(label_fn, False, batch_size=4), image)
    # model calls of 3 out of batches of 4 (4 = 3 + 1): both noise slots, and a call smaller than its slot
    np.testing.assert_array_equal(run(runtime(label_fn, True, batch_size=4), image), plain)
    sliced = run(runtime(label_fn, True, batch_size=4, model_batch=3), image)
    np.testing.assert_array_equal(sliced, run(runtime(label_fn, False, batch_size=4, model_batch=3), image))
    assert stage_threads() == []


def test_the_label_pipeline_itself_overlaps_and_its_phases_run_in_another_thread(small_adm_and_hrnet) -> None:
    """A LabelPipeline used as the label function (the ONNX backend does) overlaps too; the models run in the
    caller's thread, the stage maths around them in the worker."""
    _, segmenter = small_adm_and_hrnet
    pipeline = LabelPipeline(make_spec("segcertify", 0.3, SIZE), segmenter).eval()
    threads: dict[str, set[str]] = {"prepare": set(), "scores": set(), "labels": set()}
    originals = {name: getattr(pipeline, name) for name in threads}

    def recorded(name: str):
        def call(*args):
            threads[name].add(threading.current_thread().name)
            return originals[name](*args)
        return call

    for name in threads:
        setattr(pipeline, name, recorded(name))
    image = np.random.default_rng(7).random((3, *SIZE), dtype=np.float32)
    overlapped = run(runtime(pipeline, True, batch_size=2), image)
    main = threading.current_thread().name
    assert threads["scores"] == {main}
    assert threads["prepare"] and threads["labels"] and main not in threads["prepare"] | threads["labels"]
    with torch.inference_mode():
        np.testing.assert_array_equal(overlapped, run(runtime(pipeline, False, batch_size=2), image))


def failing_phase(label_fn, phase: str, after: int):
    """``label_fn`` whose ``phase`` raises from its ``after``-th call on."""
    calls = {"count": 0}
    prepare, scores, labels = label_fn.phases
    original = {"prepare": prepare, "scores": scores, "labels": labels}[phase]

    def broken(*args):
        calls["count"] += 1
        if calls["count"] > after:
            raise RuntimeError(f"{phase} broke")
        return original(*args)

    label_fn.phases = label_fn.phases._replace(**{phase: broken})
    return label_fn


@pytest.mark.parametrize("phase", ["prepare", "scores", "labels"])
def test_an_error_in_any_phase_reaches_the_consumer_and_stops_the_thread(small_adm_and_hrnet, phase: str) -> None:
    _, segmenter = small_adm_and_hrnet
    label_fn = autocast_label_fn(LabelPipeline(make_spec("segcertify", 0.3, SIZE), segmenter), torch.device("cpu"))
    label_fn = failing_phase(label_fn, phase, after=2)
    image = np.random.default_rng(8).random((3, *SIZE), dtype=np.float32)
    stream = runtime(label_fn, True, batch_size=1).labels(image, sigma=0.3, seed=1, start=0, count=8)
    with pytest.raises(RuntimeError, match=f"{phase} broke"):
        list(stream)
    assert stage_threads() == []


def test_closing_the_label_stream_early_leaves_no_thread(small_adm_and_hrnet) -> None:
    _, segmenter = small_adm_and_hrnet
    label_fn = autocast_label_fn(LabelPipeline(make_spec("segcertify", 0.3, SIZE), segmenter), torch.device("cpu"))
    image = np.random.default_rng(9).random((3, *SIZE), dtype=np.float32)
    stream = runtime(label_fn, True, batch_size=1).labels(image, sigma=0.3, seed=1, start=0, count=9)
    next(stream)
    assert len(stage_threads()) == 1
    stream.close()
    assert stage_threads() == []
    stream = runtime(label_fn, True, batch_size=1).labels(image, sigma=0.3, seed=1, start=0, count=9)
    next(stream)
    del stream
    gc.collect()
    assert stage_threads() == []


def test_the_stage_timer_splits_an_overlapped_run(small_adm_and_hrnet) -> None:
    denoiser, segmenter = small_adm_and_hrnet
    spec = make_spec("denoisecertify", 0.3, SIZE, denoiser_size=(16, 16))
    made = LocalRuntime(autocast_label_fn(LabelPipeline(spec, segmenter, denoiser), torch.device("cpu")),
                        batch_size=2, pipeline=None)
    made.pipeline = made.label_fn.pipeline
    timer = StageTimer()
    timed = timer.wrap(made)
    image = np.random.default_rng(10).random((3, *SIZE), dtype=np.float32)
    labels = run(timed, image, count=6)
    np.testing.assert_array_equal(labels, run(runtime(made.label_fn, False, batch_size=2), image, count=6))
    stages = timer.snapshot()
    for stage in ("noise", "preprocess", "denoise", "segment", "argmax", "count"):
        assert stages[stage] > 0, stage
    assert made.observer is None  # the timer observes a copy: the session's runtime is left as it was
