"""ADM, the guided-diffusion UNet (Dhariwal & Nichol 2021), in plain PyTorch.

The module tree mirrors ``guided_diffusion/unet.py`` ``UNetModel`` so that ``state_dict()`` has the official
key names, order and shapes and the released checkpoints load with ``strict=True``. The maths copies the
official code where it matters for parity: cos-first float32 timestep embedding, GroupNorm(32) computed in
float32, the legacy per-head [q, k, v] channel grouping, fp32 softmax, scale-shift norm, [h, skip] concat order.

``use_fp16`` and ``use_checkpoint`` are accepted and ignored: mixed precision comes from autocast (or a
``.half()`` model), and gradient checkpointing is a training concern. The forward pass has no Python control
flow on tensor values, so it traces and exports to ONNX with a dynamic batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 1000
"""Label count of guided-diffusion's class-conditional ImageNet models (``class_cond=True``)."""

ADM_256_UNCOND: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "learn_sigma": True,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "32,16,8",
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "dropout": 0.0,
    "resblock_updown": True,
    "use_fp16": True,
    "use_new_attention_order": False,
}
"""``create_model`` flags of ``256x256_diffusion_uncond.pt`` (guided-diffusion README, other flags at defaults)."""

PRESETS: dict[str, dict[str, Any]] = {"adm-256-uncond": ADM_256_UNCOND}

_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# create_model's keywords and defaults; the first three have no default there.
_CREATE_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": None,
    "num_channels": None,
    "num_res_blocks": None,
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "attention_resolutions": "16",
    "num_heads": 1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "dropout": 0.0,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t·f), sin(t·f)], f_i = exp(-ln(max_period)·i/half), float32.

    Cos comes first and the frequencies are float32, as in the official code (other choices move the output).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input dtype (the official fp16 recipe).

    The affine parameters are used in float32 too, so a model cast to half as a whole still normalises in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: the official init of every residual branch's last layer."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class TimestepBlock(nn.Module):
    """Marker base: a block whose ``forward(x, emb)`` also takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the layers that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (``conv`` key) when ``use_conv``; the channel count is kept."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv when ``use_conv``, else 2x2 average pooling (either under the ``op`` key)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GN-SiLU-conv, timestep injection (add, or GN·(1+scale)+shift), GN-SiLU-dropout-conv, plus a skip.

    With ``up``/``down`` the resample sits between in_layers' SiLU and conv, and the skip gets the same
    resample (no conv); a 1x1 ``skip_connection`` conv appears whenever the channel count changes.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax_s(q_t·k_s / sqrt(ch)) v for (N, ch, T) tensors; q and k each scaled by ch^-1/4, fp32 softmax."""
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.matmul((q * scale).transpose(1, 2), k * scale)  # (N, T_query, T_key)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.matmul(v, weight.transpose(1, 2))  # (N, ch, T)


