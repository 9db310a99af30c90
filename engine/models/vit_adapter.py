"""ViT-Adapter semantic segmenter (BEiT-Adapter + Mask2Former) in plain PyTorch, keyed like the official checkpoints.

Rebuilds czczup/ViT-Adapter ``segmentation/`` (mmseg 0.20 ``EncoderDecoderMask2Former``) without mmcv/mmseg, from
the same config vocabulary: :func:`build_vit_adapter` takes the mmseg ``model`` dict, ``model(x)`` gives the
``encode_decode`` class scores of a normalised (B, 3, H, W) batch at its own size, :func:`slide_inference` the
official sliding-window scores; the released mmcv checkpoints load through ``certseg.engine.models.registry``
(:func:`check_relative_position_indices` and :func:`rebuild_relative_position_indices` are its hooks).
The scores are Σ_q p(class|q)·sigmoid(mask_q), not logits (the argmax is the prediction; the official
``inference`` softmaxes them over classes first, which keeps the argmax).
Inference only: dropout, drop-path and checkpointing have no effect in eval and are not built.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from .mask2former import Mask2FormerHead
from .ms_deform_attn import MSDeformAttn, Shapes, level_maps, reference_points, tokens

LN_EPS = 1e-6  # BEiT and the adapter (timm-style LayerNorm); the head uses torch's 1e-5.
ADAPTER_LEVELS = 3  # the spatial prior module's 1/8, 1/16, 1/32 token levels

# BEiT/BEiTAdapter constructor defaults for keys a config may leave out.
BACKBONE_DEFAULTS: dict[str, Any] = {
    "img_size": 512,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": False,
    "use_rel_pos_bias": True,
    "init_values": 0.0,
    "conv_inplane": 64,
    "n_points": 4,
    "deform_num_heads": 6,
    "cffn_ratio": 0.25,
    "deform_ratio": 1.0,
}
# Options whose other values the official classes accept but this rebuild does not: refused, never ignored.
BACKBONE_FIXED: dict[str, Any] = {
    "patch_size": 16,  # the adapter's level grids are hard-wired to /8, /16, /32
    "use_abs_pos_emb": False,
    "use_shared_rel_pos_bias": False,
    "with_cffn": True,
    "add_vit_feature": True,
    "qk_scale": None,
    "attn_head_dim": None,
}
EXPECTED_TYPES: dict[tuple[str, ...], str] = {
    ("type",): "EncoderDecoderMask2Former",
    ("backbone", "type"): "BEiTAdapter",
    ("decode_head", "type"): "Mask2FormerHead",
    ("decode_head", "pixel_decoder", "type"): "MSDeformAttnPixelDecoder",
    ("decode_head", "pixel_decoder", "positional_encoding", "type"): "SinePositionalEncoding",
    ("decode_head", "pixel_decoder", "encoder", "transformerlayers", "attn_cfgs", "type"): (
        "MultiScaleDeformableAttention"
    ),
    ("decode_head", "positional_encoding", "type"): "SinePositionalEncoding",
    ("decode_head", "transformer_decoder", "transformerlayers", "attn_cfgs", "type"): "MultiheadAttention",
}


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """mmcv's ``to_2tuple`` for sizes given as an int or an (H, W) pair."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


# ---------------------------------------------------------------------------------------------------- BEiT


def relative_position_index(grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """BEiT's (N+1, N+1) int64 index into a block's bias table for an (H, W) patch grid plus the cls token.

    Patch i→j reads (Δrow + H−1)·(2W−1) + (Δcol + W−1) with Δ = pos_i − pos_j; the cls row, cls column and
    the cls→cls corner read the table's last three entries. Released checkpoints omit this buffer.
    """
    rows, cols = grid
    size = (2 * rows - 1) * (2 * cols - 1) + 3
    mesh = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    coords = torch.stack(mesh).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :]
    index = torch.empty((rows * cols + 1,) * 2, dtype=torch.long, device=device)
    index[1:, 1:] = (delta[0] + rows - 1) * (2 * cols - 1) + (delta[1] + cols - 1)
    index[0, :] = size - 3
    index[:, 0] = size - 2
    index[0, 0] = size - 1
    return index


