"""Checkpoint loading: round trips through every supported container, and loud, helpful, all-or-nothing failures.

Tiny HRNet configs stand in for real models (the loader is generic); they are also the candidate presets.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from certseg.engine.errors import CheckpointError
from certseg.engine.models.checkpoints import (
    fitting_presets,
    is_num_batches_tracked,
    load_checkpoint,
    load_into,
    read_state_dict,
    strip_prefixes,
)
from certseg.engine.models.hrnet import build_hrnet

LOSS_KEY = "loss.criterion.weight"


def tiny_cfg(width: int) -> dict:
    """A minimal HRNetV2 MODEL node: 1 block per branch, 1 module per stage, branch widths width·2^i."""

    def stage(n: int) -> dict:
        return {
            "NUM_MODULES": 1,
            "NUM_BRANCHES": n,
            "BLOCK": "BASIC",
            "NUM_BLOCKS": [1] * n,
            "NUM_CHANNELS": [width * 2**i for i in range(n)],
            "FUSE_METHOD": "SUM",
        }

    stage1 = {"NUM_MODULES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1], "NUM_CHANNELS": [8], "FUSE_METHOD": "SUM"}
    return {
        "ALIGN_CORNERS": False,
        "EXTRA": {"FINAL_CONV_KERNEL": 1, "STAGE1": stage1, "STAGE2": stage(2), "STAGE3": stage(3), "STAGE4": stage(4)},
    }


PRESETS = {
    "tiny-w4-19": partial(build_hrnet, tiny_cfg(4), 19),
    "tiny-w4-5": partial(build_hrnet, tiny_cfg(4), 5),
    "tiny-w8-19": partial(build_hrnet, tiny_cfg(8), 19),
}


def fresh(name: str = "tiny-w4-19", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PRESETS[name]()


@pytest.fixture()
def source() -> dict[str, torch.Tensor]:
    """A state dict with non-default BN statistics and step counters, so every entry is checked."""
    model = fresh(seed=1)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.normal_()
        elif is_num_batches_tracked(name):
            tensor.fill_(7)
    return model.state_dict()


def assert_same(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in expected)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def load_fails(model: nn.Module, state_dict: dict, **kwargs) -> str:
    """Load that must fail and leave ``model`` untouched; returns the error message."""
    before = snapshot(model)
    with pytest.raises(CheckpointError) as caught:
        load_into(model, state_dict, model_name="tiny-w4-19", source="x.pth", **kwargs)
    assert_same(model, before)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_round_trip_torch_files(source: dict, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    torch.save(source, path)
    assert_same(load_checkpoint(fresh(), path), source)


def test_round_trip_safetensors(source: dict, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file(source, path)
    assert_same(load_checkpoint(fresh(), path), source)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {
            "meta": {"mmseg_version": "0.20.2", "iter": 80000, "CLASSES": ["road", "sidewalk"]},
            "state_dict": sd,
        },
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.01}},
        lambda sd: {"epoch": 484, "best_mIoU": 0.81, "state_dict": {f"model.{k}": v for k, v in sd.items()}},
    ],
    ids=["mmcv", "model", "model_state_dict", "hrnet-training-checkpoint"],
)
def test_round_trip_containers(source: dict, tmp_path: Path, wrap) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source), path)
    assert_same(load_checkpoint(fresh(), path), source)


@pytest.mark.parametrize("prefix", ["", "model.", "module.", "module.model."])
def test_round_trip_wrapper_prefix_and_loss_weights(source: dict, tmp_path: Path, prefix: str) -> None:
    """As HRNet's tools/train.py saves FullModel(model, loss), possibly inside DataParallel."""
    entries = {f"{prefix}{k}": v for k, v in source.items()}
    entries[prefix.removesuffix("model.") + LOSS_KEY] = torch.ones(19)
    path = tmp_path / "best.pth"
    torch.save(entries, path)
    assert_same(load_checkpoint(fresh(), path, extras={LOSS_KEY}), source)
    with pytest.raises(CheckpointError, match=re.escape(LOSS_KEY)):  # extras are dropped only when named
        load_checkpoint(fresh(), path)


