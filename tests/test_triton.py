"""The Triton path against the real bundled tritonserver: served == in-process, concurrency, failures, configs.

Servers run on 127.0.0.1 free ports and are stopped by their own PID. Every test that needs a server skips,
with the reason, when the tritonserver binary cannot start on this machine. The models are tiny ONNX graphs
with the exported models' I/O names (images -> logits; x_t, timesteps -> eps), so the tests stay fast.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc.model_config_pb2 import DataType  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from certseg.engine.commands.cli import app  # noqa: E402
from certseg.engine.core.pipeline import certify_image  # noqa: E402
from certseg.engine.core.radius import radius_map  # noqa: E402
from certseg.engine.errors import ServerError  # noqa: E402
from certseg.engine.files.images import read_image, read_labels  # noqa: E402
from certseg.engine.files.radius_outputs import read_radius_npz  # noqa: E402
from certseg.engine.maths.label_pipeline import make_spec  # noqa: E402
from certseg.engine.models.registry import shipped_models  # noqa: E402
from certseg.engine.runtimes.onnx_runtime import onnx_runtime  # noqa: E402
from certseg.engine.runtimes.serve import TritonServer, find_tritonserver, free_port  # noqa: E402
from certseg.engine.runtimes.triton_runtime import (  # noqa: E402
    REPOSITORY_VERSION,
    TritonRuntime,
    served_model,
    server_statistics,
)
from certseg.export.repository import (  # noqa: E402
    STEPS,
    ModelFiles,
    RepositoryError,
    parse_config,
    read_configs,
    write_repository,
)

from conftest import PINNED_TORCH_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "street.png"
NUM_CLASSES = 5
DENOISER_SIZE = 32
SIGMA = 0.25
CLASSES = ["road", "car", "sky", "tree", "wall"]
CROP = 64
LIMITED_BYTES = 2 * 3 * CROP * CROP * 4
"""The ``limited`` server's max_request_bytes: two samples of a CROP x CROP image per request."""
MISBEHAVING_NOISE = '''"""Test only: certseg_noise that misbehaves once on each (SEED, START) that misbehave.json
lists: it sleeps ("sleep": starts, "seconds") or answers an IMAGE_SIZE one row too tall ("wrong_size": starts)."""
import json
import os
import time

import torch
from noise_step import TritonPythonModel as NoiseStep


class TritonPythonModel(NoiseStep):
    def initialize(self, args):
        super().initialize(args)
        self.done = set()

    def run(self, request):
        path = os.path.join(self.step.model_dir, "misbehave.json")
        plan = {}
        if os.path.exists(path):
            with open(path) as handle:
                plan = json.load(handle)
        seed, start = (int(self.step.scalar(request, name)) for name in ("SEED", "START"))
        outputs = super().run(request)
        for kind in ("sleep", "wrong_size"):
            if seed == plan.get("seed") and start in plan.get(kind, ()) and (kind, start) not in self.done:
                self.done.add((kind, start))
                if kind == "sleep":
                    time.sleep(plan["seconds"])
                else:
                    outputs["IMAGE_SIZE"] = outputs["IMAGE_SIZE"] + torch.tensor([1, 0], dtype=torch.int32)
        return outputs
'''


class TinySegmenter(nn.Module):
    """images (B, 3, h, w) -> logits (B, K, h/2, w/2): enough structure for varied label maps."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.classify = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(torch.relu(self.features(images)))


class TinyDenoiser(nn.Module):
    """x_t (B, 3, S, S), timesteps (B,) -> eps (B, 3, S, S), timestep-dependent like a diffusion UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 8)
        self.inner = nn.Conv2d(3, 8, 3, padding=1)
        self.outer = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(x_t) + self.embed(timesteps)[:, :, None, None]))


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], output: str,
           axes: dict[str, dict[int, str]]) -> Path:
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=[output],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    image_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "h", 3: "w"}}
    segmenter = export(TinySegmenter(), (torch.rand(2, 3, 64, 128),), folder / "segmenter.onnx", ["images"],
                       "logits", image_axes)
    noisy = export(TinySegmenter(), (torch.rand(2, 3, 64, 128),), folder / "segmenter-noisy.onnx", ["images"],
                   "logits", image_axes)
    denoiser = export(TinyDenoiser(), (torch.rand(2, 3, DENOISER_SIZE, DENOISER_SIZE), torch.tensor([5, 5])),
                      folder / "denoiser.onnx", ["x_t", "timesteps"], "eps",
                      {"x_t": {0: "batch"}, "timesteps": {0: "batch"}, "eps": {0: "batch"}})
    return ModelFiles(segmenter=segmenter, denoiser=denoiser, segcertify_segmenter=noisy, metadata={
        "classes": CLASSES,
        "segmenter": {"name": "tiny-segmenter", "family": "test", "source": str(segmenter), "sha256": "s" * 64},
        "denoiser": {"name": "tiny-denoiser", "family": "test", "source": str(denoiser), "sha256": "d" * 64},
    })


