"""ONNX export: ORT vs PyTorch parity (fp32, fp16), dynamic batch/size, external data, the label pipeline on ORT,
and ``certseg-export`` end to end, all on tiny models with unit-scale random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from certseg.engine.digest import file_sha256  # noqa: E402
from certseg.engine.errors import InputError  # noqa: E402
from certseg.engine.maths.label_pipeline import LabelPipeline, make_spec  # noqa: E402
from certseg.engine.models.adm import build_adm  # noqa: E402
from certseg.engine.models.hrnet import build_hrnet  # noqa: E402
from certseg.engine.models.ort_module import OrtModule  # noqa: E402
from certseg.engine.models.registry import save_model  # noqa: E402
from certseg.engine.runtimes.onnx_runtime import onnx_runtime, onnx_runtime_from_export  # noqa: E402
from certseg.engine.runtimes.torch_runtime import torch_runtime  # noqa: E402
from certseg.export import cli  # noqa: E402
from certseg.export.denoiser import export_denoiser  # noqa: E402
from certseg.export.exported_graph import ExportedGraph  # noqa: E402
from certseg.export.parity import check_parity, denoiser_parity_inputs, segmenter_parity_inputs  # noqa: E402
from certseg.export.segmenter import export_segmenter  # noqa: E402
from certseg.training.architectures import SMALL_HRNET  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 2e-2
"""FP16 graphs against fp32 torch, relative to the output scale (max |ref|). Measured on these models:
~1e-3 (ε) and ~3e-3 (logits); the golden ADM gives 7e-4 on ε of scale 1.5 at every t (timestep embedding fp32)."""
FP16_AGREEMENT = 0.99
IMAGE_SIZE = (48, 80)  # 1.5 and 2.5 times the denoiser size: non-integer resize ratios
NUM_CLASSES = 5
TINY_ADM: dict[str, Any] = {
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "2",
    "num_head_channels": 16, "learn_sigma": True, "use_scale_shift_norm": True, "resblock_updown": True,
}
"""learn_sigma: 6 output channels, so the export's ε slice is exercised."""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_scale(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights N(0, 1/fan_in), biases N(0, 0.1), norm scales U(0.5, 1.5), BN statistics perturbed: every
    parameter matters and activations stay O(1), so fp16 errors are representative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.dim() >= 2:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + 1.5 * torch.rand(tensor.shape, generator=generator))
            elif name.endswith("weight"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def denoiser() -> torch.nn.Module:
    return unit_scale(build_adm(TINY_ADM), seed=1)


@pytest.fixture(scope="module")
def segmenter() -> torch.nn.Module:
    return unit_scale(build_hrnet(SMALL_HRNET, NUM_CLASSES), seed=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, denoiser, segmenter) -> dict[str, ExportedGraph]:
    out = tmp_path_factory.mktemp("onnx")
    return {
        "denoiser": export_denoiser(denoiser, out / "denoiser.onnx", image_size=32, fp16=True, threads=1),
        "segmenter": export_segmenter(segmenter, out / "segmenter.onnx", example_size=IMAGE_SIZE, fp16=True,
                                      threads=1),
    }


def test_graph_io_contract(exported) -> None:
    den, seg = exported["denoiser"], exported["segmenter"]
    assert [(s.name, s.dtype, s.shape) for s in den.inputs] == [
        ("x_t", "float32", ("batch", 3, 32, 32)), ("timesteps", "int64", ("batch",))]
    assert [(s.name, s.dtype, s.shape) for s in den.outputs] == [("eps", "float32", ("batch", 3, 32, 32))]
    assert [(s.name, s.dtype, s.shape) for s in seg.inputs] == [("images", "float32", ("batch", 3, "height", "width"))]
    assert [(s.name, s.dtype, s.shape) for s in seg.outputs] == [
        ("logits", "float32", ("batch", NUM_CLASSES, "out_height", "out_width"))]
    assert seg.dynamic_size and not den.external_data and not seg.external_data
    for graph in exported.values():  # fp16 keeps float32 I/O
        fp16_inputs = [(i.name, i.type.tensor_type.elem_type) for i in onnx.load(str(graph.fp16_path)).graph.input]
        assert [t for _, t in fp16_inputs] == [
            onnx.TensorProto.INT64 if n == "timesteps" else onnx.TensorProto.FLOAT for n, _ in fp16_inputs]


def test_fp32_parity_at_batch_1_and_3(exported) -> None:
    for role, graph in exported.items():
        assert [p["batch"] for p in graph.parity["fp32"]] == [1, 3]  # the trace used batch 2
        for stats in graph.parity["fp32"]:
            assert stats["max_abs"] <= FP32_TOL, (role, stats)
            assert stats["ref_max_abs"] > 0.5, (role, stats)  # outputs are O(1), so the tolerance means something
            assert stats["argmax_agreement"] == 1.0, (role, stats)


def test_check_parity_on_fresh_inputs(exported, denoiser, segmenter) -> None:
    x_t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([0, 500, 999])
    stats = check_parity(lambda x, t: denoiser(x, t)[:, :3], exported["denoiser"].path, (x_t, timesteps), threads=1)
    assert stats["max_abs"] <= FP32_TOL
    odd = segmenter_parity_inputs((37, 61), 2, seed=3)  # another batch and an odd size than traced
    stats = check_parity(segmenter, exported["segmenter"].path, (odd,), threads=1)
    assert stats["max_abs"] <= FP32_TOL and stats["argmax_agreement"] == 1.0


def test_fp16_parity(exported) -> None:
    for role, graph in exported.items():
        for stats in graph.parity["fp16"]:
            assert stats["max_abs"] <= FP16_TOL * max(1.0, stats["ref_max_abs"]), (role, stats)
            if role == "segmenter":
                assert stats["argmax_agreement"] >= FP16_AGREEMENT, stats


def test_fp16_timestep_embedding_stays_fp32(exported) -> None:
    """The sin/cos arguments t·f are computed in fp32, with no fp16 round trip in between; weights are fp16."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exported["denoiser"].fp16_path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in trig:  # t·f is computed in fp32, not cast up from an fp16 product
        assert producers[node.input[0]].op_type == "Mul"
    weights = {init.name: init.data_type for init in model.graph.initializer}
    assert set(weights.values()) == {onnx.TensorProto.FLOAT16}  # the embedding MLPs' weights are fp16 too


def test_ort_module_checks_fixed_dims(exported) -> None:
    module = OrtModule(exported["denoiser"].path, threads=1)
    assert list(module.parameters()) == [] and module.input_names == ["x_t", "timesteps"]
    with pytest.raises(InputError, match="expects x_t of shape"):
        module(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64))


def test_label_pipeline_on_ort_equals_torch(exported, denoiser, segmenter) -> None:
    """Same labels from the torch pipeline and from the same pipeline with OrtModule models."""
    spec = make_spec("denoisecertify", 0.25, IMAGE_SIZE, denoiser_size=(32, 32))
    torch_pipeline = LabelPipeline(spec, segmenter, denoiser).eval()
    ort_pipeline = LabelPipeline(spec, OrtModule(exported["segmenter"].path, threads=1),
                                 OrtModule(exported["denoiser"].path, threads=1)).eval()
    generator = torch.Generator().manual_seed(11)
    clean = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 10, generator=generator), size=IMAGE_SIZE,
                                            mode="bilinear", align_corners=False)
    noisy = clean + 0.25 * torch.randn(6, 3, *IMAGE_SIZE, generator=generator)
    with torch.no_grad():
        expected, got = torch_pipeline(noisy), ort_pipeline(noisy)
    assert got.dtype == expected.dtype == torch.uint8
    assert torch.equal(got, expected)


def test_onnx_runtime_follows_the_sampling_contract(exported, denoiser, segmenter) -> None:
    spec = make_spec("denoisecertify", 0.5, IMAGE_SIZE, denoiser_size=(32, 32))
    image = np.random.default_rng(0).random((3, *IMAGE_SIZE), dtype=np.float32)
    ort = onnx_runtime(spec, exported["segmenter"].path, exported["denoiser"].path, batch_size=3, threads=1)
    reference = torch_runtime(LabelPipeline(spec, segmenter, denoiser), device=torch.device("cpu"), batch_size=4)
    got = np.concatenate(list(ort.labels(image, sigma=0.5, seed=3, start=5, count=7)))
    want = np.concatenate(list(reference.labels(image, sigma=0.5, seed=3, start=5, count=7)))
    assert got.shape == (7, *IMAGE_SIZE) and np.array_equal(got, want)
    segcertify = onnx_runtime(make_spec("segcertify", 0.5, IMAGE_SIZE), exported["segmenter"].path, None, threads=1)
    assert next(segcertify.labels(image, sigma=0.5, seed=3, start=0, count=2)).shape == (2, *IMAGE_SIZE)


def test_external_data_with_a_forced_threshold(tmp_path: Path, denoiser) -> None:
    path = tmp_path / "denoiser.onnx"
    (tmp_path / "denoiser.onnx.data").write_bytes(b"stale" * 1000)  # onnx would append to it
    graph = export_denoiser(denoiser, path, image_size=32, external_data_threshold=0, parity_batches=(2,), threads=1)
    weights = sum(p.numel() * 4 for p in denoiser.parameters())
    data = tmp_path / "denoiser.onnx.data"
    assert graph.external_data and graph.data_path == data and graph.files() == [path, data]
    assert path.stat().st_size < 0.1 * weights < 9 * weights <= 10 * data.stat().st_size < 11 * weights
    assert graph.parity["fp32"][0]["max_abs"] <= FP32_TOL
    (tmp_path / "elsewhere").mkdir()  # the data file is found by name, beside the graph
    with pytest.raises(InputError, match="cannot load"):
        OrtModule(graph.path.rename(tmp_path / "elsewhere" / "denoiser.onnx"), threads=1)


def test_denoiser_parity_inputs_cover_the_schedule() -> None:
    x_t, timesteps = denoiser_parity_inputs((8, 8), 4)
    assert x_t.shape == (4, 3, 8, 8) and timesteps.tolist() == [999, 73, 144, 258]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, denoiser, segmenter) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    seg, den = folder / "tiny-hrnet.safetensors", folder / "tiny-adm.safetensors"
    save_model(seg, segmenter, {"name": "tiny-hrnet", "role": "segmenter", "family": "hrnet",
                                "config": {"model_cfg": SMALL_HRNET, "num_classes": NUM_CLASSES}})
    save_model(den, denoiser, {"name": "tiny-adm", "role": "denoiser", "family": "adm",
                               "config": {"create_model_kwargs": TINY_ADM}})
    return seg, den


def test_cli_end_to_end(tmp_path: Path, checkpoints) -> None:
    seg, den = checkpoints
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli.app, [
        "--segmenter", str(seg), "--denoiser", str(den), "--out", str(out), "--image-size", "48", "80",
        "--max-batch", "4", "--threads", "1",
    ])
    assert result.exit_code == 0, result.output
    names = {"segmenter.onnx", "segmenter.fp16.onnx", "denoiser.onnx", "denoiser.fp16.onnx", "export.json"}
    assert names <= {p.name for p in out.iterdir()}
    record = json.loads((out / "export.json").read_text())
    assert record["image_size"] == [48, 80] and record["segmenter_size"] == [48, 80]
    assert record["denoiser_size"] == [32, 32] and record["max_batch"] == 4
    assert record["models"]["segmenter"]["sha256"] == file_sha256(seg)
    assert record["models"]["denoiser"]["sha256"] == file_sha256(den)
    graphs = record["graphs"]
    assert graphs["denoiser"]["inputs"][1] == {"name": "timesteps", "dtype": "int64", "shape": ["batch"]}
    assert graphs["segmenter"]["outputs"][0]["name"] == "logits" and graphs["segmenter"]["opset"] == 18
    for graph in graphs.values():
        assert all(p["max_abs"] <= FP32_TOL for p in graph["parity"]["fp32"])
        assert len(graph["parity"]["fp16"]) == 2 and graph["seconds"]["export"] > 0
    files = {f["file"]: f for f in record["files"]}
    assert files["denoiser.onnx"]["sha256"] == file_sha256(out / "denoiser.onnx")
    assert record["versions"]["onnxruntime"] and record["versions"]["torch"]
    if record["versions"]["tensorrt"] is None:
        assert record["tensorrt"]["segmenter"]["status"] == "skipped"
        assert "TensorRT is not installed" in result.output
    # the folder drives the ONNX runtime directly, fp16 graphs included
    spec = make_spec("denoisecertify", 0.25, IMAGE_SIZE, denoiser_size=(32, 32))
    runtime = onnx_runtime_from_export(spec, out, precision="fp16", threads=1,
                                       expected_sha256={"segmenter": file_sha256(seg), "denoiser": file_sha256(den)})
    image = np.full((3, *IMAGE_SIZE), 0.5, dtype=np.float32)
    assert next(runtime.labels(image, sigma=0.25, seed=0, start=0, count=2)).shape == (2, *IMAGE_SIZE)
    with pytest.raises(InputError, match="other weights"):
        onnx_runtime_from_export(spec, out, expected_sha256={"segmenter": "0" * 64})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--segmenter", "/nonexistent/model.safetensors"], "error: "),
        (["--segmenter", "{seg}", "--method", "segcertify", "--image-size", "48", "80", "--opset", "17"],
         "opset must be >= 18"),
        (["--segmenter", "{seg}", "--method", "segcertify"], "pass --image-size H W"),
        (["--segmenter", "{seg}", "--method", "segcertify", "--image-size", "48", "80", "--max-batch", "0"],
         "max batch must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, checkpoints, args: list[str], message: str) -> None:
    args = [a.format(seg=checkpoints[0]) for a in args] + ["--out", str(tmp_path), "--no-parity", "--no-fp16"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("certseg-export: error: ") and message in lines[-1]


def test_cli_repository_hook(tmp_path: Path, checkpoints) -> None:
    """--repository hands the export to certseg.export.repository.write_repository, or says it is missing."""
    try:
        import certseg.export.repository  # noqa: F401
    except ModuleNotFoundError:
        writer = False
    else:
        writer = True
    result = CliRunner().invoke(cli.app, [
        "--segmenter", str(checkpoints[0]), "--method", "segcertify", "--image-size", "48", "80", "--out",
        str(tmp_path / "x"), "--no-fp16", "--no-parity", "--no-tensorrt", "--max-batch", "4",
        "--repository", str(tmp_path / "repo"), "--profile", "cpu",
    ])
    assert (tmp_path / "x" / "segmenter.onnx").is_file()
    if not writer:
        assert result.exit_code == 1 and "repository writer" in result.output
        return
    assert result.exit_code == 0, result.output  # the repository's layout is the writer's own tests' business
    assert "wrote the Triton model repository" in result.output and any((tmp_path / "repo").iterdir())


def test_vit_adapter_exports_at_a_fixed_size(tmp_path: Path, golden: Path) -> None:
    """ViT-Adapter (scores, not logits) through the same export path, legacy exporter, fixed crop size."""
    from certseg.engine.models.vit_adapter import build_vit_adapter

    cfg = json.loads((golden / "vit_adapter_small.json").read_text())
    with np.load(golden / "vit_adapter_small.npz") as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files if "." in k}
    model = build_vit_adapter(cfg["mmseg_model_cfg"]).eval()
    model.load_state_dict(state, strict=True)
    graph = export_segmenter(model, tmp_path / "vit.onnx", example_size=model.crop_size, fp16=True, threads=1)
    h, w = model.crop_size
    assert not graph.dynamic_size and "fixed crop" in graph.notes[0]
    assert graph.outputs[0].shape == ("batch", model.num_classes, h, w)
    for stats in graph.parity["fp32"]:
        assert stats["max_abs"] <= FP32_TOL and stats["argmax_agreement"] == 1.0
    for stats in graph.parity["fp16"]:
        assert stats["argmax_agreement"] >= FP16_AGREEMENT
    with pytest.raises(InputError, match="fixed dims"):
        OrtModule(graph.path, threads=1)(torch.zeros(1, 3, h + 8, w))


@pytest.mark.full
@pytest.mark.parametrize("role", ["denoiser", "segmenter"])
def test_dynamo_exporter(tmp_path: Path, role: str, denoiser, segmenter) -> None:
    """torch.export-based exporter: same contract and parity (about 10x slower than legacy here)."""
    pytest.importorskip("onnxscript")
    if role == "denoiser":
        graph = export_denoiser(denoiser, tmp_path / "d.onnx", image_size=32, exporter="dynamo", threads=1)
    else:
        graph = export_segmenter(segmenter, tmp_path / "s.onnx", example_size=IMAGE_SIZE, exporter="dynamo",
                                 threads=1)
        assert graph.dynamic_size
    assert [s.name for s in graph.inputs] == (["x_t", "timesteps"] if role == "denoiser" else ["images"])
    assert all(p["max_abs"] <= FP32_TOL for p in graph.parity["fp32"])


def test_a_killed_exports_staging_folder_is_removed_at_the_next_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first ``--runtime onnx`` killed mid-export leaves ``<key>.partial-<pid>``; the next export removes it
    (its process is gone) but not the staging folder of an export still running (this process)."""
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    from certseg.export import cache

    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / "onnx" / f"0123456789abcdef.partial-{gone.pid}"
    running = tmp_path / "onnx" / f"fedcba9876543210.partial-{os.getpid()}"
    for folder in (stale, running):
        (folder / "graphs").mkdir(parents=True)
        (folder / "graphs" / "half-written.onnx").write_bytes(b"\0" * 64)

    def fake_export(segmenter: Any, denoiser: Any, out_dir: Path, **kwargs: Any) -> None:
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "export.json").write_text("{}")

    monkeypatch.setattr(cache, "export_models", fake_export)
    model: Any = SimpleNamespace(sha256="0" * 64, name="m", extra={}, config={}, input_size=None)
    folder = cache.cached_export(model, None, (32, 64), scale=1.0, fp16=False)
    assert (folder / "export.json").is_file()
    assert not stale.exists() and running.is_dir()
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([folder.name, running.name])