def test_unstripped_wrapper_prefix_is_pointed_out(source: dict) -> None:
    """An official HRNet checkpoint loaded without naming its extra: the prefix stays, so say why."""
    entries = {f"model.{k}": v for k, v in source.items()} | {LOSS_KEY: torch.ones(19)}
    first = load_fails(fresh(), strip_prefixes(entries)).splitlines()[0]
    assert first.endswith(
        f"{len(source)} missing, {len(entries)} unexpected, 0 mis-shaped keys; "
        f"its keys carry the prefix 'model.' except {LOSS_KEY}"
    )


def test_strip_prefixes_only_when_all_keys_carry_it() -> None:
    t = torch.zeros(1)
    assert list(strip_prefixes({"model.a": t, "model.b": t})) == ["a", "b"]
    assert list(strip_prefixes({"model.a": t, "b": t})) == ["model.a", "b"]
    assert list(strip_prefixes({"module.model.a": t, "module.loss.w": t}, extras={"loss.w"})) == ["a"]
    assert list(strip_prefixes({"net.a": t}, prefixes=("net.",))) == ["a"]


def test_floats_cast_to_model_dtype_int_buffers_kept(source: dict) -> None:
    model = load_into(fresh(), {k: v.double() if v.is_floating_point() else v for k, v in source.items()})
    state = model.state_dict()
    assert state["conv1.weight"].dtype == torch.float32
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    assert_same(model, source)


def test_missing_step_counters_allowed_only_when_declared(source: dict) -> None:
    """torch-0.4 checkpoints (HRNet master) have no num_batches_tracked: a fresh model's 0 stays when allowed."""
    torch04 = {k: v for k, v in source.items() if not is_num_batches_tracked(k)}
    model = fresh()
    message = load_fails(model, torch04)
    assert f"{len(source) - len(torch04)} missing" in message.splitlines()[0]
    load_into(model, torch04, optional_missing=is_num_batches_tracked)
    assert_same(model, {k: v if k in torch04 else torch.zeros_like(v) for k, v in source.items()})


