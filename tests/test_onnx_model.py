"""Bring-your-own ONNX models: certified through ``--segmenter/--denoiser FILE.onnx`` exactly as the same torch
modules are through the Python API, and every broken contract refused in one line naming what was expected."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from byo_models import (  # noqa: E402
    CLASSES,
    COSINE,
    DENOISER_SIZE,
    MMSEG,
    PALETTE,
    ExactDenoiser,
    ExactSegmenter,
    add_props,
    export_denoiser,
    export_segmenter,
    reference_label_fn,
)
from onnx import TensorProto, helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from certseg.engine.commands.cli import app  # noqa: E402
from certseg.engine.core.pipeline import certify_image  # noqa: E402
from certseg.engine.core.sampling import LocalRuntime  # noqa: E402
from certseg.engine.files.images import read_image, read_labels  # noqa: E402
from certseg.engine.maths.denoise import select_timestep  # noqa: E402
from certseg.engine.models.registry import shipped_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"
SIGMA = 0.25
COMMON = ["--n0", "8", "--n", "64", "--seed", "7", "--batch", "16", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("byo")
    return {"segmenter": export_segmenter(folder / "my_segmenter.onnx"),
            "denoiser": export_denoiser(folder / "my_denoiser.onnx")}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_image(EXAMPLE)


def certify_cli(*args: str) -> tuple[np.ndarray, dict]:
    out = Path(args[args.index("--out") + 1])
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), *args, *COMMON])
    assert result.exit_code == 0, result.output
    return read_labels(out / "street.certified.png"), json.loads((out / "street.json").read_text())


def test_an_onnx_segmenter_certifies_exactly_like_the_same_torch_module(files, image, tmp_path: Path) -> None:
    labels, report = certify_cli("--segmenter", str(files["segmenter"]), "--method", "segcertify",
                                 "--out", str(tmp_path))
    reference = certify_image(LocalRuntime(reference_label_fn(ExactSegmenter().eval()), batch_size=16), image,
                              num_classes=len(CLASSES), sigma=SIGMA, n0=8, n=64, seed=7)
    np.testing.assert_array_equal(labels, reference.labels)  # identical certificate, pixel for pixel
    assert len(np.unique(reference.guess)) > 1 and 0.05 < reference.certificate.certified.mean() < 0.999
    assert report["abstain_percent"] == pytest.approx(100 * (1 - reference.certificate.certified.mean()))
    model = report["models"]["segmenter"]
    assert model["family"] == "onnx" and model["role"] == "segmenter" and model["name"] == "my-segmenter"
    assert model["sha256"] == hashlib.sha256(files["segmenter"].read_bytes()).hexdigest()
    assert model["num_classes"] == 4 and model["classes"] == CLASSES and model["palette"] == PALETTE
    assert report["classes"] == CLASSES and report["settings"]["runtime"] == "onnx"
    assert report["pipeline"]["normalization"] == {"mean": list(MMSEG.mean), "std": list(MMSEG.std),
                                                   "input_range": [0.0, 255.0]}
    assert "onnxruntime" in report["memory"]["pipeline"]["untracked"]


def test_an_onnx_denoiser_on_the_cosine_schedule_certifies_like_the_torch_modules(files, image,
                                                                                 tmp_path: Path) -> None:
    """DenoiseCertify through both files: t* is chosen on the cosine schedule the denoiser's metadata names,
    and x_t and x̂0 use its ᾱ; the certificate equals the torch modules' through the stage functions."""
    labels, report = certify_cli("--segmenter", str(files["segmenter"]), "--denoiser", str(files["denoiser"]),
                                 "--out", str(tmp_path))
    choice = select_timestep(SIGMA, "principled", image_size=image.shape[1:], denoiser_size=DENOISER_SIZE,
                             schedule=COSINE)
    assert choice.t != select_timestep(SIGMA, "principled", image_size=image.shape[1:],
                                       denoiser_size=DENOISER_SIZE).t
    assert report["timestep"]["t"] == choice.t and report["timestep"]["schedule"] == "cosine"
    label_fn = reference_label_fn(ExactSegmenter().eval(), ExactDenoiser().eval(), t=choice.t)
    reference = certify_image(LocalRuntime(label_fn, batch_size=16), image, num_classes=len(CLASSES), sigma=SIGMA,
                              n0=8, n=64, seed=7)
    np.testing.assert_array_equal(labels, reference.labels)
    assert 0.05 < reference.certificate.certified.mean() < 0.999
    assert report["models"]["denoiser"]["schedule"] == {"name": "cosine", "num_timesteps": 1000}
    assert report["pipeline"]["denoiser_size"] == [DENOISER_SIZE, DENOISER_SIZE]