class QKVAttentionLegacy(nn.Module):
    """Legacy split: the 3C qkv channels are grouped per head as [q_h, k_h, v_h] (the released checkpoints)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(-1, 3 * ch, length).split(ch, dim=1)
        return _attention(q, k, v).reshape(batch, -1, length)


class QKVAttention(nn.Module):
    """New split (``use_new_attention_order``): channels are [Q | K | V], each then split into heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (part.reshape(-1, ch, length) for part in qkv.chunk(3, dim=1))
        return _attention(q, k, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions (row-major), with the residual on the un-normalised input."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads) if use_new_attention_order else QKVAttentionLegacy(num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, height, width)


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-D) with the official attribute layout.

    ``attention_resolutions`` are downsample rates ds (attention runs where the feature map is image/ds).
    ``forward(x, timesteps, y=None)`` returns (B, out_channels, H, W); with learn_sigma, channels 0-2 are eps
    and 3-5 the variance interpolation values.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels: int, out: int, **updown: bool) -> ResBlock:
            return ResBlock(channels, time_embed_dim, dropout, out, use_scale_shift_norm, **updown)

        def attention(channels: int, heads: int) -> AttentionBlock:
            return AttentionBlock(channels, heads, num_head_channels, use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), raw integer timesteps (B,), labels (B,) only for class-conditional models."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y exactly when the model is class-conditional")
        temb = timestep_embedding(timesteps, self.model_channels)  # float32, as the official code
        emb = self.time_embed(temb.type(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        # The official model casts its input to its own compute dtype (float32 unless converted to half).
        h = x.type(self.input_blocks[0][0].weight.dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _as_bool(name: str, value: Any) -> bool:
    """A bool given as bool, 0/1 or the strings guided-diffusion's str2bool accepts."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("yes", "true", "t", "y", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | str):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _number_list(name: str, value: Any) -> list[float]:
    """'1,1,2' or [1, 1, 2] -> [1.0, 1.0, 2.0]."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items:
        raise ValueError(f"{name} must be a comma-separated string or a non-empty list, got {value!r}")
    return [_as_float(name, item) for item in items]


def parse_channel_mult(channel_mult: Any, image_size: int) -> tuple[float, ...]:
    """create_model's rule: "" picks the size-dependent default; else a string or list of multipliers."""
    if channel_mult in ("", None):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        return _DEFAULT_CHANNEL_MULT[image_size]
    mults = _number_list("channel_mult", channel_mult)
    if any(m <= 0 for m in mults):
        raise ValueError(f"channel_mult entries must be > 0, got {channel_mult!r}")
    return tuple(int(m) if m.is_integer() else m for m in mults)


def parse_attention_resolutions(attention_resolutions: Any, image_size: int) -> tuple[int, ...]:
    """Image resolutions ("32,16,8" or [32, 16, 8]) -> downsample rates ds = image_size // res."""
    resolutions = [int(r) for r in _number_list("attention_resolutions", attention_resolutions)]
    if any(r <= 0 or image_size % r for r in resolutions):
        raise ValueError(f"attention_resolutions {attention_resolutions!r} must divide image_size {image_size}")
    return tuple(image_size // r for r in resolutions)


def build_adm(create_model_kwargs: Mapping[str, Any]) -> ADMUNet:
    """The model guided-diffusion's ``script_util.create_model(**create_model_kwargs)`` builds.

    Accepts the keywords as stored in configs or parsed from command lines: booleans as bool or "True"/"False",
    ``channel_mult`` as "" / "1,1,2,2,4,4" / a list, ``attention_resolutions`` as "32,16,8" or a list of image
    resolutions. Unknown keywords raise ValueError (a typo would otherwise silently build another model).
    """
    unknown = sorted(set(create_model_kwargs) - set(_CREATE_MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown create_model keywords {unknown}; known: {sorted(_CREATE_MODEL_DEFAULTS)}")
    kwargs = {**_CREATE_MODEL_DEFAULTS, **create_model_kwargs}
    missing = [k for k, v in kwargs.items() if v is None and k in ("image_size", "num_channels", "num_res_blocks")]
    if missing:
        raise ValueError(f"create_model needs {missing}")
    image_size = _as_int("image_size", kwargs["image_size"])
    dropout = _as_float("dropout", kwargs["dropout"])
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    # use_fp16 / use_checkpoint: validated, then ignored (autocast does mixed precision here).
    _as_bool("use_fp16", kwargs["use_fp16"])
    _as_bool("use_checkpoint", kwargs["use_checkpoint"])
    return ADMUNet(
        image_size=image_size,
        in_channels=3,
        model_channels=_as_int("num_channels", kwargs["num_channels"]),
        out_channels=6 if _as_bool("learn_sigma", kwargs["learn_sigma"]) else 3,
        num_res_blocks=_as_int("num_res_blocks", kwargs["num_res_blocks"]),
        attention_resolutions=parse_attention_resolutions(kwargs["attention_resolutions"], image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(kwargs["channel_mult"], image_size),
        num_classes=NUM_CLASSES if _as_bool("class_cond", kwargs["class_cond"]) else None,
        num_heads=_as_int("num_heads", kwargs["num_heads"]),
        num_head_channels=_as_int("num_head_channels", kwargs["num_head_channels"]),
        num_heads_upsample=_as_int("num_heads_upsample", kwargs["num_heads_upsample"]),
        use_scale_shift_norm=_as_bool("use_scale_shift_norm", kwargs["use_scale_shift_norm"]),
        resblock_updown=_as_bool("resblock_updown", kwargs["resblock_updown"]),
        use_new_attention_order=_as_bool("use_new_attention_order", kwargs["use_new_attention_order"]),
    )