class BEiTAttention(nn.Module):
    """Global attention with BEiT's qkv bias cat(q_bias, 0, v_bias) (k has none) and a per-block rel-pos bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads, self.grid = num_heads, grid
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        if grid is None:
            self.relative_position_bias_table = None
        else:
            table_size = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            tokens_n = self.relative_position_index.shape[0]
            rel = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            attn = attn + rel.view(tokens_n, tokens_n, -1).permute(2, 0, 1)[None]
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """fc1, exact-erf GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class BEiTBlock(nn.Module):
    """Pre-norm block with layer scale: x += γ1·Attn(LN(x)); x += γ2·MLP(LN(x))."""

    def __init__(self, cfg: Mapping[str, Any], grid: tuple[int, int] | None) -> None:
        super().__init__()
        dim = cfg["embed_dim"]
        self.gamma_1 = nn.Parameter(cfg["init_values"] * torch.ones(dim))
        self.gamma_2 = nn.Parameter(cfg["init_values"] * torch.ones(dim))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = BEiTAttention(dim, cfg["num_heads"], cfg["qkv_bias"], grid)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * cfg["mlp_ratio"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """16×16 stride-16 conv to row-major tokens (no absolute position embedding in these configs)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tokens(self.proj(x))


# ------------------------------------------------------------------------------------------------- adapter


def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """3×3 conv without bias, BatchNorm (eval: running statistics), ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SpatialPriorModule(nn.Module):
    """Conv stem giving c1 (1/4) and c2..c4 (1/8, 1/16, 1/32), each projected to the ViT width by 1×1 convs."""

    def __init__(self, planes: int, dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn_relu(3, planes, 2),
            *conv_bn_relu(planes, planes, 1),
            *conv_bn_relu(planes, planes, 1),
            nn.MaxPool2d(3, 2, 1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(planes, 2 * planes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * planes, 4 * planes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * planes, 4 * planes, 2))
        self.fc1 = nn.Conv2d(planes, dim, 1)
        self.fc2 = nn.Conv2d(2 * planes, dim, 1)
        self.fc3 = nn.Conv2d(4 * planes, dim, 1)
        self.fc4 = nn.Conv2d(4 * planes, dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), [self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class DWConv(nn.Module):
    """Depthwise 3×3 conv run separately on each level's grid of the concatenated tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        return torch.cat([tokens(self.dwconv(part)) for part in level_maps(x, shapes)], dim=1)


class ConvFFN(nn.Module):
    """fc1, per-level depthwise conv, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), shapes)))


class Geometry(NamedTuple):
    """Grids and reference points shared by every interaction block of one input size."""

    grid: tuple[int, int]  # ViT patch grid (1/16)
    levels: list[tuple[int, int]]  # adapter token levels (1/8, 1/16, 1/32)
    inject_reference: torch.Tensor  # centres of the 1/16 grid: the ViT tokens query the adapter levels
    extract_reference: torch.Tensor  # centres of the three levels: the adapter tokens query the ViT grid


class Injector(nn.Module):
    """ViT tokens += γ ⊙ MSDA(LN(x) → LN(c) over the three adapter levels)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        dim = cfg["embed_dim"]
        self.gamma = nn.Parameter(cfg["init_values"] * torch.ones(dim))
        self.query_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MSDeformAttn(dim, cfg["deform_num_heads"], ADAPTER_LEVELS, cfg["n_points"], cfg["deform_ratio"])

    def forward(self, x: torch.Tensor, c: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        attn = self.attn(self.query_norm(x), geometry.inject_reference, self.feat_norm(c), geometry.levels)
        return x + self.gamma * attn


class Extractor(nn.Module):
    """Adapter tokens += MSDA(LN(c) → LN(x) on the 1/16 grid) (no γ), then += ConvFFN(LN(c))."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        dim = cfg["embed_dim"]
        self.query_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MSDeformAttn(dim, cfg["deform_num_heads"], 1, cfg["n_points"], cfg["deform_ratio"])
        self.ffn = ConvFFN(dim, int(dim * cfg["cffn_ratio"]))
        self.ffn_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, c: torch.Tensor, x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), geometry.extract_reference, self.feat_norm(x), [geometry.grid])
        return c + self.ffn(self.ffn_norm(c), geometry.levels)