class DerivedIndex(nn.Module):
    """Like ViT-Adapter's attention: a buffer the module computes itself, absent from released checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.register_buffer("relative_position_index", torch.arange(6).view(2, 3))


def test_optional_missing_buffers_keep_the_models_own_value() -> None:
    released = {k: v for k, v in DerivedIndex().state_dict().items() if k != "relative_position_index"}
    model = load_into(DerivedIndex(), released, optional_missing=lambda k: k.endswith("relative_position_index"))
    assert torch.equal(model.relative_position_index, torch.arange(6).view(2, 3))
    assert torch.equal(model.proj.weight, released["proj.weight"])


# ---------------------------------------------------------------------------------------------- mismatches


def test_wrong_model_names_the_preset_that_fits() -> None:
    message = load_fails(fresh(), fresh("tiny-w8-19").state_dict(), presets=PRESETS)
    first, *listing = message.splitlines()
    assert first.startswith("checkpoint x.pth does not fit tiny-w4-19: 0 missing, 0 unexpected, ")
    assert first.endswith("mis-shaped keys; it fits preset tiny-w8-19")
    assert "  mis-shaped (expected vs found):" in listing
    assert "    transition1.0.0.weight: expected [4, 32, 3, 3], found [8, 32, 3, 3]" in listing
    assert listing[-1].startswith("    ... and ")  # long listings are cut after the first ten


def test_other_class_count_is_only_the_last_layer() -> None:
    message = load_fails(fresh(), fresh("tiny-w4-5").state_dict(), presets=PRESETS)
    assert message.splitlines() == [
        "checkpoint x.pth does not fit tiny-w4-19: 0 missing, 0 unexpected, 2 mis-shaped keys; "
        "it fits preset tiny-w4-5",
        "  mis-shaped (expected vs found):",
        "    last_layer.3.weight: expected [19, 60, 1, 1], found [5, 60, 1, 1]",
        "    last_layer.3.bias: expected [19], found [5]",
    ]


def test_extra_and_missing_keys_are_listed(source: dict) -> None:
    broken = dict(source)
    del broken["last_layer.3.bias"], broken["bn1.weight"]
    broken["aux_head.weight"] = torch.zeros(3)
    message = load_fails(fresh(), broken, presets=PRESETS)
    assert message.splitlines() == [
        "checkpoint x.pth does not fit tiny-w4-19: 2 missing, 1 unexpected, 0 mis-shaped keys; "
        "it fits none of the presets tiny-w4-19, tiny-w4-5, tiny-w8-19",
        "  missing:",
        "    bn1.weight",
        "    last_layer.3.bias",
        "  unexpected:",
        "    aux_head.weight",
    ]


def test_golden_small_state_dict_into_other_config(golden: Path) -> None:
    config = json.loads((golden / "hrnet_small.json").read_text())
    arrays = np.load(golden / "hrnet_small.npz")
    state_dict = {k: torch.from_numpy(arrays[k]) for k in arrays.files if "." in k}
    golden_preset = {"hrnet-small": partial(build_hrnet, config["MODEL"], config["DATASET"]["NUM_CLASSES"])}
    message = load_fails(fresh(), state_dict, presets={**PRESETS, **golden_preset})
    assert message.splitlines()[0].endswith("; it fits preset hrnet-small")


def test_candidates_are_built_on_meta(source: dict) -> None:
    devices = []

    def spy() -> nn.Module:
        model = PRESETS["tiny-w4-19"]()
        devices.append(model.conv1.weight.device.type)
        return model

    assert fitting_presets(source, {"spy": spy, "other": PRESETS["tiny-w8-19"]}) == ["spy"]
    assert devices == ["meta"]


# ---------------------------------------------------------------------------------------------- bad files


def one_line_error(path: Path | str, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_truncated_torch_file(source: dict, tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "cut.pth"
    torch.save(source, path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(path, "truncated, corrupt or not a PyTorch checkpoint")


def test_truncated_safetensors(source: dict, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(source, path)
    path.write_bytes(path.read_bytes()[:-100])
    one_line_error(path, "truncated, corrupt or not a safetensors file")


def _leave_mark(path: str) -> None:
    Path(path).write_text("unpickled")


class Payload:
    """Unpickling this would run code; weights_only must refuse it before that."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return _leave_mark, (str(self.mark),)


def test_arbitrary_pickled_object_is_refused(source: dict, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    mark = tmp_path / "mark"
    torch.save({"state_dict": source, "hook": Payload(mark)}, path)
    message = one_line_error(path, "holds Python objects besides tensors")
    assert "_leave_mark" in message and "weights_only=True" in message
    assert not mark.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"hello, not a checkpoint", "not a PyTorch checkpoint"),
        (b"", "not a PyTorch checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    one_line_error(path, match)


@pytest.mark.parametrize(
    ("payload", "match"),
    [(torch.zeros(3), r"holds no state dict \(found a Tensor\)"), ({"epoch": 3}, "holds no state dict")],
)
def test_pickles_without_state_dict(tmp_path: Path, payload: object, match: str) -> None:
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    one_line_error(path, match)


def test_missing_file_directory_suffix_and_url(tmp_path: Path) -> None:
    one_line_error(tmp_path / "absent.pth", "does not exist")
    one_line_error(tmp_path, "is not a file")
    (tmp_path / "weights.npz").write_bytes(b"x")
    one_line_error(tmp_path / "weights.npz", "unknown suffix")
    one_line_error("https://example.com/hrnet_w48_cityscapes.pth", "is a URL")
