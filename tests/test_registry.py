"""Loading by shipped name or path: self-describing files and official checkpoints through the strict loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certseg.engine.errors import CheckpointError
from certseg.engine.models import registry
from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import FAMILIES, Family, load_model, save_model
from certseg.engine.models.vit_adapter import build_vit_adapter


def golden_state(golden: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((golden / f"{name}.json").read_text())
    arrays = np.load(golden / f"{name}.npz")
    return config, {k: torch.from_numpy(arrays[k]) for k in arrays.files if "." in k}


@pytest.fixture
def hrnet_small(golden: Path, monkeypatch: pytest.MonkeyPatch):
    """The golden small HRNet registered as an official preset (the real presets are full-size)."""
    config, state = golden_state(golden, "hrnet_small")
    family = FAMILIES["hrnet"]
    preset = {"model_cfg": config["MODEL"], "num_classes": config["DATASET"]["NUM_CLASSES"]}
    presets = dict(family.presets) | {"hrnet-small": preset}
    monkeypatch.setitem(FAMILIES, "hrnet", Family(**{**family.__dict__, "presets": presets}))
    return preset, state


def test_self_describing_file_round_trips(tmp_path: Path, hrnet_small) -> None:
    preset, state = hrnet_small
    model = build_hrnet(preset["model_cfg"], preset["num_classes"]).eval()
    model.load_state_dict(state)
    path = tmp_path / "mine.safetensors"
    save_model(path, model, {"name": "mine", "role": "segmenter", "family": "hrnet", "config": preset,
                             "classes": [f"c{i}" for i in range(preset["num_classes"])]})
    loaded = load_model(path, "segmenter")
    assert loaded.family == "hrnet" and loaded.num_classes == preset["num_classes"]
    assert loaded.extra["classes"][0] == "c0" and len(loaded.sha256) == 64
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="holds a segmenter"):
        load_model(path, "denoiser")


def test_official_hrnet_checkpoint_is_matched_to_its_preset(tmp_path: Path, hrnet_small) -> None:
    _, state = hrnet_small
    official = {f"model.{k}": v for k, v in state.items()} | {"loss.criterion.weight": torch.ones(19)}
    path = tmp_path / "official.pth"
    torch.save(official, path)
    loaded = load_model(path, "segmenter")
    assert loaded.extra["preset"] == "hrnet-small"
    for key, value in state.items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_of_no_known_preset_names_the_closest(tmp_path: Path, hrnet_small) -> None:
    _, state = hrnet_small
    broken = dict(state)
    broken.pop(next(iter(broken)))
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="closest: hrnet-small.*1 missing"):
        load_model(path, "segmenter")


def test_official_vit_adapter_checkpoint_loads_with_rebuilt_indices(
    tmp_path: Path, golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, state = golden_state(golden, "vit_adapter_small")
    cfg = config["mmseg_model_cfg"]
    family = FAMILIES["vit_adapter"]
    preset = {"model_cfg": cfg, "num_classes": registry.vit_num_classes(cfg)}
    monkeypatch.setitem(FAMILIES, "vit_adapter", Family(**{**family.__dict__, "presets": {"small": preset}}))
    released = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    path = tmp_path / "vit.pth"
    torch.save({"meta": {"CLASSES": ["x"]}, "state_dict": released}, path)  # 1 name for K > 1 classes: ignored
    loaded = load_model(path, "segmenter")
    assert "classes" not in loaded.extra and "palette" not in loaded.extra
    reference = build_vit_adapter(cfg)
    reference.load_state_dict(state)
    x = torch.randn(1, 3, *cfg["backbone"]["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(x), rtol=0, atol=0)


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'"):
        registry.resolve("no-such-model")


def test_full_presets_are_known_for_every_family() -> None:
    assert "hrnetv2-w48-cityscapes" in FAMILIES["hrnet"].presets
    assert "adm-256-uncond" in FAMILIES["adm"].presets
    assert {"vit-adapter-beit-large-cityscapes", "vit-adapter-beit-large-pascal-context-59"} <= set(
        FAMILIES["vit_adapter"].presets
    )


@pytest.mark.parametrize(
    "description, message",
    [
        ({"name": "x", "role": "segmenter", "config": {}}, "lacks the 'family' field"),
        ({"name": "x", "role": "segmenter", "family": "hrnet"}, "lacks the 'config' field"),
        ({"family": ["hrnet"], "config": {}}, "'family' field of its 'certseg' metadata is not a string"),
        ([1, 2], "is not a JSON object"),
    ],
)
def test_incomplete_metadata_is_a_one_line_error_naming_the_file_and_field(
    tmp_path: Path, description: object, message: str
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "incomplete.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"certseg": json.dumps(description)})
    for role in ("segmenter", "denoiser"):
        with pytest.raises(CheckpointError) as error:
            load_model(path, role)
        assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"certseg": "{not json"})
    with pytest.raises(CheckpointError, match="metadata is not JSON"):
        load_model(path, "segmenter")


def test_an_mmseg_checkpoints_classes_and_palette_reach_the_json_and_the_overlay(
    tmp_path: Path, golden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmcv's meta (CLASSES, PALETTE) travels with an official checkpoint into certify's record and pictures."""
    from typer.testing import CliRunner

    from certseg.engine.commands.cli import app
    from certseg.engine.files.images import overlay, read_image, read_labels

    config, state = golden_state(golden, "vit_adapter_small")
    cfg = config["mmseg_model_cfg"]
    num_classes = registry.vit_num_classes(cfg)
    family = FAMILIES["vit_adapter"]
    preset = {"model_cfg": cfg, "num_classes": num_classes}
    monkeypatch.setitem(FAMILIES, "vit_adapter", Family(**{**family.__dict__, "presets": {"small": preset}}))
    names = [f"thing-{i}" for i in range(num_classes)]
    palette = [[(37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256] for i in range(num_classes)]
    path = tmp_path / "mmseg.pth"
    released = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    torch.save({"meta": {"CLASSES": names, "PALETTE": palette}, "state_dict": released}, path)
    loaded = load_model(path, "segmenter")
    assert loaded.extra["classes"] == names and loaded.extra["palette"] == palette
    example = Path(__file__).resolve().parents[1] / "examples" / "street.png"
    result = CliRunner().invoke(app, ["certify", str(example), "--method", "segcertify", "--segmenter", str(path),
                                      "--n0", "2", "--n", "50", "--alpha", "0.1", "--seed", "3",
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "street.json").read_text())
    assert report["classes"] == names and set(report["per_class_certified_pixels"]) == {*names, "abstain"}
    labels = read_labels(tmp_path / "out" / "street.certified.png")
    expected = overlay(read_image(example), labels, np.asarray(palette, dtype=np.uint8))
    with Image.open(tmp_path / "out" / "street.overlay.png") as drawn:
        np.testing.assert_array_equal(np.asarray(drawn), expected)
    assert (labels < num_classes).any()  # some pixel is drawn in the checkpoint's colours
