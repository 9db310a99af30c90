"""ADM UNet: golden parity with the official guided-diffusion code, official state-dict layout, kwargs parsing."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from certseg.engine.models.adm import ADM_256_UNCOND, PRESETS, build_adm, timestep_embedding

TOL = 1e-5


@pytest.fixture(scope="module")
def adm_config(golden: Path) -> dict[str, Any]:
    return json.loads((golden / "adm_small.json").read_text())


@pytest.fixture(scope="module")
def adm_npz(golden: Path) -> dict[str, np.ndarray]:
    with np.load(golden / "adm_small.npz") as data:
        return {name: data[name] for name in data.files}  # keeps the file's (official state-dict) order


def official_state_dict(npz: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value) for name, value in npz.items() if "." in name}


@pytest.fixture(scope="module")
def golden_model(adm_config: dict[str, Any], adm_npz: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_adm(adm_config["create_model_kwargs"]).eval()
    model.load_state_dict(official_state_dict(adm_npz), strict=True)
    return model


def small_kwargs(**overrides: Any) -> dict[str, Any]:
    """A tiny config (2 levels, attention at 16x16) for cheap structural checks."""
    kwargs: dict[str, Any] = dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16",
        num_head_channels=16,
        learn_sigma=True,
    )
    return {**kwargs, **overrides}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter (the zero-initialised ones too) so outputs depend on all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_golden_output_parity(golden_model: torch.nn.Module, adm_npz: dict[str, np.ndarray]) -> None:
    x, timesteps = torch.from_numpy(adm_npz["x"]), torch.from_numpy(adm_npz["timesteps"])
    with torch.no_grad():
        out = golden_model(x, timesteps)
    assert out.shape == adm_npz["out"].shape and out.dtype == torch.float32
    assert (out - torch.from_numpy(adm_npz["out"])).abs().max().item() <= TOL
    assert (out.double() - torch.from_numpy(adm_npz["out_f64"])).abs().max().item() <= TOL


def test_golden_timestep_embedding(golden_model: torch.nn.Module, adm_npz: dict[str, np.ndarray]) -> None:
    timesteps = torch.from_numpy(adm_npz["timesteps"])
    sinusoidal = timestep_embedding(timesteps, golden_model.model_channels)
    assert sinusoidal.dtype == torch.float32
    assert (sinusoidal - torch.from_numpy(adm_npz["temb_sinusoidal"])).abs().max().item() <= TOL
    with torch.no_grad():
        temb = golden_model.time_embed(sinusoidal)
    assert (temb - torch.from_numpy(adm_npz["temb"])).abs().max().item() <= TOL


def test_state_dict_names_order_and_shapes(adm_config: dict[str, Any], adm_npz: dict[str, np.ndarray]) -> None:
    with torch.device("meta"):
        model = build_adm(adm_config["create_model_kwargs"])
    ours = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    official = [(name, value.shape) for name, value in adm_npz.items() if "." in name]
    assert ours == official
    assert len(ours) == adm_config.get("num_state_dict_entries", len(official))
    num_parameters = sum(math.prod(shape) for _, shape in official)
    assert sum(p.numel() for p in model.parameters()) == adm_config.get("num_parameters", num_parameters)


def read_tsv(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """name<TAB>comma-separated shape<TAB>dtype per line."""
    rows = []
    for line in path.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split(",") if s), dtype))
    return rows


def test_full_preset_layout_on_meta(reference: Path) -> None:
    expected = read_tsv(reference / "adm256-uncond-state-dict.tsv")
    with torch.device("meta"):
        model = build_adm(ADM_256_UNCOND)
    ours = [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in model.state_dict().items()]
    assert ours == expected
    expected_params = sum(math.prod(shape) for _, shape, _ in expected)
    assert sum(p.numel() for p in model.parameters()) == expected_params
    assert 552e6 < expected_params < 554e6
    assert PRESETS["adm-256-uncond"] is ADM_256_UNCOND


def test_string_kwargs_build_the_same_model(
    adm_config: dict[str, Any], adm_npz: dict[str, np.ndarray], golden_model: torch.nn.Module
) -> None:
    """Command-line forms: every value a string, channel_mult "a,b,c", booleans "True"/"False"."""
    as_strings = {
        key: ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        for key, value in adm_config["create_model_kwargs"].items()
    }
    model = build_adm(as_strings).eval()
    model.load_state_dict(official_state_dict(adm_npz), strict=True)
    x, timesteps = torch.from_numpy(adm_npz["x"][:1]), torch.from_numpy(adm_npz["timesteps"][:1])
    with torch.no_grad():
        assert torch.equal(model(x, timesteps), golden_model(x, timesteps))


def test_list_and_string_forms_agree() -> None:
    with torch.device("meta"):
        a = build_adm(small_kwargs(channel_mult=[1, 2], attention_resolutions=[16], learn_sigma="True"))
        b = build_adm(small_kwargs(channel_mult="1,2", attention_resolutions="16", learn_sigma=True))
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize(
    ("image_size", "mult"),
    [(512, (0.5, 1, 1, 2, 2, 4, 4)), (256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)), (64, (1, 2, 3, 4))],
)
def test_default_channel_mult(image_size: int, mult: tuple[float, ...]) -> None:
    kwargs = dict(image_size=image_size, num_channels=64, num_res_blocks=1, attention_resolutions="16")
    with torch.device("meta"):
        default = build_adm({**kwargs, "channel_mult": ""})
        explicit = build_adm({**kwargs, "channel_mult": list(mult)})
    assert [(k, v.shape) for k, v in default.state_dict().items()] == [
        (k, v.shape) for k, v in explicit.state_dict().items()
    ]
    assert default.input_blocks[0][0].out_channels == int(mult[0] * 64)


def test_preset_ds_and_heads() -> None:
    """attention "32,16,8" at 256 means ds 8, 16, 32; heads = channels / 64 everywhere, middle included."""
    with torch.device("meta"):
        model = build_adm(ADM_256_UNCOND)
    blocks = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert {(b.qkv.in_channels, b.attention.n_heads) for b in blocks} == {(512, 8), (1024, 16)}
    assert model.out_channels == 6


@pytest.mark.parametrize(
    "bad",
    [
        {"num_channel": 32},
        {"learn_sigma": "maybe"},
        {"channel_mult": "1,x"},
        {"attention_resolutions": "5"},
        {"num_head_channels": 24},
        {"dropout": 1.5},
    ],
)
def test_bad_kwargs_raise(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError), torch.device("meta"):
        build_adm(small_kwargs(**bad))


def test_missing_required_kwarg_raises() -> None:
    kwargs = small_kwargs()
    del kwargs["num_res_blocks"]
    with pytest.raises(ValueError, match="num_res_blocks"):
        build_adm(kwargs)


def test_plain_resample_and_add_norm_variant_layout() -> None:
    """resblock_updown=False uses conv Downsample (`op`) / Upsample (`conv`); no scale-shift halves emb_layers."""
    with torch.device("meta"):
        model = build_adm(small_kwargs(use_scale_shift_norm=False, resblock_updown=False, learn_sigma=False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_blocks.2.0.op.weight"] == (32, 32, 3, 3)
    assert shapes["output_blocks.1.2.conv.weight"] == (64, 64, 3, 3)  # res, attn, upsample
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (32, 128)
    assert shapes["out.2.weight"] == (3, 32, 3, 3)


@pytest.mark.parametrize("variant", [{}, {"use_scale_shift_norm": False, "resblock_updown": False}])
def test_forward_shapes_and_dynamic_batch(variant: dict[str, Any]) -> None:
    model = randomize(build_adm(small_kwargs(**variant)))
    x = torch.randn(3, 3, 32, 32)
    timesteps = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = model(x, timesteps)
        single = model(x[1:2], timesteps[1:2])
    assert out.shape == (3, 6, 32, 32)
    assert (out[1:2] - single).abs().max().item() <= TOL


def test_new_attention_order_differs_from_legacy() -> None:
    legacy = randomize(build_adm(small_kwargs()))
    new = build_adm(small_kwargs(use_new_attention_order=True)).eval()
    new.load_state_dict(legacy.state_dict(), strict=True)
    x, timesteps = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert (legacy(x, timesteps) - new(x, timesteps)).abs().max().item() > 1e-3


def test_num_heads_without_head_channels() -> None:
    with torch.device("meta"):
        model = build_adm(small_kwargs(num_head_channels=-1, num_heads=2, num_heads_upsample=4))
    heads = [m.attention.n_heads for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert heads == [2, 2, 4, 4]  # input, middle, then two upsampling-side blocks at 16x16


def test_class_conditional_model_needs_labels() -> None:
    model = randomize(build_adm(small_kwargs(class_cond="True")))
    assert tuple(model.label_emb.weight.shape) == (1000, 128)
    assert list(model.state_dict())[4] == "label_emb.weight"
    x, timesteps = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    with torch.no_grad():
        assert model(x, timesteps, torch.tensor([1, 2])).shape == (2, 6, 32, 32)
        with pytest.raises(ValueError, match="class"):
            model(x, timesteps)


def test_autocast_and_half_model_run() -> None:
    model = randomize(build_adm(small_kwargs()))
    x, timesteps = torch.randn(2, 3, 32, 32), torch.tensor([5, 50])
    with torch.no_grad():
        ref = model(x, timesteps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x, timesteps)
        whole = model.to(torch.bfloat16)(x.bfloat16(), timesteps)
    assert whole.dtype == torch.bfloat16
    assert (mixed.float() - ref).abs().max().item() < 0.1
    assert (whole.float() - ref).abs().max().item() < 0.1


def test_onnx_export_dynamic_batch(tmp_path: Path) -> None:
    """Legacy (TorchScript) exporter with a dynamic batch; ONNX Runtime matches torch at another batch size."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = randomize(build_adm(small_kwargs()))
    path = tmp_path / "adm.onnx"
    example = (torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["x", "timesteps"],
            output_names=["out"],
            dynamic_axes={"x": {0: "batch"}, "timesteps": {0: "batch"}, "out": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, timesteps = torch.randn(3, 3, 32, 32), torch.tensor([0, 300, 999])
    (got,) = session.run(None, {"x": x.numpy(), "timesteps": timesteps.numpy()})
    with torch.no_grad():
        want = model(x, timesteps).numpy()
    assert np.abs(got - want).max() < 1e-4
