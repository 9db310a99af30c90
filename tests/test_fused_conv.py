"""Convolutions with their ReLU and residual add fused (oneDNN): the same function as the plain modules (float64
references, golden outputs of the official code), used by HRNet only where the kernels apply, and by sessions that
fold their norms."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden_hrnet import assert_golden_after
from torch import nn

from certseg.engine.models import fused_conv
from certseg.engine.models.fold_batchnorm import fold_batchnorm
from certseg.engine.models.hrnet import HRNetV2, build_hrnet
from certseg.training.architectures import SMALL_HRNET

from segmenters import randomise_norms

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _reference(conv: nn.Conv2d, x: torch.Tensor, relu: bool, add: torch.Tensor | None) -> torch.Tensor:
    """The same maths in float64 with plain operators."""
    y = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if add is not None:
        y = y + add.double()
    return F.relu(y) if relu else y


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("relu", "with_add"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (1, 1)])
def test_fused_convolution_equals_the_plain_operators(channels_last: bool, relu: bool, with_add: bool, kernel: int,
                                                      stride: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, padding=kernel // 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 17, 23).contiguous(memory_format=fmt)
    out_size = (2, 5, (17 - 1) // stride + 1, (23 - 1) // stride + 1)
    add = torch.randn(out_size).contiguous(memory_format=fmt) if with_add else None
    before = None if add is None else add.clone()
    with torch.no_grad():
        assert fused_conv.applies(x, conv)
        got = fused_conv.conv2d(conv, x, relu=relu, add=add)
    want = _reference(conv, x, relu, add)
    assert got.shape == out_size and got.dtype == torch.float32
    assert (want < 0).any() != relu  # the ReLU has something to do, and did it
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if add is not None:
        assert torch.equal(add, before)  # read, not written


def test_a_chain_adds_to_its_last_convolution_before_the_relu() -> None:
    torch.manual_seed(1)
    chain = nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.Identity(), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.Identity(), nn.ReLU()),
    )
    x = torch.randn(1, 4, 16, 16)
    add = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        got = fused_conv.sequential(chain, x, add=add)
        middle = F.relu(chain[0][0](x))
        want = F.relu(chain[1][0](middle) + add)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        fused_conv.sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), x)


def test_the_kernels_apply_only_to_cpu_float32_inference() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert fused_conv.applies(x, conv)
        assert not fused_conv.applies(x.double(), copy.deepcopy(conv).double())
        assert not fused_conv.applies(x.to("meta"), copy.deepcopy(conv).to("meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_conv.applies(x, conv)
    assert not fused_conv.applies(x, conv)  # gradients wanted for the weights: the kernels have no backward
    assert fused_conv.applies(x, conv.requires_grad_(False))


def _small_hrnet(align_corners: bool = False) -> HRNetV2:
    torch.manual_seed(0)
    model = randomise_norms(build_hrnet({**SMALL_HRNET, "ALIGN_CORNERS": align_corners}, 5)).eval()
    fold_batchnorm(model)
    return model


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("factored", [False, True])
def test_fused_hrnet_equals_the_plain_folded_model(align_corners: bool, factored: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the unfused model in float64 (odd sizes: upsampling to sizes no scale factor gives), and the fused
    kernels really ran."""
    plain = _small_hrnet(align_corners)
    plain.factor_head(factored)
    fused = copy.deepcopy(plain)
    assert fused.fuse_pointwise() and fused.pointwise_fused
    calls: list[bool] = []
    original = fused_conv.conv2d
    monkeypatch.setattr(fused_conv, "conv2d", lambda *a, **k: calls.append(True) or original(*a, **k))
    x = torch.rand(2, 3, 97, 203, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain.double()(x.double())
        got = fused(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) > 50
    assert want.abs().max().item() > 1.0 and got.shape == want.shape == (2, 5, 25, 51)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (got.argmax(1) == want.argmax(1)).double().mean().item() >= 0.999


def test_golden_parity_when_fused(golden: Path) -> None:
    """The official code's outputs on the golden config from the folded, factored and fused model."""
    def rewrite(model: HRNetV2) -> None:
        fold_batchnorm(model)
        model.factor_head()
        model.fuse_pointwise()

    net = assert_golden_after(golden, rewrite)
    assert net.pointwise_fused


def test_fusing_needs_folded_norms_and_falls_back_where_the_kernels_do_not_apply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="folded BatchNorms.*the first bn1"):
        build_hrnet(SMALL_HRNET, 5).eval().fuse_pointwise()
    model = _small_hrnet()
    reference = copy.deepcopy(model)
    model.fuse_pointwise()

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a fused kernel ran where it does not apply")

    monkeypatch.setattr(fused_conv, "conv2d", refuse)
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain modules, in bf16
            torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(model.double()(x.double()), reference.double()(x.double()))
    out = model.float()(x)  # gradients wanted: the plain modules, which have a backward
    out.sum().backward()
    assert model.conv1.weight.grad is not None
    assert not model.fuse_pointwise(enabled=False) and not model.pointwise_fused


