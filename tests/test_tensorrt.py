"""TensorRT engine building: a clean skip wherever ``import tensorrt`` fails (as on every machine here), a clear
error when engines were required, and the layer-selection logic the FP32 precision pins rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from certseg.engine.models.hrnet import build_hrnet
from certseg.engine.models.registry import LoadedModel, save_model
from certseg.export.graph_surgery import derived_only_from
from certseg.export.tensorrt import TENSORRT_MISSING, TensorRTUnavailable, build_engine, tensorrt_available
from certseg.training.architectures import SMALL_HRNET

needs_no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")


@pytest.fixture(scope="module")
def segmenter() -> LoadedModel:
    torch.manual_seed(0)
    config = {"model_cfg": SMALL_HRNET, "num_classes": 4}
    module = build_hrnet(SMALL_HRNET, 4).eval()
    return LoadedModel(module=module, name="tiny-hrnet", family="hrnet", role="segmenter", config=config,
                       source="memory", sha256="0" * 64)


@needs_no_tensorrt
def test_build_engine_skips_with_one_clear_message(tmp_path: Path) -> None:
    build = build_engine(tmp_path / "missing.onnx", tmp_path / "model.plan", input_shapes={}, max_batch=4)
    assert build.status == "skipped" and build.path is None
    assert build.message == TENSORRT_MISSING == (
        "TensorRT is not installed: skipping engine build; ONNX files are ready for onnxruntime-gpu")
    assert not (tmp_path / "model.plan").exists()


@needs_no_tensorrt
def test_export_skips_tensorrt_by_default_and_fails_when_required(tmp_path: Path, segmenter) -> None:
    pytest.importorskip("onnxruntime")
    from certseg.export.models import export_models

    torch.set_num_threads(1)
    messages: list[str] = []
    result = export_models(segmenter, None, tmp_path, image_size=(32, 64), max_batch=2, fp16=False,
                           parity_batches=(), log=messages.append)
    assert result.engines["segmenter"].status == "skipped" and result.plan("segmenter") is None
    assert TENSORRT_MISSING in messages and (tmp_path / "segmenter.onnx").is_file()
    assert json.loads(result.manifest.read_text())["tensorrt"]["segmenter"]["message"] == TENSORRT_MISSING
    with pytest.raises(TensorRTUnavailable, match="^TensorRT is not installed"):
        export_models(segmenter, None, tmp_path, image_size=(32, 64), fp16=False, tensorrt=True, parity_batches=())


@needs_no_tensorrt
def test_cli_tensorrt_required_is_a_one_line_error(tmp_path: Path, segmenter) -> None:
    pytest.importorskip("onnxruntime")
    from certseg.export import cli

    checkpoint = tmp_path / "seg.safetensors"
    save_model(checkpoint, segmenter.module, {"name": "tiny", "role": "segmenter", "family": "hrnet",
                                              "config": segmenter.config})
    result = CliRunner().invoke(cli.app, [
        "--segmenter", str(checkpoint), "--method", "segcertify", "--image-size", "32", "64", "--out",
        str(tmp_path / "out"), "--no-fp16", "--no-parity", "--tensorrt", "--threads", "1",
    ])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"certseg-export: error: {TENSORRT_MISSING}"


def test_fp32_pins_select_the_timestep_subgraph() -> None:
    """Layers computed from ``timesteps`` (and constants) only are pinned; anything touching x_t is not."""
    layers = [
        ([], ["freqs"]),                         # 0 constant
        (["timesteps", "freqs"], ["args"]),      # 1 t·f
        (["args"], ["cos"]),                     # 2
        (["cos", "w0"], ["emb"]),                # 3 embedding MLP (w0 an initializer)
        (["x_t", "w1"], ["h"]),                  # 4 conv on the image
        (["h", "emb"], ["h2"]),                  # 5 mixes image and embedding
        (["emb"], ["emb_shape"]),                # 6 still timestep-only
    ]
    derived, constant = derived_only_from(layers, {"timesteps"}, {"w0", "w1"})
    assert derived == {1, 2, 3, 6} and constant == {0}


@pytest.mark.gpu
def test_build_engine_with_tensorrt(tmp_path: Path, segmenter) -> None:
    """Only where TensorRT and a GPU exist: an FP16 plan from the exported segmenter."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from certseg.export.models import export_models

    result = export_models(segmenter, None, tmp_path, image_size=(32, 64), max_batch=4, tensorrt=True)
    assert result.engines["segmenter"].status == "built"
    plan = result.plan("segmenter")
    assert plan is not None and plan.stat().st_size > 0