@pytest.fixture(scope="module")
def triton_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (with the reason) where the tritonserver binary is missing or cannot start here."""
    try:
        binary = find_tritonserver()
        empty = tmp_path_factory.mktemp("empty-repository")
        with TritonServer(empty, binary=binary, ready_timeout_s=60, exit_timeout_s=0):
            pass
    except ServerError as error:
        pytest.skip(f"tritonserver cannot start on this machine: {error}")


@pytest.fixture(scope="module")
def served(triton_runs: None, models: ModelFiles, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: both ensembles, plus a copy of one at another repository version."""
    repository = write_repository(models, tmp_path_factory.mktemp("served") / "repository", max_batch=16)
    old = repository / "certseg_segcertify_v0"
    shutil.copytree(repository / "certseg_segcertify", old)
    config = (old / "config.pbtxt").read_text().replace('name: "certseg_segcertify"', 'name: "certseg_segcertify_v0"')
    (old / "config.pbtxt").write_text(config.replace(f'string_value: "{REPOSITORY_VERSION}" }}', 'string_value: "0" }'))
    with TritonServer(repository, exit_timeout_s=0) as server:
        yield server


@pytest.fixture(scope="module")
def limited(triton_runs: None, models: ModelFiles, tmp_path_factory: pytest.TempPathFactory):
    """A SegCertify-only server whose requests may make two CROP x CROP samples at most, and whose noise step
    misbehaves where a test asks it to (``misbehave.json`` beside it); two instances, so others run meanwhile."""
    repository = write_repository(ModelFiles(segmenter=models.segmenter), tmp_path_factory.mktemp("limited") /
                                  "repository", max_request_bytes=LIMITED_BYTES, step_instances=2)
    step = repository / "certseg_noise" / "1"
    (step / "model.py").rename(step / "noise_step.py")
    (step / "model.py").write_text(MISBEHAVING_NOISE)
    with TritonServer(repository, exit_timeout_s=0) as server:
        yield server


@pytest.fixture(scope="module")
def crop(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :CROP, :CROP])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_image(SAMPLE)


def local_runtime(models: ModelFiles, spec, batch: int = 8):
    return onnx_runtime(spec, models.segmenter, models.denoiser, batch_size=batch)


def spec_for(image: np.ndarray, method: str = "denoisecertify", denoise_steps: int = 1):
    return make_spec(method, SIGMA, image.shape[1:], denoiser_size=(DENOISER_SIZE, DENOISER_SIZE),
                     denoise_steps=denoise_steps)


def remote_runtime(server: TritonServer, spec, **options) -> TritonRuntime:
    model = "certseg_denoisecertify" if spec.method == "denoisecertify" else "certseg_segcertify"
    return TritonRuntime([server.grpc_address], model, timestep=None if spec.timestep is None else spec.timestep.t,
                         seg_size=spec.segmenter_size, denoise_steps=spec.denoise_steps, **options)


