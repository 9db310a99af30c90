"""HRNetV2: golden parity with the official code, the official W48 layout, presets, official checkpoint keying, ONNX."""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from certseg.engine.errors import CheckpointError
from certseg.engine.models.checkpoints import load_into
from certseg.engine.models.hrnet import (
    HRNET_W18,
    HRNET_W48,
    PRESETS,
    build_hrnet,
    build_preset,
    preset_factories,
)
from certseg.engine.models.registry import FAMILIES, Family, load_model

TOLERANCE = 1e-5
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def small(golden: Path) -> dict:
    """The golden config, its state dict (npz names with a '.') and its arrays (names without)."""
    config = json.loads((golden / "hrnet_small.json").read_text())
    arrays = np.load(golden / "hrnet_small.npz")
    return {
        "model_cfg": config["MODEL"],
        "num_classes": config["DATASET"]["NUM_CLASSES"],
        "state_dict": {k: torch.from_numpy(arrays[k]) for k in arrays.files if "." in k},
        "arrays": {k: arrays[k] for k in arrays.files if "." not in k},
    }


@pytest.fixture(scope="module")
def model(small: dict) -> torch.nn.Module:
    net = build_hrnet(small["model_cfg"], small["num_classes"]).eval()
    net.load_state_dict(small["state_dict"], strict=True)
    return net


def _run(net: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.from_numpy(x))


def _tsv_layout(reference: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) rows of the official state-dict listing; an empty shape column is a 0-d tensor."""
    rows = []
    for line in (reference / "hrnetv2-w48-cityscapes-state-dict.tsv").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split(",") if s), dtype))
    return rows


def _meta_layout(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in net.state_dict().items()]


def test_state_dict_is_official_order_and_shapes(small: dict) -> None:
    net = build_hrnet(small["model_cfg"], small["num_classes"])
    expected = [(k, tuple(t.shape)) for k, t in small["state_dict"].items()]
    assert [(k, tuple(t.shape)) for k, t in net.state_dict().items()] == expected


@pytest.mark.parametrize(("inp", "out"), [("x", "out"), ("x_odd", "out_odd")])
def test_golden_parity(model: torch.nn.Module, small: dict, inp: str, out: str) -> None:
    got = _run(model, small["arrays"][inp])
    want = torch.from_numpy(small["arrays"][out])
    assert got.shape == want.shape  # 1/4 resolution, ceil(ceil(H/2)/2), not upsampled
    assert (got - want).abs().max().item() <= TOLERANCE
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_golden_head_input(model: torch.nn.Module, small: dict) -> None:
    with torch.no_grad():
        feats = model.features(torch.from_numpy(small["arrays"]["x"]))
    assert (feats - torch.from_numpy(small["arrays"]["feat_concat"])).abs().max().item() <= TOLERANCE


def test_align_corners_follows_config_and_defaults_to_true(small: dict) -> None:
    cfg = copy.deepcopy(small["model_cfg"])
    cfg.pop("ALIGN_CORNERS", None)
    net = build_hrnet(cfg, small["num_classes"]).eval()
    assert net.align_corners is True  # the official config default; the Cityscapes yaml sets False
    net.load_state_dict(small["state_dict"], strict=True)
    want = small["arrays"]["out_odd"]
    assert np.abs(_run(net, small["arrays"]["x_odd"]).numpy() - want).max() > 1e-3


def test_inconsistent_stage_config_is_rejected(small: dict) -> None:
    cfg = copy.deepcopy(small["model_cfg"])
    cfg["EXTRA"]["STAGE3"]["NUM_BLOCKS"] = cfg["EXTRA"]["STAGE3"]["NUM_BLOCKS"][:-1]
    with pytest.raises(ValueError, match="STAGE3"):
        build_hrnet(cfg, small["num_classes"])


def test_w48_cityscapes_reproduces_official_layout(reference: Path) -> None:
    rows = _tsv_layout(reference)
    with torch.device("meta"):
        net = build_preset("hrnetv2-w48-cityscapes")
    assert _meta_layout(net) == rows
    n_params = sum(int(np.prod(shape)) for name, shape, _ in rows if not name.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert 65.8e6 < n_params < 66.0e6


def test_presets_differ_only_where_they_should() -> None:
    with torch.device("meta"):
        city = _meta_layout(build_preset("hrnetv2-w48-cityscapes"))
        pascal = _meta_layout(build_preset("hrnetv2-w48-pascal-context-59"))
        w18 = build_preset("hrnetv2-w18-cityscapes")
    changed = [(a[0], a[1], b[1]) for a, b in zip(city, pascal, strict=True) if a != b]
    assert changed == [
        ("last_layer.3.weight", (19, 720, 1, 1), (59, 720, 1, 1)),
        ("last_layer.3.bias", (19,), (59,)),
    ]
    assert w18.state_dict()["last_layer.0.weight"].shape == (270, 270, 1, 1)
    assert [k for k, _, _ in _meta_layout(w18)] == [k for k, _, _ in city]
    assert PRESETS["hrnetv2-w48-cityscapes"] == (HRNET_W48, 19)
    assert HRNET_W18["EXTRA"]["STAGE4"]["NUM_CHANNELS"] == [18, 36, 72, 144]
    with pytest.raises(ValueError, match="unknown HRNet preset"):
        build_preset("hrnetv2-w32-cityscapes")


def test_full_size_mismatch_names_the_w48_preset_that_fits() -> None:
    """A Pascal-Context checkpoint given for Cityscapes; layouts only, all on meta (no 264 MB of weights)."""
    with torch.device("meta"):
        cityscapes = build_preset("hrnetv2-w48-cityscapes")
        pascal = build_preset("hrnetv2-w48-pascal-context-59").state_dict()
    with pytest.raises(CheckpointError) as caught:
        load_into(cityscapes, pascal, presets=preset_factories(), model_name="hrnetv2-w48-cityscapes")
    assert str(caught.value).splitlines()[0] == (
        "the state dict does not fit hrnetv2-w48-cityscapes: 0 missing, 0 unexpected, 2 mis-shaped keys; "
        "it fits preset hrnetv2-w48-pascal-context-59"
    )


def _official_checkpoint(small: dict, path: Path, *, torch04: bool) -> None:
    """As tools/train.py saves it: FullModel keys (``model.`` + ``loss.criterion.weight``); torch 0.4 lacks BN
    step counters."""
    entries = {
        f"model.{k}": v for k, v in small["state_dict"].items() if not (torch04 and k.endswith("num_batches_tracked"))
    }
    entries["loss.criterion.weight"] = torch.ones(small["num_classes"])
    torch.save(entries, path)


def with_presets(monkeypatch: pytest.MonkeyPatch, presets: dict) -> None:
    """The HRNet family with ``presets`` as its only official presets (the golden small config is none)."""
    family = FAMILIES["hrnet"]
    monkeypatch.setitem(FAMILIES, "hrnet", Family(**{**family.__dict__, "presets": presets}))


@pytest.mark.parametrize("torch04", [False, True])
def test_the_one_loader_reads_official_hrnet_keying(small: dict, tmp_path: Path, torch04: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.`` prefix, ``loss.criterion.weight`` and torch-0.4 files without BN step counters load as is."""
    path = tmp_path / "best.pth"
    _official_checkpoint(small, path, torch04=torch04)
    with_presets(monkeypatch, {"small": {"model_cfg": small["model_cfg"], "num_classes": small["num_classes"]}})
    loaded = load_model(path, "segmenter")
    assert not loaded.module.training and loaded.extra["preset"] == "small"
    got = _run(loaded.module, small["arrays"]["x"])
    assert (got - torch.from_numpy(small["arrays"]["out"])).abs().max().item() <= TOLERANCE


