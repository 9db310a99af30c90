"""HRNet's factored head: the same function as the official order (float64, golden outputs of the official code),
the branches it factors, sessions that factor their own copy, and a bench baseline that runs the models as
published."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden_hrnet import assert_golden_after
from torch import nn

from certseg.engine.models.fold_batchnorm import fold_batchnorm
from certseg.engine.models.hrnet import (
    HRNET_W48,
    HRNetV2,
    _rows_upsample_exactly,
    _upsample_rows,
    _upsample_to,
    build_hrnet,
)
from certseg.training.architectures import SMALL_HRNET

from segmenters import randomise_norms


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("fold", [False, True])
def test_factored_equals_the_official_order_in_float64(align_corners: bool, fold: bool) -> None:
    """Odd image sizes (upsampling to sizes that no scale factor gives) and both corner conventions."""
    torch.manual_seed(0)
    official = randomise_norms(build_hrnet({**SMALL_HRNET, "ALIGN_CORNERS": align_corners}, 5)).double().eval()
    if fold:
        fold_batchnorm(official)
    factored = copy.deepcopy(official)
    assert factored.factor_head() == 2 and factored.factored_from == 2  # widths 16, 32 | 64, 128 of 240
    x = torch.rand(2, 3, 97, 203, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = official(x), factored(x)
    assert want.abs().max().item() > 1.0 and got.shape == want.shape == (2, 5, 25, 51)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for first in range(5):  # every split point is the same function, official order (4) included; 0 acts as 1
        factored.factored_from = first
        with torch.no_grad():
            torch.testing.assert_close(factored(x), want, rtol=1e-12, atol=1e-12)
    assert factored.factor_head(enabled=False) == 0 and factored.factored_from is None


def test_a_misplaced_weight_column_is_caught() -> None:
    """The float64 check can fail: convolving branch 3 with branch 2's weight columns changes the output."""
    torch.manual_seed(0)
    model = build_hrnet(SMALL_HRNET, 5).double().eval()
    x = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        model.factor_head()
        weight = model.last_layer[0].weight
        weight[:, 112:240] = torch.roll(weight[:, 112:240], 1, dims=1)
        assert (model(x) - want).abs().max().item() > 1e-3


def test_the_wide_branches_are_factored_at_both_sizes() -> None:
    """The rule (a branch at least a quarter of the head's width) picks the last two branches of the shipped HRNet
    and of HRNetV2-W48 (48/96/192/384 of 720), built on the meta device."""
    with torch.device("meta"):
        w48 = build_hrnet(HRNET_W48, 19)
    assert w48.last_layer[0].in_channels == 720 and w48.factor_head() == 2 and w48.factored_from == 2


def test_golden_parity_after_factoring_and_folding(golden: Path) -> None:
    """The official code's outputs on the golden config, from the folded and factored model."""
    def rewrite(net: HRNetV2) -> None:
        fold_batchnorm(net)
        assert net.factor_head() > 0

    assert_golden_after(golden, rewrite)


def test_a_session_factors_its_own_copy_and_records_it() -> None:
    from certseg.engine.runtimes.local_backends import LocalBackend
    from certseg.engine.runtimes.settings import Settings

    factored = LocalBackend.open(Settings(method="segcertify", device="cpu"))
    plain = LocalBackend.open(Settings(method="segcertify", device="cpu", factor_head=False))
    onnx = LocalBackend.open(Settings(method="segcertify", device="cpu", runtime="onnx"))
    assert isinstance(factored.segmenter.module, HRNetV2) and factored.segmenter.module.factored_from == 2
    assert plain.segmenter.module.factored_from is None and onnx.segmenter.module.factored_from is None
    assert factored.settings.record()["factor_head"] is True and plain.settings.record()["factor_head"] is False
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(factored.segmenter.module(x), plain.segmenter.module(x), rtol=1e-4, atol=1e-4)
    assert Settings(device="cpu").factors_head and not Settings(device="cpu", runtime="onnx").factors_head
    assert not Settings(device="cpu", factor_head=False).factors_head


def test_the_bench_baseline_runs_the_models_as_published(tmp_path: Path) -> None:
    """The authors-style baseline gets BatchNorm unfolded and the official head, while the engine's session
    rewrites both; with neither rewrite asked for, the two share one session."""
    from certseg.bench.config import BenchConfig, Setting
    from certseg.bench.run import _Sessions, prepare
    from certseg.engine.runtimes.settings import Settings

    setting = Setting("segcertify", 1.0, 0.25, 1)
    run = prepare(BenchConfig(engine=Settings(device="cpu"), images=1, methods=("segcertify",), sigmas=(0.25,),
                              out=tmp_path / "a", baseline=True, scene_size=(32, 64)))
    sessions = _Sessions(run, None)
    engine, baseline = sessions.get(setting).segmenter.module, sessions.baseline(setting).segmenter.module
    assert engine.factored_from == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in engine.modules())
    assert baseline.factored_from is None and any(isinstance(m, nn.BatchNorm2d) for m in baseline.modules())
    assert engine.pointwise_fused and not baseline.pointwise_fused
    plain = Settings(device="cpu", fold_batchnorm=False, factor_head=False)
    run = prepare(BenchConfig(engine=plain, images=1, methods=("segcertify",), sigmas=(0.25,), out=tmp_path / "b",
                              baseline=True, scene_size=(32, 64)))
    sessions = _Sessions(run, None)
    assert sessions.baseline(setting) is sessions.get(setting)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_rows_upsampled_from_a_band_are_the_bits_of_the_whole(scale: int, channels_last: bool) -> None:
    """Every band (edges on and off the scale's multiples, one row, the image's edges) from the source rows it
    needs gives the whole upsampling's bits; the rule admits exactly the power-of-two heights without aligned
    corners."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=layout)
    like = torch.empty(1, 1, 6 * scale, 19)
    assert _rows_upsample_exactly(x, like, align_corners=False)
    whole = _upsample_to(x, like, align_corners=False)
    height = like.shape[-2]
    for top in range(height):
        for bottom in {top + 1, min(height, top + 3), min(height, top + scale + 1), height}:
            assert torch.equal(_upsample_rows(x, like, top, bottom, False), whole[:, :, top:bottom]), (top, bottom)


def test_bands_are_refused_where_their_weights_would_be_other_numbers() -> None:
    x = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(4))
    assert not _rows_upsample_exactly(x, torch.empty(1, 1, 24, 28), align_corners=True)
    assert not _rows_upsample_exactly(x, torch.empty(1, 1, 18, 28), align_corners=False)  # 3x: not dyadic
    assert not _rows_upsample_exactly(x, torch.empty(1, 1, 25, 28), align_corners=False)  # not a multiple
    # and the source row on each side is needed: without it a band's edge rows are clamped, other numbers
    like = torch.empty(1, 1, 24, 7)
    clamped = F.interpolate(x[:, :, 2:3], size=(4, 7), mode="bilinear", align_corners=False)
    assert not torch.equal(clamped, _upsample_rows(x, like, 8, 12, False))