def assert_same_certificate(a, b) -> None:
    np.testing.assert_array_equal(a.guess, b.guess)
    np.testing.assert_array_equal(a.certificate.agree, b.certificate.agree)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_every_generated_config_parses_with_tritons_schema(models: ModelFiles, tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    for role in ("segmenter", "denoiser", "segcertify_segmenter"):
        (plans / f"{role}.plan").write_bytes(b"engine")
    with_plans = ModelFiles(**{**models.__dict__, "segmenter_plan": plans / "segmenter.plan",
                               "denoiser_plan": plans / "denoiser.plan",
                               "segcertify_segmenter_plan": plans / "segcertify_segmenter.plan",
                               "segmenter_fp16": models.segmenter, "denoiser_fp16": models.denoiser,
                               "segcertify_segmenter_fp16": models.segcertify_segmenter})
    variants = {"cpu": {"profile": "cpu"}, "gpu": {"profile": "gpu"}, "gpu-fp16": {"profile": "gpu", "fp16": True},
                "gpu-tensorrt": {"profile": "gpu", "gpu_engine": "tensorrt", "instances": 2}}
    for name, options in variants.items():
        root = write_repository(with_plans, tmp_path / name, **options)
        configs = read_configs(root)  # Triton's own ModelConfig schema
        assert len(configs) == len(list(root.glob("*/config.pbtxt"))) == 11
        for model, config in configs.items():
            assert config.name == model
            assert config.parameters["certseg_repository_version"].string_value == REPOSITORY_VERSION
            if config.backend == "python":
                assert {"model.py", "certseg_step.py"} <= {f.name for f in (root / model / "1").iterdir()}
        for ensemble in STEPS:
            steps = [step.model_name for step in configs[ensemble].ensemble_scheduling.step]
            assert all(step in configs for step in steps)
            assert configs[ensemble].max_batch_size == 0
            assert json.loads(configs[ensemble].parameters["classes"].string_value) == CLASSES
        assert [s.model_name for s in configs["certseg_segcertify"].ensemble_scheduling.step][2] == \
            "certseg_segment_segcertify"
        for step in ("certseg_denoise", "certseg_segment", "certseg_segment_segcertify"):
            assert configs[step].max_batch_size == 16 and configs[step].HasField("dynamic_batching")
        if options["profile"] == "cpu":
            assert configs["certseg_denoise"].backend == "python"
            assert (root / "certseg_denoise" / "1" / "denoiser.onnx").is_file()
        elif options.get("gpu_engine") == "tensorrt":
            assert configs["certseg_denoise"].platform == "tensorrt_plan"
            assert configs["certseg_denoise"].instance_group[0].count == 2
            assert (root / "certseg_denoise" / "1" / "model.plan").is_file()
        else:
            assert configs["certseg_segment"].platform == "onnxruntime_onnx"
            assert configs["certseg_noise"].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    with pytest.raises(RepositoryError, match="does not parse"):
        parse_config('name: "x" max_batch_size: "many"')
    with pytest.raises(RepositoryError, match="not empty"):
        write_repository(models, tmp_path / "cpu")


def test_more_than_256_classes_are_served_as_uint16_label_maps(tmp_path: Path) -> None:
    wide = export(nn.Conv2d(3, 300, 1), (torch.rand(2, 3, 8, 8),), tmp_path / "wide.onnx", ["images"], "logits",
                  {"images": {0: "b", 2: "h", 3: "w"}, "logits": {0: "b", 2: "h", 3: "w"}})
    configs = read_configs(write_repository(ModelFiles(segmenter=wide), tmp_path / "repository"))
    assert sorted(configs) == ["certseg_argmax", "certseg_noise", "certseg_prepare", "certseg_segcertify",
                               "certseg_segment"]
    for model in ("certseg_segcertify", "certseg_argmax"):
        assert [DataType.Name(o.data_type) for o in configs[model].output] == ["TYPE_UINT16"]
    assert list(configs["certseg_segment"].output[0].dims) == [300, -1, -1]


def test_served_labels_equal_in_process_onnx_runtime(served: TritonServer, models: ModelFiles,
                                                    image: np.ndarray) -> None:
    """Same seed, same ONNX files: the served certificate is the in-process ORT certificate, bit for bit."""
    spec = spec_for(image)
    local = certify_image(local_runtime(models, spec), image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=8, n=64,
                          seed=11)
    with remote_runtime(served, spec, batch=8) as remote:
        result = certify_image(remote, image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=8, n=64, seed=11)
        assert remote.uses_shared_memory == {served.grpc_address: True}
    assert_same_certificate(local, result)
    # Two endpoints (here: two names of one server) split the sample range between them.
    port = served.grpc_port
    both = TritonRuntime([f"127.0.0.1:{port}", f"localhost:{port}"], timestep=spec.timestep.t,
                         seg_size=spec.segmenter_size, batch=8)
    with both:
        split = certify_image(both, image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=8, n=64, seed=11)
        assert all(count > 0 for count in both.answered.values()) and sum(both.answered.values()) == 8
    assert_same_certificate(local, split)
    assert len(np.unique(local.guess)) > 1 and 0 < local.certificate.certified.mean() < 1
    # Over the socket, another batch size, an offset range: the same sample maps, one by one.
    with remote_runtime(served, spec, batch=5, shared_memory="off", in_flight=3) as remote:
        served_maps = np.concatenate(list(remote.labels(image, sigma=SIGMA, seed=11, start=3, count=12)))
        assert remote.uses_shared_memory == {served.grpc_address: False}
    local_maps = np.concatenate(list(local_runtime(models, spec).labels(image, sigma=SIGMA, seed=11, start=3,
                                                                       count=12)))
    np.testing.assert_array_equal(served_maps, local_maps)
    # SegCertify serves its own segmenter, and says so.
    with TritonRuntime([served.grpc_address], "certseg_segcertify") as remote:
        noisy_record = served_model(remote.pipeline, "segmenter")
    assert noisy_record is not None and noisy_record.source.endswith("/certseg_segment_segcertify")
    assert noisy_record.name == "segmenter-noisy.onnx" and noisy_record.num_classes == NUM_CLASSES
    spec = spec_for(image, "segcertify")
    noisy = onnx_runtime(spec, models.segcertify_segmenter, batch_size=4)
    with remote_runtime(served, spec, batch=4) as remote:
        got = np.concatenate(list(remote.labels(image, sigma=SIGMA, seed=5, start=0, count=6)))
    np.testing.assert_array_equal(got, np.concatenate(list(noisy.labels(image, sigma=SIGMA, seed=5, start=0,
                                                                        count=6))))


def test_k_step_denoising_served_equals_in_process_onnx_alone_batched_and_split(
    served: TritonServer, models: ModelFiles, crop: np.ndarray
) -> None:
    """The chain runs server-side with each sample's own reverse noise: a sample's K-step label map is the same
    alone, in a request of 16, and in a range split across two endpoints, and equals in-process ONNX Runtime."""
    spec = spec_for(crop, denoise_steps=4)
    assert len(spec.denoise_timesteps) == 4

    def local(start: int, count: int, batch: int) -> np.ndarray:
        runtime = local_runtime(models, spec, batch=batch)
        return np.concatenate(list(runtime.labels(crop, sigma=SIGMA, seed=7, start=start, count=count)))

    expected = local(0, 16, 16)
    with remote_runtime(served, spec, batch=16) as remote:
        batched = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=7, start=0, count=16)))
    with remote_runtime(served, spec, batch=1) as remote:
        alone = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=7, start=9, count=1)))
    port = served.grpc_port
    with TritonRuntime([f"127.0.0.1:{port}", f"localhost:{port}"], timestep=spec.timestep.t,
                       seg_size=spec.segmenter_size, denoise_steps=4, batch=5) as split:
        two = np.concatenate(list(split.labels(crop, sigma=SIGMA, seed=7, start=0, count=16)))
        assert all(count > 0 for count in split.answered.values())
    np.testing.assert_array_equal(batched, expected)
    np.testing.assert_array_equal(two, expected)
    np.testing.assert_array_equal(alone[0], expected[9])
    np.testing.assert_array_equal(local(9, 1, 1)[0], expected[9])
    with remote_runtime(served, spec_for(crop), batch=16) as remote:  # K = 1 on the same server: other maps
        one = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=7, start=0, count=16)))
    np.testing.assert_array_equal(one, local_runtime(models, spec_for(crop), batch=16).labels(
        crop, sigma=SIGMA, seed=7, start=0, count=16).__next__())
    assert not np.array_equal(one, expected)
    t = spec.timestep.t
    with remote_runtime(served, spec, batch=4) as remote, pytest.raises(ServerError, match="steps must be in"):
        remote.denoise_steps = t + 2
        list(remote.labels(crop, sigma=SIGMA, seed=7, start=0, count=4))