def test_the_one_loader_picks_the_fitting_preset_or_names_the_closest(small: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pth"
    _official_checkpoint(small, path, torch04=True)
    right = {"model_cfg": small["model_cfg"], "num_classes": small["num_classes"]}
    wrong = {"model_cfg": small["model_cfg"], "num_classes": small["num_classes"] + 1}
    with_presets(monkeypatch, {"small-wrong": wrong, "small-right": right})
    assert load_model(path, "segmenter").extra["preset"] == "small-right"
    with_presets(monkeypatch, {"small-wrong": wrong})
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "segmenter")
    first = str(caught.value).splitlines()[0]
    assert "(closest: small-wrong): 0 missing, 0 unexpected, 2 mis-shaped keys" in first


def test_onnx_export_dynamic_batch_and_size(model: torch.nn.Module, small: dict) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(small["arrays"]["x"]),),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": axes, "logits": axes},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for inp, out in (("x", "out"), ("x_odd", "out_odd")):  # other batch size and an odd size than traced
        got = session.run(None, {"images": small["arrays"][inp]})[0]
        assert np.abs(got - small["arrays"][out]).max() <= 1e-4


@pytest.mark.full
def test_onnx_dynamo_export_dynamic_shapes(model: torch.nn.Module, small: dict, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.onnx.export(
        model, (torch.from_numpy(small["arrays"]["x"]),), dynamo=True, dynamic_shapes={"x": dims}
    )
    program.save(tmp_path / "hrnet.onnx")
    session = ort.InferenceSession(str(tmp_path / "hrnet.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for inp, out in (("x", "out"), ("x_odd", "out_odd")):
        got = session.run(None, {name: small["arrays"][inp]})[0]
        assert np.abs(got - small["arrays"][out]).max() <= 1e-4
