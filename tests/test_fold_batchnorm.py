"""BatchNorm folding: the folded model computes the unfolded one's function (golden outputs of the official code,
and float64 against the unfolded module), every HRNet norm is folded, and nothing else is."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from golden_hrnet import assert_golden_after
from torch import nn

from certseg.engine.models.fold_batchnorm import fold_batchnorm

from segmenters import randomise_norms


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(type(m) is kind for m in model.modules())


def test_golden_parity_after_folding(golden: Path) -> None:
    """The official code's outputs on the golden config, from the folded model, within the unfolded tolerance."""
    folded: list[int] = []
    net = assert_golden_after(golden, lambda model: folded.append(fold_batchnorm(model)))
    assert folded[0] > 0 and _count(net, nn.BatchNorm2d) == 0  # every norm folded


def test_folded_equals_unfolded_in_float64(small_adm_and_hrnet) -> None:
    _, segmenter = small_adm_and_hrnet
    unfolded = randomise_norms(copy.deepcopy(segmenter)).double()
    folded = copy.deepcopy(unfolded)
    assert fold_batchnorm(folded) == _count(unfolded, nn.BatchNorm2d)
    x = torch.randn(2, 3, 40, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = unfolded(x), folded(x)
    assert want.abs().max().item() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_only_conv_then_norm_in_eval_mode_is_folded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3),               # no conv before it: kept
        nn.Conv2d(3, 4, 3, bias=True),   # conv with a bias, then a norm: folded
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),  # a ReLU between conv and norm: kept
        nn.ReLU(),
        nn.BatchNorm2d(4),
    )
    randomise_norms(model).eval()
    reference = copy.deepcopy(model)
    assert fold_batchnorm(model) == 1
    assert [type(m).__name__ for m in model] == ["BatchNorm2d", "Conv2d", "Identity", "ReLU", "Conv2d", "ReLU",
                                                "BatchNorm2d"]
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)

    training = randomise_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert fold_batchnorm(training.train()) == 0  # batch statistics: not an affine map of the conv's output
    assert type(training[1]) is nn.BatchNorm2d


def test_a_session_folds_its_own_copy() -> None:
    """Folded and unfolded sessions in one process get their own models; ONNX Runtime sessions never fold."""
    from certseg.engine.runtimes.local_backends import LocalBackend
    from certseg.engine.runtimes.settings import Settings

    folded = LocalBackend.open(Settings(method="segcertify", device="cpu"))
    plain = LocalBackend.open(Settings(method="segcertify", device="cpu", fold_batchnorm=False))
    assert folded.settings.fold_batchnorm and folded.settings.record()["fold_batchnorm"] is True
    assert _count(folded.segmenter.module, nn.BatchNorm2d) == 0
    assert _count(plain.segmenter.module, nn.BatchNorm2d) > 0
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(folded.segmenter.module(x), plain.segmenter.module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", [True, False])
def test_onnx_runtime_exports_the_unfolded_weights(fold: bool) -> None:
    from certseg.engine.runtimes.local_backends import LocalBackend
    from certseg.engine.runtimes.settings import Settings

    backend = LocalBackend.open(Settings(method="segcertify", device="cpu", runtime="onnx", fold_batchnorm=fold))
    assert _count(backend.segmenter.module, nn.BatchNorm2d) > 0


def test_only_torch_runs_fold() -> None:
    from certseg.engine.runtimes.settings import Settings

    assert Settings(device="cpu").folds_batchnorm
    assert not Settings(device="cpu", fold_batchnorm=False).folds_batchnorm
    assert not Settings(device="cpu", runtime="onnx").folds_batchnorm
    assert not Settings(device="cpu", precision="int8").folds_batchnorm  # int8 runs on ONNX Runtime