class InteractionBlock(nn.Module):
    """Injector, the block's BEiT blocks (the cls token rides along), extractor(s)."""

    def __init__(self, cfg: Mapping[str, Any], extra_extractors: int) -> None:
        super().__init__()
        self.injector = Injector(cfg)
        self.extractor = Extractor(cfg)
        self.extra_extractors = nn.Sequential(*(Extractor(cfg) for _ in range(extra_extractors)))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cls: torch.Tensor, blocks: nn.ModuleList, geometry: Geometry
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat((cls, self.injector(x, c, geometry)), dim=1)
        for block in blocks:
            x = block(x)
        cls, x = x[:, :1], x[:, 1:]
        for extractor in (self.extractor, *self.extra_extractors):
            c = extractor(c, x, geometry)
        return x, c, cls


class BEiTAdapter(nn.Module):
    """BEiT with the ViT-Adapter: four pyramid features f1..f4 (1/4..1/32), ViT width, after BatchNorm.

    The rel-pos tables fix the patch grid at build time, so the input must be exactly ``img_size``.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = {**BACKBONE_DEFAULTS, **cfg}
        dim = cfg["embed_dim"]
        self.img_size = pair(cfg["img_size"])
        self.interaction_indexes = [tuple(pair_) for pair_ in cfg["interaction_indexes"]]
        patch = cfg["patch_size"]
        grid = (self.img_size[0] // patch, self.img_size[1] // patch) if cfg["use_rel_pos_bias"] else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.level_embed = nn.Parameter(torch.zeros(ADAPTER_LEVELS, dim))
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList(BEiTBlock(cfg, grid) for _ in range(cfg["depth"]))
        self.spm = SpatialPriorModule(cfg["conv_inplane"], dim)
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.Sequential(
            *(InteractionBlock(cfg, 2 if i == last else 0) for i in range(len(self.interaction_indexes)))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm3 = nn.BatchNorm2d(dim)
        self.norm4 = nn.BatchNorm2d(dim)

    def geometry(self, device: torch.device) -> Geometry:
        height, width = self.img_size
        levels = [(height // 8, width // 8), (height // 16, width // 16), (height // 32, width // 32)]
        return Geometry(levels[1], levels, reference_points([levels[1]], device), reference_points(levels, device))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != self.img_size:
            raise InputError(
                f"the BEiT-Adapter backbone takes exactly {self.img_size} inputs (its rel-pos tables fix the "
                f"grid), got {tuple(x.shape[-2:])}; use slide_inference for other sizes"
            )
        geometry = self.geometry(x.device)
        c1, adapter_maps = self.spm(x)
        c = torch.cat([tokens(level) + self.level_embed[i] for i, level in enumerate(adapter_maps)], dim=1)
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        vit_maps = []
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes, strict=True):
            x, c, cls = layer(x, c, cls, self.blocks[first : last + 1], geometry)
            vit_maps.append(x.transpose(1, 2).unflatten(-1, geometry.grid))
        c2, c3, c4 = level_maps(c, geometry.levels)
        c1 = self.up(c2) + c1
        outs = []
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        for feat, vit, scale, norm in zip((c1, c2, c3, c4), vit_maps, (4, 2, 1, 0.5), norms, strict=True):
            if scale != 1:
                vit = F.interpolate(vit, scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(norm(feat + vit))
        return outs


# ----------------------------------------------------------------------------------------------- segmenter


class ViTAdapterSegmenter(nn.Module):
    """``EncoderDecoderMask2Former``: backbone → Mask2Former semantic scores, bilinear to the input size."""

    def __init__(
        self,
        backbone: BEiTAdapter,
        decode_head: Mask2FormerHead,
        crop_size: tuple[int, int],
        stride: tuple[int, int],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.crop_size, self.stride = crop_size, stride
        self.num_classes = decode_head.num_classes

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Official ``encode_decode`` of a crop-sized batch: (B, K, H, W) scores."""
        scores = self.decode_head.semantic_scores(self.backbone(x))
        return F.interpolate(scores, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores at the input size: ``encode_decode`` for a crop-sized input, else :func:`slide_inference`."""
        if tuple(x.shape[-2:]) == self.crop_size:
            return self.encode_decode(x)
        return slide_inference(self, x)


def slide_windows(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, ...]]:
    """mmseg's windows (y1, y2, x1, x2), row by row; the last window of a row/column is moved back inside."""
    windows = []
    (height, width), (crop_h, crop_w), (stride_h, stride_w) = size, crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_inference(model: ViTAdapterSegmenter, x: torch.Tensor) -> torch.Tensor:
    """Official ``slide_inference(rescale=True)`` scores for a normalised (B, 3, H, W) batch of any size.

    Window scores are summed and divided by the per-pixel window count. An image smaller than the crop (which
    the official code passes unpadded, crashing the fixed-grid backbone) is zero-padded bottom/right to the crop,
    as the training pipeline's ``Pad(size=crop_size, pad_val=0)`` after ``Normalize`` does, and the scores are
    cropped back; at or above the crop size nothing is padded and the result is the official one.
    """
    height, width = x.shape[-2:]
    crop_h, crop_w = model.crop_size
    x = F.pad(x, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    scores = x.new_zeros((x.shape[0], model.num_classes, *x.shape[-2:]))
    count = x.new_zeros((1, 1, *x.shape[-2:]))
    for y1, y2, x1, x2 in slide_windows(tuple(x.shape[-2:]), model.crop_size, model.stride):
        scores[:, :, y1:y2, x1:x2] += model.encode_decode(x[:, :, y1:y2, x1:x2])
        count[:, :, y1:y2, x1:x2] += 1
    return (scores / count)[:, :, :height, :width]


# ------------------------------------------------------------------------------------------------- builder


def config_value(cfg: Mapping[str, Any], path: Sequence[str]) -> Any:
    """cfg[path[0]][path[1]]...; a ValueError naming the dotted path when a key is absent."""
    value: Any = cfg
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"model config lacks {'.'.join(path)}")
        value = value[key]
    return value


def check_model_cfg(model_cfg: Mapping[str, Any]) -> None:
    """Refuse configs this rebuild would get silently wrong: other module types or backbone options."""
    for path, expected in EXPECTED_TYPES.items():
        found = config_value(model_cfg, path)
        if found != expected:
            raise ValueError(f"model config {'.'.join(path)} is {found!r}; only {expected!r} is supported")
    for key in ("neck", "auxiliary_head"):
        if model_cfg.get(key):
            raise ValueError(f"model config has a {key}; the ViT-Adapter segmenters have none")
    backbone = model_cfg["backbone"]
    for key, required in BACKBONE_FIXED.items():
        if backbone.get(key, required) != required:
            raise ValueError(f"backbone {key}={backbone[key]!r} is not supported (only {required!r})")
    if backbone.get("init_values", 0.0) is None:
        raise ValueError("backbone init_values=None (no layer scale) is not supported")
    if len(config_value(backbone, ("interaction_indexes",))) != 4:
        raise ValueError("backbone interaction_indexes must list 4 interactions (one ViT feature per pyramid level)")


def build_vit_adapter(model_cfg: Mapping[str, Any]) -> ViTAdapterSegmenter:
    """The segmenter of an mmseg ``model`` dict (as the official configs/the golden JSON spell it), in eval mode.

    Crop and stride come from ``test_cfg`` (the crop must equal the backbone's ``img_size``); without them the
    crop is ``img_size`` and windows do not overlap.
    """
    check_model_cfg(model_cfg)
    backbone = BEiTAdapter(model_cfg["backbone"])
    decode_head = Mask2FormerHead(model_cfg["decode_head"])
    test_cfg = model_cfg.get("test_cfg") or {}
    crop = pair(test_cfg.get("crop_size", backbone.img_size))
    stride = pair(test_cfg.get("stride", crop))
    if crop != backbone.img_size:
        raise ValueError(f"test_cfg crop_size {crop} differs from backbone img_size {backbone.img_size}")
    return ViTAdapterSegmenter(backbone, decode_head, crop, stride).eval()


# ------------------------------------------------------------------------------------------------- presets


def official_model_cfg(things: int, stuff: int, crop: int, stride: int, with_cp: bool) -> dict[str, Any]:
    """``mask2former_beit_adapter_large_*_ss.py`` merged onto its ``_base_`` model, as ``tools/test.py`` builds it.

    The two datasets' configs differ only in these arguments (``with_cp`` changes memory use, not the maths).
    """
    num_classes = things + stuff
    test_cfg = {
        "panoptic_on": True,
        "semantic_on": False,
        "instance_on": True,
        "max_per_image": 100,
        "iou_thr": 0.8,
        "filter_low_score": True,
        "mode": "slide",
        "crop_size": [crop, crop],
        "stride": [stride, stride],
    }
    ffn_cp = {"with_cp": True} if with_cp else {}
    backbone = {
        "type": "BEiTAdapter",
        "patch_size": 16,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "mlp_ratio": 4,
        "qkv_bias": True,
        "use_abs_pos_emb": False,
        "use_rel_pos_bias": True,
        "img_size": crop,
        "init_values": 1e-6,
        "drop_path_rate": 0.3,
        "conv_inplane": 64,
        "n_points": 4,
        "deform_num_heads": 16,
        "cffn_ratio": 0.25,
        "deform_ratio": 0.5,
        **({"with_cp": True} if with_cp else {}),
        "interaction_indexes": [[0, 5], [6, 11], [12, 17], [18, 23]],
    }
    pixel_decoder = {
        "type": "MSDeformAttnPixelDecoder",
        "num_outs": 3,
        "norm_cfg": {"type": "GN", "num_groups": 32},
        "act_cfg": {"type": "ReLU"},
        "encoder": {
            "type": "DetrTransformerEncoder",
            "num_layers": 6,
            "transformerlayers": {
                "type": "BaseTransformerLayer",
                "attn_cfgs": {
                    "type": "MultiScaleDeformableAttention",
                    "embed_dims": 1024,
                    "num_heads": 32,
                    "num_levels": 3,
                    "num_points": 4,
                    "im2col_step": 64,
                    "dropout": 0.0,
                    "batch_first": False,
                    "norm_cfg": None,
                    "init_cfg": None,
                },
                "ffn_cfgs": {
                    "type": "FFN",
                    "embed_dims": 1024,
                    "feedforward_channels": 4096,
                    "num_fcs": 2,
                    "ffn_drop": 0.0,
                    **ffn_cp,
                    "act_cfg": {"type": "ReLU", "inplace": True},
                },
                "operation_order": ["self_attn", "norm", "ffn", "norm"],
            },
            "init_cfg": None,
        },
        "positional_encoding": {"type": "SinePositionalEncoding", "num_feats": 512, "normalize": True},
        "init_cfg": None,
    }
    transformer_decoder = {
        "type": "DetrTransformerDecoder",
        "return_intermediate": True,
        "num_layers": 9,
        "transformerlayers": {
            "type": "DetrTransformerDecoderLayer",
            "attn_cfgs": {
                "type": "MultiheadAttention",
                "embed_dims": 1024,
                "num_heads": 32,
                "attn_drop": 0.0,
                "proj_drop": 0.0,
                "dropout_layer": None,
                "batch_first": False,
            },
            "ffn_cfgs": {
                "embed_dims": 1024,
                "feedforward_channels": 4096,
                "num_fcs": 2,
                "act_cfg": {"type": "ReLU", "inplace": True},
                "ffn_drop": 0.0,
                "dropout_layer": None,
                **ffn_cp,
                "add_identity": True,
            },
            "feedforward_channels": 4096,
            "operation_order": ["cross_attn", "norm", "self_attn", "norm", "ffn", "norm"],
        },
        "init_cfg": None,
    }
    decode_head = {
        "type": "Mask2FormerHead",
        "in_channels": [1024, 1024, 1024, 1024],
        "feat_channels": 1024,
        "out_channels": 1024,
        "in_index": [0, 1, 2, 3],
        "num_things_classes": things,
        "num_stuff_classes": stuff,
        "num_queries": 100,
        "num_transformer_feat_level": 3,
        "pixel_decoder": pixel_decoder,
        "enforce_decoder_input_project": False,
        "positional_encoding": {"type": "SinePositionalEncoding", "num_feats": 512, "normalize": True},
        "transformer_decoder": transformer_decoder,
        "loss_cls": {
            "type": "CrossEntropyLoss",
            "use_sigmoid": False,
            "loss_weight": 2.0,
            "reduction": "mean",
            "class_weight": [1.0] * num_classes + [0.1],
        },
        "loss_mask": {"type": "CrossEntropyLoss", "use_sigmoid": True, "reduction": "mean", "loss_weight": 5.0},
        "loss_dice": {
            "type": "DiceLoss",
            "use_sigmoid": True,
            "activate": True,
            "reduction": "mean",
            "naive_dice": True,
            "eps": 1.0,
            "loss_weight": 5.0,
        },
        "train_cfg": None,
        "test_cfg": copy.deepcopy(test_cfg),
    }
    return {
        "type": "EncoderDecoderMask2Former",
        "pretrained": None,
        "backbone": backbone,
        "decode_head": decode_head,
        "train_cfg": None,
        "test_cfg": test_cfg,
        "init_cfg": None,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # configs/cityscapes/mask2former_beit_adapter_large_896_80k_cityscapes_ss.py (8 things + 11 stuff)
    "cityscapes": official_model_cfg(8, 11, crop=896, stride=512, with_cp=True),
    # configs/pascal_context/mask2former_beit_adapter_large_480_40k_pascal_context_59_ss.py (29 + 30)
    "pascal_context_59": official_model_cfg(29, 30, crop=480, stride=320, with_cp=False),
}


# ---------------------------------------------------------------------------------------------- checkpoints


def is_relative_position_index(name: str) -> bool:
    """BEiT's derived index buffers: absent from released checkpoints, rebuilt from the model's grid."""
    return name.endswith(".relative_position_index")


def check_relative_position_indices(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path
) -> None:
    """An index a checkpoint does carry must equal BEiT's deterministic one (the model keeps its own otherwise)."""
    for name, module in model.named_modules():
        if not isinstance(module, BEiTAttention) or module.grid is None:
            continue
        key = f"{name}.relative_position_index"
        index = relative_position_index(module.grid)
        found = state_dict.get(key)
        if found is not None and found.shape == index.shape and not torch.equal(found.long(), index):
            raise CheckpointError(f"checkpoint {source}: {key} differs from BEiT's index for grid {module.grid}")


def rebuild_relative_position_indices(model: nn.Module) -> None:
    """Recompute every index buffer from the model's grid (they are derived data, never learned)."""
    for module in model.modules():
        if isinstance(module, BEiTAttention) and module.grid is not None:
            module.relative_position_index.copy_(relative_position_index(module.grid))


def preset_factories() -> dict[str, Callable[[], nn.Module]]:
    """Builders of the official presets, for the loader's "it fits preset X" hint (built on meta)."""
    return {name: partial(build_vit_adapter, cfg) for name, cfg in PRESETS.items()}
