"""Full-size checks with real memory (run by hand: ``pytest -m full tests/test_full_size.py``, one at a time).

The official ADM-256 (553M parameters, 2.2 GB in fp32) and HRNetV2-W48 (65.9M) with random weights: ONNX export
at their real sizes (the ADM through external data), dynamic batch, ONNX Runtime against PyTorch. Minutes each
on 2 CPU cores; never run two at once (memory).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from certseg.export.denoiser import export_denoiser
from certseg.export.segmenter import export_segmenter

pytestmark = pytest.mark.full


def _randomise_zero_init(module: torch.nn.Module, seed: int) -> None:
    """The official init zeroes the last convs (ε ≡ 0); give every all-zero weight random values instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1 and not parameter.any():
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)


def _worst(parity: list[dict[str, float]]) -> dict[str, float]:
    worst = max(parity, key=lambda stats: stats["max_abs"] / max(1.0, stats["ref_max_abs"]))
    print(f"worst fp32 parity: {worst}")  # shown with -s; the figures go into release notes
    return worst


def test_adm_256_uncond_exports_with_external_data_and_matches_torch(tmp_path: Path) -> None:
    from certseg.engine.models.adm import ADM_256_UNCOND, build_adm

    torch.manual_seed(0)
    model = build_adm(ADM_256_UNCOND).eval()
    assert sum(p.numel() for p in model.parameters()) == 552_814_086
    _randomise_zero_init(model, 1)
    graph = export_denoiser(model, tmp_path / "denoiser.onnx", image_size=256, parity_batches=(1, 2))
    assert graph.external_data and graph.data_path.stat().st_size > 2_000_000_000
    assert [stats["batch"] for stats in graph.parity["fp32"]] == [1, 2]  # dynamic batch
    worst = _worst(graph.parity["fp32"])
    assert worst["max_abs"] <= 1e-4 * max(1.0, worst["ref_max_abs"]), worst


def test_hrnet_w48_cityscapes_exports_at_1024x2048_and_matches_torch(tmp_path: Path) -> None:
    from certseg.engine.models.hrnet import build_preset

    torch.manual_seed(0)
    model = build_preset("hrnetv2-w48-cityscapes").eval()
    assert sum(p.numel() for p in model.parameters()) == 65_859_379
    graph = export_segmenter(model, tmp_path / "segmenter.onnx", example_size=(1024, 2048), parity_batches=(1, 2))
    worst = _worst(graph.parity["fp32"])
    assert worst["max_abs"] <= 1e-4 * max(1.0, worst["ref_max_abs"]), worst
    assert min(stats["argmax_agreement"] for stats in graph.parity["fp32"]) > 0.9999