def test_two_concurrent_clients_get_exactly_their_own_counts(served: TritonServer, image: np.ndarray) -> None:
    """Concurrent requests share the steps' dynamic batches; every client still gets exactly its samples."""
    crop = np.ascontiguousarray(image[:, :64, :128])
    spec = spec_for(crop)

    def run(seed: int):
        with remote_runtime(served, spec, batch=8, in_flight=2) as remote:
            return certify_image(remote, crop, num_classes=NUM_CLASSES, sigma=SIGMA, n0=6, n=64, seed=seed)

    seeds = (101, 202)
    sequential = {seed: run(seed) for seed in seeds}
    with ThreadPoolExecutor(2) as pool:
        concurrent = dict(zip(seeds, pool.map(run, seeds), strict=True))
    for seed in seeds:
        assert_same_certificate(sequential[seed], concurrent[seed])
    assert not np.array_equal(sequential[101].certificate.agree, sequential[202].certificate.agree)


def test_certify_command_against_the_server_writes_the_outputs(served: TritonServer, models: ModelFiles,
                                                               image: np.ndarray, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "certify", str(SAMPLE), "--server", served.grpc_address, "--n0", "8", "--n", "64", "--seed", "11",
        "--batch", "8", "--out", str(tmp_path), "--quiet", "--radius-map",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "street.json").read_text())
    spec = spec_for(image)
    assert report["settings"]["runtime"] == "triton" and report["seed"] == 11
    assert report["timestep"]["t"] == spec.timestep.t
    assert report["classes"] == CLASSES and report["models"]["denoiser"]["name"] == "tiny-denoiser"
    assert report["timings"]["server_stages"]["certseg_denoise"]["inferences"] >= 72
    local = certify_image(local_runtime(models, spec), image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=8, n=64,
                          seed=11)
    np.testing.assert_array_equal(read_labels(tmp_path / "street.certified.png"), local.labels)
    radius, guess = read_radius_npz(tmp_path / "street.radius.npz")  # the radius map is made from served counts
    expected = radius_map(local.certificate.agree, 64, sigma=SIGMA, alpha=0.001).radius
    np.testing.assert_array_equal(radius, expected)
    np.testing.assert_array_equal(guess, local.guess)
    assert report["radius_map"]["num_pixels"] == local.certificate.num_pixels