def test_a_fixed_size_segmenter_is_fed_its_size_and_flags_override_what_a_file_states(image, tmp_path: Path) -> None:
    """A graph fixed at 48x80 is fed 48x80 whatever the image; a file without props gets its normalisation and
    classes from --seg-mean/--seg-std/--classes (here the same [0, 255] statistics, given in [0, 1] units)."""
    plain = export_segmenter(tmp_path / "plain.onnx", fixed_size=(48, 80), props=False)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"classes": ["a", "b", "c", "d"], "palette": PALETTE}))
    in_unit_range = [f"{m / 255!r}" for m in MMSEG.mean], [f"{s / 255!r}" for s in MMSEG.std]
    labels, report = certify_cli("--segmenter", str(plain), "--method", "segcertify", "--seg-mean",
                                 *in_unit_range[0], "--seg-std", *in_unit_range[1], "--classes", str(names),
                                 "--out", str(tmp_path / "out"))
    assert report["pipeline"]["segmenter_size"] == [48, 80] and report["classes"] == ["a", "b", "c", "d"]
    (r, g, b), (sr, sg, sb) = ((float(v) for v in values) for values in in_unit_range)
    from certseg.engine.maths.stages import Normalization

    label_fn = reference_label_fn(ExactSegmenter().eval(), input_size=(48, 80),
                                  normalization=Normalization((r, g, b), (sr, sg, sb)))
    reference = certify_image(LocalRuntime(label_fn, batch_size=16), image, num_classes=4, sigma=SIGMA, n0=8,
                              n=64, seed=7)
    np.testing.assert_array_equal(labels, reference.labels)


