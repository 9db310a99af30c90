"""ViT-Adapter (BEiT-Adapter + Mask2Former): golden parity, official layouts, checkpoint loading, ONNX export.

Configs, shapes and inputs come from the golden JSON/npz (a hidden fixture set with another small config uses
the same names), never from constants written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from certseg.engine.errors import CheckpointError, InputError
from certseg.engine.models import registry
from certseg.engine.models.mask2former import semantic_inference
from certseg.engine.models.registry import FAMILIES, Family, load_model
from certseg.engine.models.vit_adapter import (
    PRESETS,
    ViTAdapterSegmenter,
    build_vit_adapter,
    slide_inference,
    slide_windows,
)

PARITY = 1e-4  # README: max |ours - golden| on `out` and `slide_seg`
FULL_PARAMETERS = {"cityscapes": 570_405_332, "pascal_context_59": 567_051_772}
TSV_NAMES = {"cityscapes": "cityscapes", "pascal_context_59": "pascal-context-59"}


@pytest.fixture(scope="module")
def fixture(golden: Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = golden / "vit_adapter_small"
    with np.load(path.with_suffix(".npz")) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return json.loads(path.with_suffix(".json").read_text()), arrays


def state_dict_of(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The npz's state-dict entries (names with a dot), in file order."""
    return {name: torch.from_numpy(value) for name, value in arrays.items() if "." in name}


@pytest.fixture(scope="module")
def model(fixture) -> ViTAdapterSegmenter:
    cfg, arrays = fixture
    net = build_vit_adapter(cfg["mmseg_model_cfg"])
    net.load_state_dict(state_dict_of(arrays), strict=True)
    return net


def max_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.detach().numpy() - ref).max())


def test_state_dict_equals_official_names_and_order(fixture) -> None:
    cfg, arrays = fixture
    net = build_vit_adapter(cfg["mmseg_model_cfg"])
    ours = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    assert list(ours.items()) == [(key, value.shape) for key, value in arrays.items() if "." in key]
    assert len(ours) == cfg["num_state_dict_entries"]
    assert sum(p.numel() for p in net.parameters()) == cfg["num_parameters"]


@torch.no_grad()
def test_golden_out_and_slide(model, fixture) -> None:
    _, arrays = fixture
    out = model(torch.from_numpy(arrays["x"]))
    assert max_err(out, arrays["out"]) <= PARITY
    assert (out.argmax(1).numpy() == arrays["out"].argmax(1)).all()
    slide = slide_inference(model, torch.from_numpy(arrays["x_slide"]))
    assert slide.shape == arrays["slide_seg"].shape
    assert max_err(slide, arrays["slide_seg"]) <= PARITY
    assert (slide.argmax(1).numpy() == arrays["slide_seg"].argmax(1)).all()
    assert torch.equal(model(torch.from_numpy(arrays["x_slide"])), slide)  # forward slides off-crop sizes