def test_certify_server_with_denoise_steps_gives_the_in_process_onnx_certificate(
    served: TritonServer, models: ModelFiles, crop: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "crop.png"
    Image.fromarray((crop.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    image = read_image(path)
    result = CliRunner().invoke(app, [
        "certify", str(path), "--server", served.grpc_address, "--denoise-steps", "3", "--n0", "4", "--n", "60",
        "--alpha", "0.01", "--seed", "13", "--batch", "8", "--out", str(tmp_path / "out"), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "crop.json").read_text())
    spec = spec_for(image, denoise_steps=3)
    assert report["pipeline"]["denoise_steps"] == 3
    assert report["pipeline"]["denoise_timesteps"] == list(spec.denoise_timesteps)
    assert report["timings"]["server_stages"]["certseg_chain"]["inferences"] >= 8
    local = certify_image(local_runtime(models, spec), image, num_classes=NUM_CLASSES, sigma=SIGMA, n0=4, n=60,
                          alpha=0.01, seed=13)
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "crop.certified.png"), local.labels)


def test_version_mismatch_missing_model_and_unreachable_server_are_one_line_errors(served: TritonServer,
                                                                                  tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=f"version 0.*speaks version {REPOSITORY_VERSION}") as error:
        TritonRuntime([served.grpc_address], "certseg_segcertify_v0")
    assert "\n" not in str(error.value)
    with pytest.raises(ServerError, match="serves no ready model certseg_nope") as error:
        TritonRuntime([served.grpc_address], "certseg_nope")
    assert "certseg_denoisecertify" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ServerError, match="expected HOST:PORT"):
        TritonRuntime(["localhost"])
    nobody = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["certify", str(SAMPLE), "--server", nobody, "--out", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith(f"certseg: error: cannot reach a Triton server at {nobody}")
    assert not (tmp_path / "out").exists()


def test_killing_the_server_mid_run_gives_one_line_and_no_output(triton_runs: None, models: ModelFiles,
                                                                 tmp_path: Path) -> None:
    repository = write_repository(ModelFiles(segmenter=models.segmenter), tmp_path / "repository")
    out = tmp_path / "out"
    with TritonServer(repository, exit_timeout_s=0) as server:
        outcome = {}

        def certify() -> None:
            outcome["result"] = CliRunner().invoke(app, [
                "certify", str(SAMPLE), "--server", server.grpc_address, "--method", "segcertify", "--n", "20000",
                "--batch", "4", "--retries", "2", "--out", str(out), "--quiet",
            ])

        client = threading.Thread(target=certify)
        client.start()
        from tritonclient.grpc import InferenceServerClient

        watcher = InferenceServerClient(server.grpc_address)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.is_alive():
            done = server_statistics(watcher, server.grpc_address, ["certseg_segcertify"])
            if done.get("certseg_segcertify", {}).get("requests", 0) >= 4:
                break
            time.sleep(0.05)
        watcher.close()
        server.process.kill()  # SIGKILL to this server's own PID, mid-run
        client.join(timeout=60)
    assert not client.is_alive()
    result = outcome["result"]
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certseg: error: samples [") and "failed 3 times" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)
def test_default_repository_serves_the_shipped_models_like_in_process_onnx(
    triton_runs: None, image: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`certseg serve`'s default repository (shipped models, exported) certifies the shipped sample exactly as
    `certseg certify --runtime onnx` does for the same seed and torch thread count (the stage maths' resize rounds
    by it on some CPUs): identical label maps, counts and guesses."""
    from certseg.engine.runtimes.session import Session, Settings
    from certseg.export.default_repository import default_repository

    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings(method="denoisecertify", n0=10, n=100, batch=16, runtime="onnx", device="cpu")
    local, _ = Session.open(settings, threads=PINNED_TORCH_THREADS).certify(image, seed=21)
    with TritonServer(default_repository(max_batch=16, threads=PINNED_TORCH_THREADS), exit_timeout_s=0) as server:
        remote_session = Session.connect(settings, (server.grpc_address,))
        try:
            served, record = remote_session.certify(image, seed=21)
        finally:
            remote_session.close()
    assert record["models"]["segmenter"]["name"] == "procedural-hrnet-clean"
    assert record["pipeline"]["timestep"]["t"] == 73
    assert_same_certificate(local, served)
    assert 0.05 < local.certificate.certified.mean() < 1.0


def local_segcertify_labels(models: ModelFiles, image: np.ndarray, seed: int, count: int) -> np.ndarray:
    runtime = onnx_runtime(spec_for(image, "segcertify"), models.segmenter, batch_size=8)
    return np.concatenate(list(runtime.labels(image, sigma=SIGMA, seed=seed, start=0, count=count)))


def segcertify_request(image: np.ndarray, count: int, seg_size: tuple[int, int] | None = None) -> list:
    """A raw SegCertify request, as a client that ignores the server's limit would send it."""
    from tritonclient.grpc import InferInput

    values = {"IMAGE": (image, "FP32"), "SEED": (np.array([1], np.uint64), "UINT64"),
              "START": (np.array([0], np.int64), "INT64"), "COUNT": (np.array([count], np.int32), "INT32"),
              "SIGMA": (np.array([SIGMA], np.float64), "FP64"),
              "SEG_SIZE": (np.array(seg_size or image.shape[1:], np.int32), "INT32")}
    inputs = []
    for name, (array, dtype) in values.items():
        inputs.append(InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def test_requests_are_cut_by_bytes_and_one_above_the_limit_leaves_the_server_serving(
    limited: TritonServer, models: ModelFiles, crop: np.ndarray, tmp_path: Path
) -> None:
    """The client cuts its requests to the servers' max_request_bytes; an image that cannot fit is refused in
    one line saying how to raise the limit; a request above it is refused by the noise step before the noisy
    copies exist, and the same server process answers the next request."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    spec = spec_for(crop, "segcertify")
    reference = local_segcertify_labels(models, crop, seed=3, count=6)
    with remote_runtime(limited, spec, batch=8) as remote:
        assert remote.max_request_bytes == LIMITED_BYTES and remote.request_batch(crop.shape) == 2
        served_maps = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=3, start=0, count=6)))
        assert remote.answered == {limited.grpc_address: 3}
    np.testing.assert_array_equal(served_maps, reference)

    big = np.ascontiguousarray(np.tile(crop, (1, 2, 2)))  # one sample: 3 x 128 x 128 float32 = 196608 bytes
    with remote_runtime(limited, spec_for(big, "segcertify"), batch=8) as remote:
        with pytest.raises(ServerError, match=f"more than the {LIMITED_BYTES}-byte request limit") as error:
            list(remote.labels(big, sigma=SIGMA, seed=3, start=0, count=2))
    assert "max_request_bytes" in str(error.value) and "--max-request-bytes" in str(error.value)
    assert "\n" not in str(error.value)
    Image.fromarray((big.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(tmp_path / "big.png")
    result = CliRunner().invoke(app, ["certify", str(tmp_path / "big.png"), "--server", limited.grpc_address,
                                      "--method", "segcertify", "--n0", "2", "--n", "64", "--out",
                                      str(tmp_path / "out"), "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert lines[0].startswith("certseg: error: this 128x128 image is too large for one request")
    assert "--max-request-bytes" in lines[0]

    pid = limited.pid
    client = InferenceServerClient(limited.grpc_address)
    try:
        prepared = server_statistics(client, limited.grpc_address, ["certseg_prepare"])["certseg_prepare"]["requests"]
        with pytest.raises(InferenceServerException) as refused:  # 3 samples: 147456 bytes > LIMITED_BYTES
            client.infer("certseg_segcertify", segcertify_request(crop, count=3))
        assert "max_request_bytes" in refused.value.message() and "\n" not in refused.value.message()
        assert str(refused.value.status()) == "StatusCode.INVALID_ARGUMENT"
        after = server_statistics(client, limited.grpc_address, ["certseg_prepare"])["certseg_prepare"]["requests"]
        assert after == prepared  # refused at the first step: nothing reached the next one
        assert limited.process.poll() is None and limited.pid == pid
        answer = client.infer("certseg_segcertify", segcertify_request(crop, count=2)).as_numpy("LABELS")
    finally:
        client.close()
    np.testing.assert_array_equal(answer, local_segcertify_labels(models, crop, seed=1, count=2))


def test_a_hostile_segmenter_size_is_refused_by_the_step_that_would_allocate_it(
    limited: TritonServer, models: ModelFiles, crop: np.ndarray
) -> None:
    """SEG_SIZE comes from the client: a huge one is refused (one line, the limit named) before the segmenter
    input exists, and the same server process answers the next request."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    pid = limited.pid
    client = InferenceServerClient(limited.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("certseg_segcertify", segcertify_request(crop, count=1, seg_size=(20000, 20000)))
        message = refused.value.message()
        assert "certseg_prepare" in message and "max_request_bytes" in message and "\n" not in message
        assert str(refused.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert limited.process.poll() is None and limited.pid == pid
        answer = client.infer("certseg_segcertify", segcertify_request(crop, count=2)).as_numpy("LABELS")
    finally:
        client.close()
    np.testing.assert_array_equal(answer, local_segcertify_labels(models, crop, seed=1, count=2))


def test_grayscale_images_are_served_with_noise_in_their_own_channel(served: TritonServer, models: ModelFiles,
                                                                     image: np.ndarray) -> None:
    """A (1, H, W) image goes to the server as it is; its noise is drawn in one channel and replicated after, as
    in process (so the certificate holds in the gray image's own space), which differs from noising 3 copies."""
    gray = np.ascontiguousarray(image[:, :64, :128].mean(axis=0, keepdims=True))
    for method in ("denoisecertify", "segcertify"):
        spec = spec_for(gray, method)
        files = (models.segmenter, models.denoiser) if method == "denoisecertify" else (models.segcertify_segmenter,)
        local = np.concatenate(list(onnx_runtime(spec, *files, batch_size=4).labels(gray, sigma=SIGMA, seed=2,
                                                                                    start=0, count=6)))
        with remote_runtime(served, spec, batch=4) as remote:
            got = np.concatenate(list(remote.labels(gray, sigma=SIGMA, seed=2, start=0, count=6)))
            as_rgb = np.concatenate(list(remote.labels(np.repeat(gray, 3, axis=0), sigma=SIGMA, seed=2, start=0,
                                                       count=6)))
        np.testing.assert_array_equal(got, local)
        assert not np.array_equal(got, as_rgb)


def test_a_region_whose_request_failed_is_never_reused(
    limited: TritonServer, models: ModelFiles, crop: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that times out may still be answered into its output region later, over whichever chunk used
    the region next. With a request that sleeps past the client timeout among several in flight, no request
    that failed has its region used again, the maps equal the in-process ones, and when the call returns (the
    sleeper outlives it: the server has a second noise instance) no region is left registered or in /dev/shm."""
    import os

    from tritonclient.grpc import InferenceServerClient

    seed = 17
    plan = {"seed": seed, "sleep": [0], "seconds": 4.0}
    (limited.repository / "certseg_noise" / "1" / "misbehave.json").write_text(json.dumps(plan))
    events: list[tuple[str, str]] = []
    original = InferenceServerClient.async_infer

    def spy(self, model_name, inputs, callback, outputs=None, **options):  # records each request's output region
        region = outputs[0]._get_tensor().parameters["shared_memory_region"].string_param

        def answered(result, error):
            events.append(("failed" if error is not None else "answered", region))
            callback(result=result, error=error)

        events.append(("sent", region))
        return original(self, model_name, inputs, answered, outputs=outputs, **options)

    monkeypatch.setattr(InferenceServerClient, "async_infer", spy)
    with remote_runtime(limited, spec_for(crop, "segcertify"), batch=2, in_flight=3, timeout_s=1.5, retries=8,
                        shared_memory="on") as remote:
        served_maps = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=seed, start=0, count=12)))
    failed = [i for i, (kind, _) in enumerate(events) if kind == "failed"]
    assert failed
    for i in failed:
        assert ("sent", events[i][1]) not in events[i + 1:], f"region {events[i][1]} reused after its request failed"
    np.testing.assert_array_equal(served_maps, local_segcertify_labels(models, crop, seed=seed, count=12))
    client = InferenceServerClient(limited.grpc_address)
    try:
        registered = list(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    finally:
        client.close()
    ours = f"certseg_{os.getpid()}_"
    assert not [name for name in registered if name.startswith(ours)]
    assert not [p.name for p in Path("/dev/shm").glob(f"{ours}*")]
    assert remote.retired == {limited.grpc_address: len(failed)}


def test_a_pool_of_servers_that_would_draw_other_samples_is_refused_naming_the_field(
    limited: TritonServer, models: ModelFiles, crop: np.ndarray, tmp_path: Path
) -> None:
    """Same model files, another noise backend: a retried batch landing on the other server would get other
    noise, so the pool is refused in one line naming the field and both values (API and CLI)."""
    repository = write_repository(ModelFiles(segmenter=models.segmenter), tmp_path / "repository",
                                  noise_backend="torch")
    with TritonServer(repository, exit_timeout_s=0) as other:
        with pytest.raises(ServerError, match="different noise backend") as error:
            TritonRuntime([limited.grpc_address, other.grpc_address], "certseg_segcertify")
        message = str(error.value)
        assert "'numpy-philox' vs 'torch'" in message and limited.grpc_address in message and "\n" not in message
        Image.fromarray((crop.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(tmp_path / "crop.png")
        result = CliRunner().invoke(app, ["certify", str(tmp_path / "crop.png"), "--server", limited.grpc_address,
                                          "--server", other.grpc_address, "--method", "segcertify",
                                          "--out", str(tmp_path / "out"), "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "different noise backend" in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)
def test_the_default_repository_is_rebuilt_when_a_template_or_a_rendering_parameter_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached default repository is keyed by what it is made of: a changed template (or request limit)
    builds a new one, never serves the stale one. Export and rendering are stubbed; the key is real."""
    from types import SimpleNamespace

    import certseg.export.default_repository as default_module
    from certseg.export.default_repository import default_repository

    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path / "cache"))
    templates = tmp_path / "templates"
    shutil.copytree(default_module.templates_dir(), templates)
    monkeypatch.setattr(default_module, "templates_dir", lambda version=REPOSITORY_VERSION: templates)
    monkeypatch.setattr(default_module, "load_model", lambda name, role, **options: name)
    exported = ModelFiles(segmenter=tmp_path / "segmenter.onnx", metadata={"segmenter": {}})
    monkeypatch.setattr(default_module, "export_models", lambda *args, **options: SimpleNamespace(
        model_files=lambda: exported))
    built: list[dict] = []

    def write(files, target, **options):
        built.append(options)
        Path(target).mkdir(parents=True)
        (Path(target) / default_module.METADATA_FILE).write_text("{}")
        return Path(target)

    monkeypatch.setattr(default_module, "write_repository", write)
    first = default_repository()
    assert default_repository() == first and len(built) == 1
    noise_config = templates / "common" / "certseg_noise" / "config.pbtxt.in"
    noise_config.write_text(noise_config.read_text() + "# a changed template\n")
    second = default_repository()
    assert second != first and len(built) == 2
    third = default_repository(max_request_bytes=2**20)
    assert third not in (first, second) and built[-1]["max_request_bytes"] == 2**20
    fourth = default_repository(threads=2)  # certseg serve --threads 2
    assert fourth not in (first, second, third) and built[-1]["threads"] == 2
    assert default_repository(threads=0) == second and len(built) == 4  # no threads: the key it always had


def test_an_answer_that_is_not_the_one_asked_for_is_a_failed_attempt(
    limited: TritonServer, models: ModelFiles, crop: np.ndarray
) -> None:
    """Label maps of another size than the chunk's (here: the noise step reports an image one row too tall,
    once) are never counted: the attempt fails, is retried, and the maps equal the in-process ones."""
    seed = 23
    (limited.repository / "certseg_noise" / "1" / "misbehave.json").write_text(
        json.dumps({"seed": seed, "wrong_size": [2]}))
    with remote_runtime(limited, spec_for(crop, "segcertify"), batch=2, shared_memory="off") as remote:
        served_maps = np.concatenate(list(remote.labels(crop, sigma=SIGMA, seed=seed, start=0, count=6)))
        assert remote.answered == {limited.grpc_address: 3}
    np.testing.assert_array_equal(served_maps, local_segcertify_labels(models, crop, seed=seed, count=6))
    with remote_runtime(limited, spec_for(crop, "segcertify"), batch=2, shared_memory="off", retries=0) as remote:
        (limited.repository / "certseg_noise" / "1" / "misbehave.json").write_text(
            json.dumps({"seed": seed + 1, "wrong_size": [0]}))
        with pytest.raises(ServerError, match=r"answered LABELS of shape \(2, 65, 64\).*expected \(2, 64, 64\)"):
            list(remote.labels(crop, sigma=SIGMA, seed=seed + 1, start=0, count=2))


def test_max_request_bytes_flags_refuse_what_they_cannot_set_in_one_line(tmp_path: Path) -> None:
    from certseg.export.cli import app as export_app

    cases = [(app, ["serve", "--repository", str(tmp_path), "--max-request-bytes", "1000"],
              "a --repository keeps the one it was exported with (certseg-export --max-request-bytes N)"),
             (app, ["serve", "--max-request-bytes", "0"], "--max-request-bytes must be >= 1"),
             (export_app, ["--max-request-bytes", "0", "--repository", str(tmp_path / "r")],
              "--max-request-bytes must be >= 1")]
    for command, args, expected in cases:
        result = CliRunner().invoke(command, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and expected in lines[0], result.output


def test_your_own_onnx_models_are_served_unchanged_and_certify_as_in_process(triton_runs: None,
                                                                             tmp_path: Path) -> None:
    """`certseg-export --segmenter my.onnx --denoiser my.onnx` puts both files into the repository byte for byte
    (cpu and gpu profiles, their own I/O names in the configs, their normalisation and cosine schedule in the
    steps); the bundled server then certifies exactly as `certseg certify --segmenter my.onnx` in-process, with
    both ensembles (the segmenter takes a fixed 64x96 input, which the client learns from the server)."""
    import hashlib

    from byo_models import MMSEG
    from byo_models import export_denoiser as export_own_denoiser
    from byo_models import export_segmenter as export_own_segmenter

    from certseg.export import cli as export_cli

    segmenter = export_own_segmenter(tmp_path / "my_segmenter.onnx", fixed_size=(64, 96))
    denoiser = export_own_denoiser(tmp_path / "my_denoiser.onnx")
    digest = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (segmenter, denoiser)}
    for profile in ("cpu", "gpu"):
        result = CliRunner().invoke(export_cli.app, [
            "--segmenter", str(segmenter), "--denoiser", str(denoiser), "--out", str(tmp_path / f"export-{profile}"),
            "--repository", str(tmp_path / profile), "--profile", profile, "--no-tensorrt", "--max-batch", "8"])
        assert result.exit_code == 0, result.output
        root = tmp_path / profile
        assert hashlib.sha256((root / "certseg_segment" / "1" / "segmenter.onnx").read_bytes()).hexdigest() == \
            digest[segmenter]
        assert hashlib.sha256((root / "certseg_denoise" / "1" / "denoiser.onnx").read_bytes()).hexdigest() == \
            digest[denoiser]
        configs = read_configs(root)
        assert [i.name for i in configs["certseg_segment"].input] == ["pixels"]
        assert [o.name for o in configs["certseg_segment"].output] == ["scores"]
        assert [i.name for i in configs["certseg_denoise"].input] == ["latent", "t"]
        assert [o.name for o in configs["certseg_denoise"].output] == ["noise"]
        denoise_step = next(s for s in configs["certseg_denoisecertify"].ensemble_scheduling.step
                            if s.model_name == "certseg_denoise")
        assert dict(denoise_step.input_map) == {"latent": "x_t", "t": "timesteps"}
        for step in ("certseg_prepare", "certseg_resize"):
            assert json.loads(configs[step].parameters["normalization"].string_value)["mean"] == list(MMSEG.mean)
        assert json.loads(configs["certseg_scale"].parameters["schedule"].string_value)["name"] == "cosine"
        if profile == "gpu":
            assert configs["certseg_segment"].platform == "onnxruntime_onnx"
            assert configs["certseg_segment"].default_model_filename == "segmenter.onnx"
    common = ["--n0", "8", "--n", "64", "--seed", "13", "--batch", "8", "--quiet"]
    with TritonServer(tmp_path / "cpu", exit_timeout_s=0) as server:
        for method in ("denoisecertify", "segcertify"):
            result = CliRunner().invoke(app, ["certify", str(SAMPLE), "--server", server.grpc_address, "--method",
                                              method, "--out", str(tmp_path / f"served-{method}"), *common])
            assert result.exit_code == 0, result.output
    for method in ("denoisecertify", "segcertify"):
        result = CliRunner().invoke(app, ["certify", str(SAMPLE), "--segmenter", str(segmenter), "--denoiser",
                                          str(denoiser), "--method", method, "--out", str(tmp_path / f"local-{method}"),
                                          *common])
        assert result.exit_code == 0, result.output
        served, local = (tmp_path / f"{where}-{method}" for where in ("served", "local"))
        np.testing.assert_array_equal(read_labels(served / "street.certified.png"),
                                      read_labels(local / "street.certified.png"))
        served_report, local_report = (json.loads((folder / "street.json").read_text()) for folder in (served, local))
        assert served_report["pipeline"] == local_report["pipeline"]
        assert served_report["pipeline"]["segmenter_size"] == [64, 96]
        assert served_report["models"]["segmenter"]["sha256"] == digest[segmenter]
        assert served_report["classes"] == local_report["classes"]
        assert 0.0 < served_report["abstain_percent"] < 100.0
        if method == "denoisecertify":
            assert served_report["timestep"]["schedule"] == "cosine"
            assert served_report["models"]["denoiser"]["sha256"] == digest[denoiser]


def test_the_ensembles_take_exactly_the_request_schema_the_clients_send(models: ModelFiles, tmp_path: Path) -> None:
    """One source for the request: both ensembles' inputs are rendered from REQUEST_INPUTS, and request_values
    gives every scalar input in its declared dtype."""
    from certseg.engine.runtimes.triton_runtime import REQUEST_INPUTS, request_values

    configs = read_configs(write_repository(models, tmp_path / "repository"))
    for ensemble, denoising in (("certseg_denoisecertify", True), ("certseg_segcertify", False)):
        declared = [(i.name, DataType.Name(i.data_type), tuple(i.dims)) for i in configs[ensemble].input]
        expected = [(i.name, f"TYPE_{i.triton_type}", i.dims) for i in REQUEST_INPUTS
                    if denoising or not i.denoising_only]
        assert declared == expected
    values = request_values(seed=2**63 + 5, start=7, count=3, sigma=0.25, timestep=73, seg_size=(64, 128),
                            antialias=True)
    schema = {i.name: i for i in REQUEST_INPUTS}
    assert set(values) == set(schema) - {"IMAGE"}
    for name, array in values.items():
        assert array.dtype == schema[name].dtype and array.shape == tuple(max(d, 1) for d in schema[name].dims)
    assert int(values["SEED"][0]) == 2**63 + 5 and values["SEG_SIZE"].tolist() == [64, 128]


def test_the_http_benchmark_client_gets_the_same_maps_as_in_process(served: TritonServer, models: ModelFiles,
                                                                    image: np.ndarray) -> None:
    """bench/serving.py's HTTP client builds its requests from the same schema: same seed, same maps."""
    from certseg.bench.serving import HttpRuntime

    spec = spec_for(image)
    http = HttpRuntime(served.http_url.removeprefix("http://"), "certseg_denoisecertify", spec, batch=4, in_flight=2)
    try:
        got = np.concatenate(list(http.labels(image, sigma=SIGMA, seed=9, start=2, count=6)))
    finally:
        http.close()
    expected = np.concatenate(list(local_runtime(models, spec).labels(image, sigma=SIGMA, seed=9, start=2, count=6)))
    np.testing.assert_array_equal(got, expected)