@pytest.mark.skipif("procedural-adm" not in shipped_models(), reason="the shipped denoiser is not in engine/weights")
def test_an_onnx_segmenter_with_the_shipped_denoiser(files, image, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first BYO command: DenoiseCertify with the shipped denoiser, which ONNX Runtime runs from
    its cached export beside the file as given; equal to the torch segmenter behind that same exported graph."""
    from certseg.engine.maths.label_pipeline import LabelPipeline
    from certseg.engine.models.ort_module import OrtModule
    from certseg.engine.models.registry import load_model
    from certseg.engine.runtimes.onnx_runtime import export_paths
    from certseg.engine.runtimes.session import Session, Settings
    from certseg.export.cache import cached_export

    monkeypatch.setenv("CERTSEG_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings(segmenter=str(files["segmenter"]), runtime="onnx", n0=4, n=50, alpha=0.1, batch=8)
    session = Session.open(settings)
    result, record = session.certify(image, seed=2)
    assert record["models"]["denoiser"]["name"] == "procedural-adm" and record["settings"]["runtime"] == "onnx"
    folder = cached_export(None, load_model("procedural-adm", "denoiser"), image.shape[1:], scale=1.0, fp16=False)
    assert not (folder / "segmenter.onnx").exists()  # the file itself is used, never re-exported
    spec, _ = session.runtime_for(image.shape[1:])
    pipeline = LabelPipeline(spec, ExactSegmenter().eval(), OrtModule(export_paths(folder)["denoiser"]))
    reference = certify_image(LocalRuntime(pipeline, batch_size=8), image, num_classes=4, sigma=SIGMA, n0=4, n=50,
                              alpha=0.1, seed=2)
    np.testing.assert_array_equal(result.labels, reference.labels)


# ------------------------------------------------------------------------------------------- broken contracts


def graph_file(path: Path, inputs: list[tuple], outputs: list[tuple], nodes: list, props: dict | None = None) -> Path:
    """An ONNX file with these declared inputs/outputs (name, element type, dims) and nodes."""
    graph = helper.make_graph(nodes, "broken", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, str(path))
    return add_props(path, props or {})


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
IMAGE_IN = ("x", FLOAT, ["b", 3, "h", "w"])
SCORES = ("y", FLOAT, ["b", 4, "h", "w"])
TWO = [helper.make_node("Identity", ["x"], ["y"])]


def pad_to(channels: int) -> list:
    """Nodes y = x repeated to ``channels`` channels (Concat over dim 1)."""
    return [helper.make_node("Concat", ["x"] * channels, ["y"], axis=1)]


BROKEN: dict[str, tuple[list, list, list, dict, list[str], str]] = {
    # name: (inputs, outputs, nodes, props, extra arguments, what the one line must say)
    "wrong input rank": ([("x", FLOAT, ["b", 3, "h"])], [SCORES], TWO, {}, [],
                         "segmenter input 'x' has rank 3 (b, 3, h); expected (B, 3, H, W)"),
    "wrong output rank": ([IMAGE_IN], [("y", FLOAT, ["b", "h", "w"])], TWO, {}, [],
                          "segmenter output 'y' has rank 3 (b, h, w); expected class scores (B, K, h, w)"),
    "non-float output": ([IMAGE_IN], [("y", INT64, ["b", 1, "h", "w"])],
                         [helper.make_node("ArgMax", ["x"], ["y"], axis=1)], {}, [],
                         "segmenter output 'y' is int64; expected float32 class scores (B, K, h, w), not labels"),
    "K = 1": ([IMAGE_IN], [("y", FLOAT, ["b", 1, "h", "w"])],
              [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], {}, [],
              "segmenter output 'y' has K = 1 (b, 1, h, w); expected K >= 2 class scores"),
    "dynamic K": ([IMAGE_IN], [("y", FLOAT, ["b", "k", "h", "w"])], TWO, {}, [],
                  "segmenter output 'y' has a dynamic class dim 'k' (b, k, h, w); expected a fixed K"),
    "fixed batch": ([("x", FLOAT, [1, 3, "h", "w"])], [SCORES], TWO, {}, [],
                    "segmenter input 'x' has a fixed batch dim 1 (1, 3, h, w); expected a dynamic one"),
    "four channels": ([("x", FLOAT, ["b", 4, "h", "w"])], [SCORES], TWO, {}, [],
                      "segmenter input 'x' has 4 channels (dim 1 of (b, 4, h, w)); expected 3"),
    "two inputs": ([IMAGE_IN, ("z", FLOAT, ["b"])], [SCORES], TWO, {}, [],
                   "a segmenter takes one input (B, 3, H, W) float32; this graph takes 2 ('x', 'z')"),
    "fixed dims that do not match": ([("x", FLOAT, ["b", 3, 64, 64])], [("y", FLOAT, ["b", 6, 64, 64])],
                                     pad_to(2), {}, ["--seg-input-size", "32", "48"],
                                     "segmenter input 'x' is fixed at 64x64, but --seg-input-size makes it 32x48"),
    "one dynamic dim for H and W": ([("x", FLOAT, ["b", 3, "side", "side"])], [("y", FLOAT, ["b", 6, "side", "side"])],
                                    pad_to(2), {}, [], "declares H and W as one dynamic dim 'side' (square inputs "
                                    "only), but this 128x256 image at --scale 1.0 makes it 128x256"),
    "a batch that does not come back": ([IMAGE_IN], [("y", FLOAT, ["b", 3, "h", "w"])],
                                        [helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
                                            "axes", INT64, [1], [0])),
                                         helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], {},
                                        ["--batch", "10"], "output y came back (1, 3, 128, 256) for a batch of 10"),
    "classes that do not match K": ([IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2),
                                    {"certseg.classes": '["a", "b"]'}, [],
                                    "certseg.classes/certseg.palette: names 2 classes, but the segmenter has K = 6"),
    "a mean that is not 3 numbers": ([IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2),
                                     {"certseg.mean": "[0.5, 0.5]"}, [],
                                     "certseg.mean must be a list of 3 finite numbers, got [0.5, 0.5]"),
    "a [0, 255] mean on [0, 1] pixels": ([IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2),
                                         {"certseg.mean": "[123.675, 116.28, 103.53]"}, [],
                                         "lies outside the input range [0.0, 1.0]"),
    "--runtime torch": ([IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2), {}, ["--runtime", "torch"],
                        "is an ONNX graph, which --runtime torch cannot run: use --runtime onnx"),
    "--precision fp16": ([IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2), {},
                         ["--precision", "fp16", "--runtime", "onnx"], "runs as given (fp32): drop --precision fp16"),
    "--scale with a fixed input": ([("x", FLOAT, ["b", 3, 64, 64])], [("y", FLOAT, ["b", 6, 64, 64])], pad_to(2),
                                   {}, ["--scale", "0.5"], "takes a fixed 64x64 input, so --scale does not apply"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_segmenter_that_breaks_the_contract_is_one_line(case: str, tmp_path: Path) -> None:
    inputs, outputs, nodes, props, extra, message = BROKEN[case]
    path = graph_file(tmp_path / "broken.onnx", inputs, outputs, nodes, props)
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), "--segmenter", str(path), "--method", "segcertify",
                                      *extra, "--out", str(tmp_path / "out"), "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("certseg: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


X_T = ("x_t", FLOAT, ["b", 3, 32, 32])
EPS = ("eps", FLOAT, ["b", 3, 32, 32])
DENOISE = [helper.make_node("Identity", ["x_t"], ["eps"])]
BROKEN_DENOISERS: dict[str, tuple[list, list, list, dict, str]] = {
    "one input": ([X_T], [EPS], DENOISE, {},
                  "a denoiser takes two inputs, x_t (B, 3, S, S) float32 and timesteps (B,) int64; this graph takes 1"),
    "float timesteps": ([X_T, ("t", FLOAT, ["b"])], [EPS], DENOISE, {},
                        "denoiser input 't' is float32; expected int64 timesteps (B,)"),
    "two eps channels": ([X_T, ("t", INT64, ["b"])], [("eps", FLOAT, ["b", 2, 32, 32])],
                         [helper.make_node("Slice", ["x_t", "s", "e", "a"], ["eps"])], {},
                         "denoiser output 'eps' has 2 channels (b, 2, 32, 32); expected a fixed C >= 3"),
    "dynamic size": ([("x_t", FLOAT, ["b", 3, "s", "s"]), ("t", INT64, ["b"])], [("eps", FLOAT, ["b", 3, "s", "s"])],
                     DENOISE, {}, "has dynamic spatial dims; expected a fixed S x S, or the metadata prop "
                     "certseg.input_size"),
    "an unknown schedule": ([X_T, ("t", INT64, ["b"])], [EPS], DENOISE, {"certseg.schedule": "sqrt"},
                            "certseg.schedule: unknown noise schedule 'sqrt'; expected one of linear, cosine"),
}


@pytest.mark.parametrize("case", list(BROKEN_DENOISERS))
def test_a_denoiser_that_breaks_the_contract_is_one_line(case: str, files, tmp_path: Path) -> None:
    inputs, outputs, nodes, props, message = BROKEN_DENOISERS[case]
    path = graph_file(tmp_path / "broken.onnx", inputs, outputs, nodes, props)
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), "--segmenter", str(files["segmenter"]),
                                      "--denoiser", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("certseg: error: broken.onnx: ") and message in lines[0], lines[0]


def test_local_model_options_are_refused_with_servers_and_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), "--server", "127.0.0.1:1", "--seg-mean", "0.5", "0.5",
                                      "0.5", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "certseg: error: --seg-mean describes a local model; with --server the repository's models come with their "
        "own (certseg-export takes the same options)"]
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), "--segmenter", str(tmp_path / "nope.onnx"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "ONNX file" in result.output and "does not exist" in result.output


def test_certseg_export_writes_the_contract_into_its_own_graphs(tmp_path: Path) -> None:
    """An exported shipped-style segmenter and denoiser state their normalisation, classes and schedule, so the
    exported files themselves are bring-your-own models: certifying through them equals the checkpoints."""
    from certseg.engine.models.adm import build_adm
    from certseg.engine.models.hrnet import build_hrnet
    from certseg.engine.models.registry import save_model
    from certseg.engine.runtimes.session import Session, Settings
    from certseg.export import cli as export_cli
    from certseg.training.architectures import SMALL_ADM, SMALL_HRNET

    torch.manual_seed(0)
    adm = SMALL_ADM | {"image_size": 16, "attention_resolutions": "4"}
    save_model(tmp_path / "seg.safetensors", build_hrnet(SMALL_HRNET, 3), {
        "name": "tiny", "family": "hrnet", "config": {"model_cfg": SMALL_HRNET, "num_classes": 3},
        "classes": ["x", "y", "z"]})
    save_model(tmp_path / "den.safetensors", build_adm(adm), {"name": "tiny-adm", "family": "adm",
                                                              "config": {"create_model_kwargs": adm}})
    result = CliRunner().invoke(export_cli.app, [
        "--segmenter", str(tmp_path / "seg.safetensors"), "--denoiser", str(tmp_path / "den.safetensors"),
        "--out", str(tmp_path / "out"), "--image-size", "32", "48", "--no-fp16", "--no-parity", "--no-tensorrt"])
    assert result.exit_code == 0, result.output
    seg_props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "segmenter.onnx")).metadata_props}
    den_props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "denoiser.onnx")).metadata_props}
    assert json.loads(seg_props["certseg.mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(seg_props["certseg.std"]) == [0.229, 0.224, 0.225]
    assert json.loads(seg_props["certseg.input_range"]) == [0, 1] and seg_props["certseg.role"] == "segmenter"
    assert json.loads(seg_props["certseg.classes"]) == ["x", "y", "z"]
    assert den_props["certseg.schedule"] == "linear" and den_props["certseg.num_timesteps"] == "1000"
    crop = read_image(EXAMPLE)[:, :32, :48]
    results = []
    for seg, den in ((tmp_path / "seg.safetensors", tmp_path / "den.safetensors"),
                     (tmp_path / "out" / "segmenter.onnx", tmp_path / "out" / "denoiser.onnx")):
        session = Session.open(Settings(segmenter=str(seg), denoiser=str(den), runtime="onnx", n0=4, n=40,
                                        alpha=0.1, device="cpu"))
        results.append(session.certify(crop, seed=5))
    (from_checkpoints, record), (from_files, file_record) = results
    np.testing.assert_array_equal(from_checkpoints.labels, from_files.labels)
    np.testing.assert_array_equal(from_checkpoints.certificate.agree, from_files.certificate.agree)
    assert record["pipeline"] == file_record["pipeline"]
    assert file_record["models"]["segmenter"]["classes"] == ["x", "y", "z"]


def test_a_file_rewritten_at_the_same_path_is_loaded_again(tmp_path: Path) -> None:
    """A session opens the file as it is now, not a model cached from an earlier export to the same path."""
    from certseg.engine.runtimes.session import Session, Settings

    path = export_segmenter(tmp_path / "model.onnx")
    assert Session.open(Settings(segmenter=str(path), method="segcertify", runtime="onnx")).num_classes == 4
    graph_file(path, [IMAGE_IN], [("y", FLOAT, ["b", 6, "h", "w"])], pad_to(2))
    assert Session.open(Settings(segmenter=str(path), method="segcertify", runtime="onnx")).num_classes == 6
