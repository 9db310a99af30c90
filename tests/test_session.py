"""The session's seams: one model identity, one backend per runtime, timing around the runtime it built, a typed
record that serialises to the JSON results hold, and the same certificate bytes before and after they existed."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest

from certseg.bench.timing import STAGES, StageTimer, TimedRuntime
from certseg.engine.core.sampling import LocalRuntime
from certseg.engine.digest import certificate_sha256
from certseg.engine.files.images import read_image
from certseg.engine.models.info import LoadedModel, ModelInfo
from certseg.engine.models.registry import shipped_models
from certseg.engine.runtimes.backends import OnnxBackend, TorchBackend
from certseg.engine.runtimes.certify_record import KEYS, CertifyRecord
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings

from conftest import PINNED_TORCH_THREADS

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "street.png"
SEED = 21
PINNED = {
    ("segcertify", "torch"): "3aa116aff08ac0083a1df84bec4c6cc80df5425de72a32e44e832b300307e2c5",
    ("segcertify", "onnx"): "3aa116aff08ac0083a1df84bec4c6cc80df5425de72a32e44e832b300307e2c5",
    ("segcertify", "triton"): "3aa116aff08ac0083a1df84bec4c6cc80df5425de72a32e44e832b300307e2c5",
    ("denoisecertify", "torch"): "f78d97ea88a8d5572525af2b5d5c8909c57103f10ac17bc3cf0e75606908d907",
    ("denoisecertify", "onnx"): "4abf996586863c0e14d914cc398c6b2e7dea4ccc0fcaee7b1bdcf44be0c9416b",
    ("denoisecertify", "triton"): "4abf996586863c0e14d914cc398c6b2e7dea4ccc0fcaee7b1bdcf44be0c9416b",
}
"""sha256 of the certified map and agreement counts of examples/street.png, seed 21, n0 = 10, n = 100, batch 16,
the shipped models, two torch threads (``PINNED_TORCH_THREADS``), made by the code before sessions had backends and
typed records (the served pipeline runs
the exported ONNX graphs, so it equals in-process ONNX Runtime; DenoiseCertify on torch differs from them in a few
pixels' counts)."""

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-hrnet-noise025", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)


def certificate_digest(result) -> str:
    return certificate_sha256(result.labels, result.certificate.agree)


def settings(method: str, runtime: str | None = None, n: int = 100) -> Settings:
    return Settings(method=method, n0=10, n=n, batch=16, runtime=runtime, device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_image(SAMPLE)


@needs_shipped
@pytest.mark.parametrize("runtime", ["torch", "onnx"])
@pytest.mark.parametrize("method", ["segcertify", "denoisecertify"])
def test_in_process_certificates_keep_their_pinned_bytes(image: np.ndarray, method: str, runtime: str) -> None:
    result, record = Session.open(settings(method, runtime), threads=PINNED_TORCH_THREADS).certify(image, seed=SEED)
    assert certificate_digest(result) == PINNED[(method, runtime)]
    assert record.settings.runtime == runtime


@needs_shipped
def test_served_certificates_keep_their_pinned_bytes(image: np.ndarray, default_server) -> None:
    """The bundled tritonserver on the default repository (the shipped models, exported)."""
    for method in ("segcertify", "denoisecertify"):
        session = Session.connect(settings(method), (default_server.grpc_address,))
        try:
            result, record = session.certify(image, seed=SEED)
        finally:
            session.close()
        assert certificate_digest(result) == PINNED[(method, "triton")]
        assert record.device == f"triton:{default_server.grpc_address}" and record.memory is None
        assert record.segmenter.served and "server_stages" in record.to_json()["timings"]


@needs_shipped
def test_the_record_is_typed_and_serialises_to_the_json_keys_results_hold(image: np.ndarray) -> None:
    session = Session.open(settings("denoisecertify", "torch", n=64))
    crop = np.ascontiguousarray(image[:, :32, :64])
    result, record = session.certify(crop, seed=3)
    assert isinstance(record, CertifyRecord) and isinstance(session.backend, TorchBackend)
    with pytest.raises(FrozenInstanceError):
        record.device = "elsewhere"  # type: ignore[misc]
    made = record.to_json()
    assert tuple(made) == KEYS and json.loads(json.dumps(made))["device"] == "cpu"  # JSON-ready as it is
    assert made["settings"] == session.settings.record() and made["pipeline"] == record.pipeline.record()
    assert made["models"] == {"segmenter": session.segmenter.record(), "denoiser": session.denoiser.record()}
    assert made["device"] == "cpu" and made["non_finite"] == result.non_finite
    assert made["certified_space"]["name"] == "rgb" and made["memory"] == record.memory.record()
    assert list(made["timings"]) == ["selection", "estimation", "certify", "total", "samples_per_second"]
    # It still reads like the dict certify used to return.
    assert dict(record) == made and record["pipeline"]["timestep"]["t"] == record.pipeline.timestep.t
    assert {**record} == made and "models" in record and record.get("nothing") is None


@needs_shipped
def test_local_served_and_onnx_models_share_one_info_record(tmp_path: Path) -> None:
    session = Session.open(settings("segcertify", "onnx"))
    assert isinstance(session.backend, OnnxBackend)
    loaded = session.segmenter
    assert isinstance(loaded, LoadedModel) and isinstance(loaded, ModelInfo)
    info = loaded.info
    assert type(info) is ModelInfo and info == loaded.info and not hasattr(info, "module")
    assert info.num_classes == 8 and info.classes[0] == "road" and info.palette[0] == (128, 64, 128)
    assert info.record() == {"name": "procedural-hrnet-noise025", "family": "hrnet", "source": info.source,
                             "sha256": info.sha256}
    # An ONNX file records what it states; the same file described by a server records its identity only.
    described = replace(info, family="onnx", input_size=(64, 128), normalization={
        "mean": [1, 2, 3], "std": [4, 5, 6], "input_range": [0, 255]})
    assert described.record() == {**info.record(), "family": "onnx", "role": "segmenter", "num_classes": 8,
                                  "input_size": (64, 128), "classes": list(info.classes),
                                  "palette": [list(c) for c in info.palette],
                                  "normalization": {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0],
                                                    "input_range": [0.0, 255.0]}}
    assert replace(described, served=True).record() == {**info.record(), "family": "onnx"}
    # What exports read: the stated facts by key.
    assert described.extra["classes"] == list(info.classes) and described.extra["normalization"]["std"][0] == 4.0


@needs_shipped
def test_stage_timing_wraps_the_runtime_the_session_built(image: np.ndarray) -> None:
    crop = np.ascontiguousarray(image[:, :32, :64])
    plain, _ = Session.open(settings("denoisecertify", "torch", n=64)).certify(crop, seed=4)
    timer = StageTimer()
    try:
        session = Session.open(settings("denoisecertify", "torch", n=64))
        session.wrap_runtime = timer.wrap
        timed, _ = session.certify(crop, seed=4)
        _, runtime = session.runtime_for((32, 64))
        assert isinstance(runtime, TimedRuntime) and isinstance(runtime.inner, LocalRuntime)
        assert runtime.inner.pipeline is not None  # the pipeline the session's runtime runs is the one hooked
        stages = timer.snapshot()
    finally:
        timer.close()
    assert certificate_digest(timed) == certificate_digest(plain)
    assert set(stages) == set(STAGES)
    assert all(stages[stage] > 0 for stage in ("noise", "preprocess", "denoise", "segment", "argmax"))