@torch.no_grad()
def test_golden_out_after_folding_batchnorm(fixture) -> None:
    """certify folds the adapter's conv → BatchNorm pairs (``Settings.fold_batchnorm``): the golden output holds."""
    from certseg.engine.models.fold_batchnorm import fold_batchnorm

    cfg, arrays = fixture
    net = build_vit_adapter(cfg["mmseg_model_cfg"])
    net.load_state_dict(state_dict_of(arrays), strict=True)
    norms = sum(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert fold_batchnorm(net.eval()) > 0
    assert sum(type(m) is torch.nn.BatchNorm2d for m in net.modules()) < norms
    with torch.no_grad():
        out = net(torch.from_numpy(arrays["x"]))
    assert max_err(out, arrays["out"]) <= PARITY
    assert (out.argmax(1).numpy() == arrays["out"].argmax(1)).all()


def test_golden_intermediates(model, fixture) -> None:
    _, arrays = fixture
    feats = model.backbone(torch.from_numpy(arrays["x"]))
    mask_features, memories = model.decode_head.pixel_decoder(feats)
    cls_list, mask_list = model.decode_head(feats)
    ours = {f"feat_c{i + 1}": feat for i, feat in enumerate(feats)}
    ours |= {f"memory_{i}": memory for i, memory in enumerate(memories)}
    ours |= {
        "mask_features": mask_features,
        "cls_pred_all": torch.stack(cls_list),
        "mask_pred_all": torch.stack(mask_list),
        "seg_mask": semantic_inference(cls_list[-1], mask_list[-1]),
    }
    for name, value in ours.items():
        ref = arrays[name]
        assert value.shape == ref.shape, name
        assert max_err(value, ref) <= PARITY * max(1.0, float(np.abs(ref).max())), name


def test_layer_norm_eps() -> None:
    """The fixture cannot see eps 1e-5 vs 1e-6 in the backbone (5.7e-5 < bar): check it by hand."""
    with torch.device("meta"):
        net = build_vit_adapter(PRESETS["pascal_context_59"])
    backbone = {m.eps for m in net.backbone.modules() if isinstance(m, nn.LayerNorm)}
    head = {m.eps for m in net.decode_head.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    batch_norm = {m.eps for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    assert (backbone, head, batch_norm) == ({1e-6}, {1e-5}, {1e-5})


def test_slide_windows_match_official(fixture) -> None:
    cfg, arrays = fixture
    windows = cfg.get("stats", {}).get("case_slide", {}).get("windows")
    if windows is None:
        pytest.skip("fixture lists no slide windows")
    test_cfg = cfg["mmseg_model_cfg"]["test_cfg"]
    size = arrays["x_slide"].shape[-2:]
    assert slide_windows(size, test_cfg["crop_size"], test_cfg["stride"]) == [tuple(w) for w in windows]


@torch.no_grad()
def test_slide_pads_images_smaller_than_the_crop(model) -> None:
    """A side below the crop is zero-padded (normalised space, bottom/right) to it; a larger side slides.

    With stride = crop, a width of crop + 31 gives the windows [0, crop) and [31, crop + 31).
    """
    crop_h, crop_w = model.crop_size
    segmenter = ViTAdapterSegmenter(model.backbone, model.decode_head, model.crop_size, model.crop_size)
    height, width = crop_h - 17, crop_w + 31
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    out = segmenter(x)
    assert out.shape == (2, model.num_classes, height, width)
    padded = F.pad(x, (0, 0, 0, crop_h - height))
    left = model.encode_decode(padded[..., :crop_w])[..., :height, :]
    right = model.encode_decode(padded[..., 31:])[..., :height, :]
    expected = torch.cat([left[..., :31], (left[..., 31:] + right[..., :-31]) / 2, right[..., -31:]], dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="exactly"):
        model.encode_decode(x)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_preset_layout_on_meta(preset: str, reference: Path) -> None:
    with torch.device("meta"):
        net = build_vit_adapter(PRESETS[preset])
    rows = (reference / f"vit-adapter-beit-large-{TSV_NAMES[preset]}-state-dict.tsv").read_text().splitlines()
    expected = [tuple(row.split("\t")) for row in rows]
    ours = [
        (key, ",".join(map(str, value.shape)), str(value.dtype).removeprefix("torch."))
        for key, value in net.state_dict().items()
    ]
    assert ours == expected
    assert sum(p.numel() for p in net.parameters()) == FULL_PARAMETERS[preset]


def mmcv_checkpoint(arrays: dict[str, np.ndarray], prefix: str = "") -> dict:
    """A released-style checkpoint: runner format, official keys, no relative_position_index buffers."""
    state = {
        prefix + key: value.clone()
        for key, value in state_dict_of(arrays).items()
        if not key.endswith("relative_position_index")
    }
    return {"meta": {"CLASSES": ["a", "b"], "PALETTE": [[0, 0, 0], [1, 1, 1]]}, "state_dict": state}


def only_preset(monkeypatch: pytest.MonkeyPatch, cfg: dict) -> None:
    """The ViT-Adapter family with the golden small config as its only official preset."""
    family = FAMILIES["vit_adapter"]
    preset = {"model_cfg": cfg["mmseg_model_cfg"], "num_classes": registry.vit_num_classes(cfg["mmseg_model_cfg"])}
    monkeypatch.setitem(FAMILIES, "vit_adapter", Family(**{**family.__dict__, "presets": {"small": preset}}))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_loader_rebuilds_relative_position_index(fixture, tmp_path: Path, prefix: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A released mmcv checkpoint (runner format, no index buffers) through the one loader: indices rebuilt."""
    cfg, arrays = fixture
    path = tmp_path / "released.pth"
    torch.save(mmcv_checkpoint(arrays, prefix), path)
    only_preset(monkeypatch, cfg)
    real_build = FAMILIES["vit_adapter"].build

    def build_with_zeroed_indices(config):
        net = real_build(config)
        for name, buffer in net.named_buffers():
            if name.endswith("relative_position_index"):
                buffer.zero_()  # the loader must rebuild them, not keep the built ones by luck
        return net

    family = FAMILIES["vit_adapter"]
    monkeypatch.setitem(FAMILIES, "vit_adapter", Family(**{**family.__dict__, "build": build_with_zeroed_indices}))
    loaded = load_model(path, "segmenter")
    assert loaded.extra.get("classes") == (["a", "b"] if loaded.num_classes == 2 else None)  # meta kept if it fits
    state = loaded.module.state_dict()
    indices = [key for key in arrays if key.endswith("relative_position_index")]
    assert indices
    for key in indices:
        assert state[key].dtype == torch.int64
        assert np.array_equal(state[key].numpy(), arrays[key])
    for key, value in state_dict_of(arrays).items():
        assert torch.equal(state[key], value), key


def broken(state: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict with one missing, unexpected or mis-shaped key, and the key the error must name."""
    key = next(k for k in state if k.endswith("cls_embed.weight"))
    if kind == "missing":
        del state[key]
    elif kind == "unexpected":
        key = "decode_head.conv_seg.weight"
        state[key] = torch.zeros(1)
    else:
        state[key] = state[key][:-1]
    return state, key


@pytest.mark.parametrize("kind", ["missing", "unexpected", "mis-shaped"])
def test_loader_refuses_mismatched_keys(fixture, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, arrays = fixture
    checkpoint = mmcv_checkpoint(arrays)
    checkpoint["state_dict"], key = broken(checkpoint["state_dict"], kind)
    path = tmp_path / f"{kind}.pth"
    torch.save(checkpoint, path)
    only_preset(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=f"1 {kind}") as error:
        load_model(path, "segmenter")
    summary, *listing = str(error.value).splitlines()
    assert "closest: small" in summary and any(key in line for line in listing)


def test_loader_refuses_a_wrong_relative_position_index(fixture, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, arrays = fixture
    state = state_dict_of(arrays)
    key = next(k for k in state if k.endswith("relative_position_index"))
    state[key] = state[key].flip(0)
    path = tmp_path / "index.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    only_preset(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=f"{key} differs"):
        load_model(path, "segmenter")


class Opaque:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""


@pytest.mark.parametrize("content", ["garbage", "object"])
def test_loader_refuses_unreadable_files(fixture, tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"state_dict": {"x": Opaque()}}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*bad\.pth (is truncated|holds Python objects)") as error:
        load_model(path, "segmenter")
    assert "\n" not in str(error.value)


def check_onnx(model: ViTAdapterSegmenter, path: Path) -> None:
    """ONNX Runtime (CPU) against PyTorch at batch 1 and 3 (the file was exported at batch 2)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, *model.crop_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= PARITY
        assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_onnx_export_dynamic_batch(model, tmp_path: Path) -> None:
    """TorchScript-based exporter (about 6 s here); the dynamo exporter is the `full` test below."""
    pytest.importorskip("onnx")
    path = tmp_path / "vit_adapter.onnx"
    x = torch.zeros(2, 3, *model.crop_size)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=18,
        input_names=["images"],
        output_names=["scores"],
        dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
    )
    check_onnx(model, path)


@pytest.mark.full
def test_onnx_export_dynamo_dynamic_batch(model, tmp_path: Path) -> None:
    """torch.export-based exporter: about 35-45 s on 2 shared CPU cores."""
    pytest.importorskip("onnxscript")
    path = tmp_path / "vit_adapter.onnx"
    x = torch.zeros(2, 3, *model.crop_size)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["images"],
        output_names=["scores"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    check_onnx(model, path)
