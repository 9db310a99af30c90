"""Mask2Former head (ViT-Adapter's mmseg ``Mask2FormerHead``) for semantic inference, in plain PyTorch.

Module names follow the mmcv/mmdet 2.x building blocks so that ``state_dict()`` keys equal the official ones:
``ConvModule`` (``conv``, ``gn``), ``FFN`` (``layers.0.0``, ``layers.1``), ``BaseTransformerLayer``
(``attentions``, ``ffns``, ``norms``) and mmcv ``MultiheadAttention`` (``attn.in_proj_weight``, ``attn.out_proj``).
Tensors are batch-first here (the official code is sequence-first); the maths is the same.
Inference only: dropout and the training losses are not built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ms_deform_attn import MSDeformAttn, Shapes, level_maps, reference_points, tokens

ACTIVATIONS: dict[str, type[nn.Module]] = {"ReLU": nn.ReLU, "GELU": nn.GELU}


def sine_position_encoding(height: int, width: int, cfg: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """mmcv ``SinePositionalEncoding`` of an unpadded (H, W) map: (1, 2·num_feats, H, W), [pos_y | pos_x].

    Each half interleaves sin (even channels) and cos (odd) of position / 10000^(2⌊i/2⌋/num_feats); with
    ``normalize`` the positions 1..H become (y + offset) / (H + eps) · scale, in float32 as mmcv computes them.
    """
    num_feats, temperature = cfg["num_feats"], cfg.get("temperature", 10000)
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)

    def encode(length: int) -> torch.Tensor:
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        if cfg.get("normalize", False):
            eps, scale = cfg.get("eps", 1e-6), cfg.get("scale", 2 * math.pi)
            pos = (pos + cfg.get("offset", 0.0)) / (pos[-1:] + eps) * scale
        pos = pos[:, None] / dim_t
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(height)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(width)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None]


class ConvNorm(nn.Module):
    """mmcv ``ConvModule`` with GroupNorm (keys ``conv``, ``gn``) and an optional activation."""

    def __init__(
        self, cin: int, cout: int, kernel: int, bias: bool, norm_cfg: Mapping[str, Any], act: nn.Module | None
    ) -> None:
        super().__init__()
        if norm_cfg["type"] != "GN":
            raise ValueError(f"pixel decoder norm_cfg type {norm_cfg['type']!r} is not supported (only GN)")
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(norm_cfg["num_groups"], cout)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.conv(x))
        return x if self.act is None else self.act(x)


class FFN(nn.Module):
    """mmcv ``FFN`` with its identity: x + Linear(act(Linear(x)) ...)."""

    def __init__(self, dim: int, hidden: int, num_fcs: int, act: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(num_fcs - 1):
            layers.append(nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act]()))
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


def build_ffn(layer_cfg: Mapping[str, Any], dim: int) -> FFN:
    """The FFN of an mmcv ``BaseTransformerLayer``; a layer-level ``feedforward_channels`` overrides ffn_cfgs."""
    ffn_cfg = layer_cfg["ffn_cfgs"]
    hidden = layer_cfg.get("feedforward_channels", ffn_cfg["feedforward_channels"])
    return FFN(dim, hidden, ffn_cfg.get("num_fcs", 2), ffn_cfg.get("act_cfg", {"type": "ReLU"})["type"])


def check_operation_order(layer_cfg: Mapping[str, Any], expected: Sequence[str]) -> None:
    """Only the post-norm orders of the official configs are built; anything else would be silently wrong."""
    if tuple(layer_cfg["operation_order"]) != tuple(expected):
        raise ValueError(f"operation_order {layer_cfg['operation_order']} is not supported (need {expected})")


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + MSDA(x + pos, value=x)); x = LN(FFN(x))."""

    def __init__(self, layer_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        check_operation_order(layer_cfg, ("self_attn", "norm", "ffn", "norm"))
        attn = layer_cfg["attn_cfgs"]
        dim = attn["embed_dims"]
        self.attentions = nn.ModuleList([MSDeformAttn(dim, attn["num_heads"], attn["num_levels"], attn["num_points"])])
        self.ffns = nn.ModuleList([build_ffn(layer_cfg, dim)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = self.norms[0](x + self.attentions[0](x + pos, reference, x, shapes))
        return self.norms[1](self.ffns[0](x))


class DeformableEncoder(nn.Module):
    """mmdet ``DetrTransformerEncoder`` as the pixel decoder uses it: the layers in turn, no final norm."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(cfg["transformerlayers"]) for _ in range(cfg["num_layers"]))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, reference, shapes)
        return x


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder over the coarsest ``num_levels`` maps, then an FPN step for the finer ones.

    Level 0 is the coarsest (1/32). Returns the mask features (1/4) and the multi-scale memories, coarsest first.
    """

    def __init__(self, cfg: Mapping[str, Any], in_channels: Sequence[int], feat_channels: int, out_channels: int):
        super().__init__()
        layer_cfg = cfg["encoder"]["transformerlayers"]
        self.num_levels = layer_cfg["attn_cfgs"]["num_levels"]
        self.num_outs = cfg["num_outs"]
        self.position_cfg = dict(cfg["positional_encoding"])
        norm_cfg, num_inputs = cfg["norm_cfg"], len(in_channels)
        self.input_convs = nn.ModuleList(
            ConvNorm(in_channels[i], feat_channels, 1, True, norm_cfg, None)
            for i in range(num_inputs - 1, num_inputs - self.num_levels - 1, -1)
        )
        self.encoder = DeformableEncoder(cfg["encoder"])
        self.level_encoding = nn.Embedding(self.num_levels, feat_channels)
        fpn_levels = range(num_inputs - self.num_levels - 1, -1, -1)
        act = ACTIVATIONS[cfg["act_cfg"]["type"]]
        self.lateral_convs = nn.ModuleList(
            ConvNorm(in_channels[i], feat_channels, 1, False, norm_cfg, None) for i in fpn_levels
        )
        self.output_convs = nn.ModuleList(
            ConvNorm(feat_channels, feat_channels, 3, False, norm_cfg, act()) for _ in fpn_levels
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        num_inputs = len(feats)
        inputs, positions, shapes = [], [], []
        for i in range(self.num_levels):
            feat = feats[num_inputs - 1 - i]
            height, width = feat.shape[-2:]
            level_pos = self.level_encoding.weight[i].view(1, -1, 1, 1) + sine_position_encoding(
                height, width, self.position_cfg, feat.device
            )
            inputs.append(tokens(self.input_convs[i](feat)))
            positions.append(tokens(level_pos))
            shapes.append((height, width))
        reference = reference_points(shapes, feats[0].device)
        memory = self.encoder(torch.cat(inputs, 1), torch.cat(positions, 1), reference, shapes)
        outs = level_maps(memory, shapes)
        # mmdet indexes lateral_convs[i] with feats[i] (identical while there is a single FPN level).
        for i in range(num_inputs - self.num_levels - 1, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            up = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + up))
        return self.mask_feature(outs[-1]), outs[: self.num_outs]


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (in_proj packed as [Wq; Wk; Wv]) with a plain, exportable forward."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` True = may not attend (torch's boolean convention), broadcastable to (B, heads, Q, K)."""
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return self.out_proj(out)


class DecoderAttention(nn.Module):
    """mmcv ``MultiheadAttention`` wrapper: positions added to query and key, residual on the bare query."""

    def __init__(self, attn_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.attn = MultiheadAttention(attn_cfg["embed_dims"], attn_cfg["num_heads"])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return query + self.attn(query + query_pos, key + key_pos, key, mask)


class MaskedDecoderLayer(nn.Module):
    """Post-norm Mask2Former layer: masked cross-attention, LN, self-attention, LN, FFN, LN."""

    def __init__(self, layer_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        check_operation_order(layer_cfg, ("cross_attn", "norm", "self_attn", "norm", "ffn", "norm"))
        dim = layer_cfg["attn_cfgs"]["embed_dims"]
        self.attentions = nn.ModuleList(DecoderAttention(layer_cfg["attn_cfgs"]) for _ in range(2))
        self.ffns = nn.ModuleList([build_ffn(layer_cfg, dim)])
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        query = self.norms[0](self.attentions[0](query, memory, query_pos, memory_pos, mask))
        query = self.norms[1](self.attentions[1](query, query, query_pos, query_pos))
        return self.norms[2](self.ffns[0](query))


class MaskedTransformerDecoder(nn.Module):
    """mmdet ``DetrTransformerDecoder``: the layers plus the ``post_norm`` that every prediction head applies."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        layer_cfg = cfg["transformerlayers"]
        self.layers = nn.ModuleList(MaskedDecoderLayer(layer_cfg) for _ in range(cfg["num_layers"]))
        self.post_norm = nn.LayerNorm(layer_cfg["attn_cfgs"]["embed_dims"])


class Mask2FormerHead(nn.Module):
    """Pixel decoder, masked-attention decoder and the class/mask predictions after every layer."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        feat_channels, out_channels = cfg["feat_channels"], cfg["out_channels"]
        self.in_index = list(cfg["in_index"])
        self.num_classes = cfg["num_things_classes"] + cfg["num_stuff_classes"]
        self.num_levels = cfg["num_transformer_feat_level"]
        self.position_cfg = dict(cfg["positional_encoding"])
        pixel_cfg = cfg["pixel_decoder"]
        if pixel_cfg["encoder"]["transformerlayers"]["attn_cfgs"]["num_levels"] != self.num_levels:
            raise ValueError("pixel decoder num_levels must equal num_transformer_feat_level")
        in_channels = [cfg["in_channels"][i] for i in self.in_index]
        self.pixel_decoder = MSDeformAttnPixelDecoder(pixel_cfg, in_channels, feat_channels, out_channels)
        self.transformer_decoder = MaskedTransformerDecoder(cfg["transformer_decoder"])
        decoder_dim = cfg["transformer_decoder"]["transformerlayers"]["attn_cfgs"]["embed_dims"]
        project = decoder_dim != feat_channels or cfg.get("enforce_decoder_input_project", False)
        self.decoder_input_projs = nn.ModuleList(
            nn.Conv2d(feat_channels, decoder_dim, 1) if project else nn.Identity() for _ in range(self.num_levels)
        )
        self.query_embed = nn.Embedding(cfg["num_queries"], feat_channels)
        self.query_feat = nn.Embedding(cfg["num_queries"], feat_channels)
        self.level_embed = nn.Embedding(self.num_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, self.num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(),
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(),
            nn.Linear(feat_channels, out_channels),
        )

    def forward_head(
        self, query: torch.Tensor, mask_features: torch.Tensor, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits (B, Q, C+1), mask logits (B, Q, H/4, W/4) and the next layer's attention mask.

        The mask is True (blocked) where sigmoid(mask logit resized to the target level) < 0.5.
        """
        query = self.transformer_decoder.post_norm(query)
        mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(query), mask_features)
        resized = F.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False)
        return self.cls_embed(query), mask, resized.flatten(2).sigmoid() < 0.5

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class and mask logits of the initial queries and after each decoder layer (the last one is used)."""
        mask_features, memories = self.pixel_decoder([feats[i] for i in self.in_index])
        inputs, positions = [], []
        for i, memory in enumerate(memories):
            inputs.append(tokens(self.decoder_input_projs[i](memory)) + self.level_embed.weight[i])
            positions.append(tokens(sine_position_encoding(*memory.shape[-2:], self.position_cfg, memory.device)))
        query = self.query_feat.weight.expand(mask_features.shape[0], -1, -1)
        query_pos = self.query_embed.weight[None]
        cls, mask, blocked = self.forward_head(query, mask_features, memories[0].shape[-2:])
        cls_list, mask_list = [cls], [mask]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels
            blocked = blocked & ~blocked.all(-1, keepdim=True)  # a fully blocked row attends everywhere
            query = layer(query, query_pos, inputs[level], positions[level], blocked[:, None])
            cls, mask, blocked = self.forward_head(query, mask_features, memories[(i + 1) % self.num_levels].shape[-2:])
            cls_list.append(cls)
            mask_list.append(mask)
        return cls_list, mask_list

    def semantic_scores(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``forward_test``: Σ_q softmax(cls_q)[:C] · sigmoid(mask_q) at 1/4 resolution, values in [0, Q]."""
        cls_list, mask_list = self(feats)
        return semantic_inference(cls_list[-1], mask_list[-1])


def semantic_inference(cls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over all C+1 classes, drop no-object, weight the sigmoid masks: (B, C, h, w)."""
    return torch.einsum("bqc,bqhw->bchw", cls.softmax(-1)[..., :-1], mask.sigmoid())