def test_a_session_that_folds_its_norms_fuses_and_the_baseline_does_not() -> None:
    from certseg.engine.runtimes.local_backends import LocalBackend
    from certseg.engine.runtimes.settings import Settings

    folded = LocalBackend.open(Settings(method="segcertify", device="cpu"))
    unfolded = LocalBackend.open(Settings(method="segcertify", device="cpu", fold_batchnorm=False))
    assert isinstance(folded.segmenter.module, HRNetV2) and folded.segmenter.module.pointwise_fused
    assert not unfolded.segmenter.module.pointwise_fused
    x = torch.rand(1, 3, 64, 128)
    with torch.inference_mode():  # as the runtime calls it
        torch.testing.assert_close(folded.segmenter.module(x), unfolded.segmenter.module(x), rtol=1e-4, atol=1e-4)
        assert fused_conv.applies(x, folded.segmenter.module.conv1)


@pytest.mark.parametrize("x_last", [False, True])
@pytest.mark.parametrize("out_last", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_in_place_add_relu_convolution_writes_only_into_its_output(x_last: bool, out_last: bool,
                                                                       batch: int) -> None:
    """``relu(conv1x1(x) + out)`` into ``out``, against float64; ``out`` a band of rows of a larger tensor, either
    layout: the rows outside it untouched."""
    torch.manual_seed(2)
    weight, bias = torch.randn(6, 10, 1, 1)[:, 2:7], torch.randn(6)  # a slice of columns, as the head passes
    x = torch.randn(batch, 5, 7, 9).contiguous(memory_format=torch.channels_last if x_last else torch.contiguous_format)
    whole = torch.randn(batch, 6, 12, 9).contiguous(
        memory_format=torch.channels_last if out_last else torch.contiguous_format)
    before = whole.clone()
    band = whole[:, :, 3:10]
    want = F.relu(F.conv2d(x.double(), weight.double(), bias.double()) + band.double())
    with torch.no_grad():
        got = fused_conv.conv1x1_add_relu_(band, x, weight, bias)
    assert got.data_ptr() == band.data_ptr() and (want == 0).any() and (want > 0).any()
    torch.testing.assert_close(whole[:, :, 3:10].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(whole[:, :, :3], before[:, :, :3]) and torch.equal(whole[:, :, 10:], before[:, :, 10:])


@pytest.mark.parametrize("size", [(128, 192), (97, 203)])
def test_the_fused_head_in_bands_gives_the_bits_of_the_whole_head(size: tuple[int, int],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Folded, factored and fused (CPU float32), channels-last: bands of 3 rows (edges off the branches' scales),
    two samples, against the same model in one band; at odd sizes (heights not a power of two apart) and in
    channels-first layout it runs in one band."""
    import certseg.engine.models.hrnet as hrnet

    model = _small_hrnet()
    model.factor_head()
    assert model.fuse_pointwise()
    bands: list[tuple[int, int]] = []
    original = hrnet._upsample_rows

    def recorded(x: torch.Tensor, like: torch.Tensor, top: int, bottom: int, ac: bool) -> torch.Tensor:
        bands.append((top, bottom))
        return original(x, like, top, bottom, ac)

    monkeypatch.setattr(hrnet, "_upsample_rows", recorded)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    for layout in (torch.channels_last, torch.contiguous_format):
        inputs = x.contiguous(memory_format=layout)
        with torch.no_grad():
            model.head_band_bytes, model.head_band_min_rows = 2**40, 1
            whole = model(inputs)
            bands.clear()
            model.head_band_bytes, model.head_band_min_rows = 1, 3
            banded = model(inputs)
        height = whole.shape[-2]
        assert torch.equal(banded, whole), layout
        if size == (128, 192) and layout == torch.channels_last:
            assert (0, 3) in bands and (height - height % 3, height) in bands and len(bands) == 2 * 2 * -(-height // 3)
        else:
            assert bands == [(0, height)] * 2  # one band, the whole batch: two parts
