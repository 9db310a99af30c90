"""HRNetV2 semantic segmenter in plain PyTorch, keyed exactly as HRNet-Semantic-Segmentation's ``seg_hrnet.py``.

The module tree (stem ``conv1/bn1/conv2/bn2``, ``layer1``, ``transition1..3``, ``stage2..4`` of high-resolution
modules with ``branches`` and ``fuse_layers``, ``last_layer.0/1/3``) mirrors ``HighResolutionNet`` so official
checkpoints load with ``strict=True`` and ``state_dict()`` comes out in the official order. Facts copied from the
official code: BatchNorm is plain ``nn.BatchNorm2d`` (eps 1e-5, gamma used as is, not InPlaceABN's |gamma|+eps);
lower-resolution branches are conv1x1+BN'd *then* upsampled bilinearly to the target's exact size with the
config's ``ALIGN_CORNERS``; logits come out at 1/4 resolution and are not upsampled (the pipeline does that).
Sizes are read from tensors and no branch depends on values, so the model exports to ONNX with dynamic H/W.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from certseg.engine.models import fused_conv

OFFICIAL_EXTRAS: frozenset[str] = frozenset({"loss.criterion.weight"})
"""Non-model entries of official checkpoints: ``tools/train.py`` saves ``FullModel(model, loss)``, whose loss
carries the class weights. The ``model.`` prefix of the same wrapper is stripped by the generic loader."""

STEM_CHANNELS = 64  # hard-coded in the official stem, not part of EXTRA


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) + BN [+ ReLU] as the official ``nn.Sequential`` so keys read ``.0.weight`` / ``.1.*``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual; the official attribute names give the checkpoint keys."""

    expansion = 1
    CONV_BATCHNORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))  # for fold_batchnorm: each bn reads its conv only

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual, inplace=True)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with folded norms, each convolution with its ReLU and residual add in one call."""
        out = fused_conv.conv2d(self.conv1, x, relu=True)
        residual = x if self.downsample is None else fused_conv.sequential(self.downsample, x)
        return fused_conv.conv2d(self.conv2, out, relu=True, add=residual)


class Bottleneck(nn.Module):
    """1x1 → 3x3 → 1x1 (x4 channels) conv+BN with a residual, as the official stage-1 block."""

    expansion = 4
    CONV_BATCHNORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # for fold_batchnorm

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual, inplace=True)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with folded norms, each convolution with its ReLU and residual add in one call."""
        out = fused_conv.conv2d(self.conv1, x, relu=True)
        out = fused_conv.conv2d(self.conv2, out, relu=True)
        residual = x if self.downsample is None else fused_conv.sequential(self.downsample, x)
        return fused_conv.conv2d(self.conv3, out, relu=True, add=residual)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_layer(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, num_blocks: int
) -> tuple[nn.Sequential, int]:
    """A run of blocks (official ``_make_layer`` / ``_make_one_branch``); a 1x1 downsample when channels change."""
    out_channels = planes * block.expansion
    downsample = _conv_bn(inplanes, out_channels, 1, 1, relu=False) if inplanes != out_channels else None
    layers = [block(inplanes, planes, 1, downsample)]
    layers += [block(out_channels, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers), out_channels


def _fused_blocks(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block.fused_forward(x)
    return x


def _fuse_path(channels: Sequence[int], src: int, dst: int) -> nn.Module | None:
    """How branch ``src`` reaches branch ``dst``'s resolution and width before the sum.

    Lower resolution (src > dst): conv1x1+BN, upsampled in forward. Higher resolution (src < dst): dst-src
    stride-2 conv3x3+BN, intermediate ones keep src's width and have ReLU, the last maps to dst's width without.
    """
    if src == dst:
        return None
    if src > dst:
        return _conv_bn(channels[src], channels[dst], 1, 1, relu=False)
    steps = dst - src
    convs = [_conv_bn(channels[src], channels[src], 3, 2, relu=True) for _ in range(steps - 1)]
    convs.append(_conv_bn(channels[src], channels[dst], 3, 2, relu=False))
    return nn.Sequential(*convs)


def _upsample_to(x: torch.Tensor, like: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear resize to ``like``'s exact size (by size, not scale factor: odd sizes do not divide evenly)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=align_corners)


def _rows_upsample_exactly(x: torch.Tensor, like: torch.Tensor, align_corners: bool) -> bool:
    """Whether ``_upsample_rows`` gives the same bits as ``_upsample_to`` for any rows: half-pixel centres (no
    aligned corners) and ``like``'s height ``x``'s times a power of two. Then every source coordinate is a dyadic
    fraction that float32 holds exactly, so a band's coordinates are the whole image's minus a whole number of rows
    and its weights are the same numbers."""
    scale, rest = divmod(like.shape[-2], x.shape[-2])
    return not align_corners and rest == 0 and scale & (scale - 1) == 0


def _upsample_rows(x: torch.Tensor, like: torch.Tensor, top: int, bottom: int, align_corners: bool) -> torch.Tensor:
    """Rows ``top:bottom`` of ``_upsample_to(x, like, align_corners)``, computed from the source rows they read
    (and one more on each side, so that no band edge is clamped as the image's edge is). Bit-identical where
    ``_rows_upsample_exactly``; only called there, unless the rows are all of them."""
    height = like.shape[-2]
    if top == 0 and bottom == height:
        return _upsample_to(x, like, align_corners)
    scale = height // x.shape[-2]
    first, last = max(0, top // scale - 1), min(x.shape[-2], (bottom - 1) // scale + 2)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    source = x[:, :, first:last].contiguous(memory_format=layout)  # the kernel the whole image would get
    up = F.interpolate(source, size=((last - first) * scale, like.shape[-1]), mode="bilinear", align_corners=False)
    return up[:, :, top - first * scale:bottom - first * scale]


class HighResolutionModule(nn.Module):
    """Parallel branches, then every output resolution sums all branches brought to it, then ReLU."""

    def __init__(
        self,
        in_channels: Sequence[int],
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_channels: Sequence[int],
        align_corners: bool,
    ):
        super().__init__()
        branches, out_channels = [], []
        for cin, planes, n in zip(in_channels, num_channels, num_blocks, strict=True):
            branch, cout = _make_layer(block, cin, planes, n)
            branches.append(branch)
            out_channels.append(cout)
        self.branches = nn.ModuleList(branches)
        self.out_channels = out_channels
        self.align_corners = align_corners
        n_branches = len(out_channels)
        self.fuse_layers = (
            None
            if n_branches == 1
            else nn.ModuleList(
                nn.ModuleList(_fuse_path(out_channels, j, i) for j in range(n_branches)) for i in range(n_branches)
            )
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        if self.fuse_layers is None:
            return xs
        return [self._fuse(i, paths, xs) for i, paths in enumerate(self.fuse_layers)]

    def _fuse(self, i: int, paths: nn.ModuleList, xs: list[torch.Tensor]) -> torch.Tensor:
        """Sum in the official order (branch 0 first) so float rounding matches too."""
        y = xs[0] if i == 0 else paths[0](xs[0])
        for j in range(1, len(xs)):
            if j == i:
                y = y + xs[j]
            elif j > i:
                y = y + _upsample_to(paths[j](xs[j]), xs[i], self.align_corners)
            else:
                y = y + paths[j](xs[j])
        return F.relu(y, inplace=True)

    def fused_forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``forward`` with folded norms and fused kernels (``fused_conv``); the sums in the same order."""
        xs = [_fused_blocks(branch, x) for branch, x in zip(self.branches, xs, strict=True)]
        if self.fuse_layers is None:
            return xs
        return [self._fused_fuse(i, paths, xs) for i, paths in enumerate(self.fuse_layers)]

    def _fused_fuse(self, i: int, paths: nn.ModuleList, xs: list[torch.Tensor]) -> torch.Tensor:
        """``_fuse``: a higher-resolution branch's last convolution adds the running sum in its own pass, and the
        last branch (never of higher resolution than i) is added together with the ReLU."""
        y, fresh = (xs[0], False) if i == 0 else (fused_conv.sequential(paths[0], xs[0]), True)
        last = len(xs) - 1
        for j in range(1, last):
            if j < i:
                y = fused_conv.sequential(paths[j], xs[j], add=y)
            else:
                term = self._fused_term(i, j, paths, xs)
                y = y.add_(term) if fresh else y + term
            fresh = True
        return fused_conv.add_relu(y, self._fused_term(i, last, paths, xs), inplace=fresh)

    def _fused_term(self, i: int, j: int, paths: nn.ModuleList, xs: list[torch.Tensor]) -> torch.Tensor:
        """Branch j (j >= i) brought to branch i: itself, or conv1x1 then upsampled."""
        if j == i:
            return xs[j]
        return _upsample_to(fused_conv.sequential(paths[j], xs[j]), xs[i], self.align_corners)


def _make_transition(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
    """Existing branches get a conv3x3 only when their width changes (else no keys at that index); each new
    branch is a chain of stride-2 conv3x3+BN+ReLU from the lowest-resolution existing branch."""
    layers: list[nn.Module | None] = []
    for i, cout in enumerate(current):
        if i < len(previous):
            layers.append(_conv_bn(previous[i], cout, 3, 1, relu=True) if previous[i] != cout else None)
            continue
        steps = i + 1 - len(previous)
        widths = [previous[-1]] * steps + [cout]
        layers.append(nn.Sequential(*(_conv_bn(widths[k], widths[k + 1], 3, 2, relu=True) for k in range(steps))))
    return nn.ModuleList(layers)


def _apply_transition(transition: nn.ModuleList, ys: list[torch.Tensor], fused: bool = False) -> list[torch.Tensor]:
    """Branch i takes ys[i]; new branches take the lowest-resolution output ys[-1]. ``fused``: folded norms, each
    layer's convolution and ReLU in one call (``fused_conv``)."""
    out = []
    for i, layer in enumerate(transition):
        src = ys[i] if i < len(ys) else ys[-1]
        out.append(src if layer is None else fused_conv.sequential(layer, src) if fused else layer(src))
    return out


def _stage_spec(cfg: Mapping, name: str) -> tuple[type[BasicBlock] | type[Bottleneck], list[int], list[int], int]:
    """(block, num_blocks, num_channels, num_modules) of a yaml STAGEn node, checked as the official code does."""
    block_name = cfg["BLOCK"]
    if block_name not in BLOCKS:
        raise ValueError(f"{name}.BLOCK must be one of {sorted(BLOCKS)}, got {block_name!r}")
    if cfg.get("FUSE_METHOD", "SUM") != "SUM":
        raise ValueError(f"{name}.FUSE_METHOD {cfg['FUSE_METHOD']!r} is not supported (the official code sums)")
    num_blocks, num_channels = list(cfg["NUM_BLOCKS"]), list(cfg["NUM_CHANNELS"])
    n_branches = cfg.get("NUM_BRANCHES", len(num_channels))  # STAGE1 spells it NUM_RANCHES; unused there
    if not len(num_blocks) == len(num_channels) == n_branches:
        raise ValueError(
            f"{name}: NUM_BRANCHES={n_branches} but NUM_BLOCKS has {len(num_blocks)} "
            f"and NUM_CHANNELS {len(num_channels)} entries"
        )
    return BLOCKS[block_name], num_blocks, num_channels, int(cfg["NUM_MODULES"])


class HRNetV2(nn.Module):
    """HRNetV2 segmenter: images (B,3,H,W) → logits (B,K,ceil(ceil(H/2)/2),ceil(ceil(W/2)/2))."""

    CONV_BATCHNORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))  # the stem, for fold_batchnorm

    def __init__(self, model_cfg: Mapping, num_classes: int):
        super().__init__()
        extra = model_cfg["EXTRA"]
        # The official config default is True; the Cityscapes / Pascal-Context yamls override it to False.
        self.align_corners = bool(model_cfg.get("ALIGN_CORNERS", True))
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS)

        block, num_blocks, num_channels, _ = _stage_spec(extra["STAGE1"], "STAGE1")
        self.layer1, width = _make_layer(block, STEM_CHANNELS, num_channels[0], num_blocks[0])
        channels = [width]
        for n in (2, 3, 4):
            transition, stage, channels = self._make_stage(extra[f"STAGE{n}"], f"STAGE{n}", channels)
            self.add_module(f"transition{n - 1}", transition)
            self.add_module(f"stage{n}", stage)

        kernel = int(extra["FINAL_CONV_KERNEL"])
        width = sum(channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(width, width, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_classes, kernel, padding=1 if kernel == 3 else 0),
        )
        self.factored_from: int | None = None
        """The first final branch the head convolves before upsampling (``factor_head``); None: the official order."""
        self.pointwise_fused: bool = False
        """Whether ``forward`` runs convolutions with their ReLU and residual add in one call (``fuse_pointwise``)."""
        self.head_band_bytes: int = 64 * 2**20
        """The most memory one band of the fused factored head holds in the head's width (``_head``). Why bands: the
        head's widest tensors are its full-resolution sums (240 channels at a quarter of the image: 126 MB each at
        1024x2048), and the head held two at once, the process's largest moment. Measured on the shipped HRNet at
        1024x2048 (two bands of 128 rows), SegCertify, one thread, engine alone, 2 runs each: peak RSS 1175-1183 ->
        1013-1061 MiB, 71.1-71.3 -> 71.3-71.7 s per image."""
        self.head_band_min_rows: int = 64
        """Bands are at least this high: each upsamples a few rows more than it keeps (the source rows on either
        side), 2x the scale per band, which costs more the thinner the band (head alone, 1024x2048, before the sum
        was in place: 97.9 ms whole, 104.3 ms in bands of 64 rows, 109.3 ms in bands of 32; median of 12)."""

    def _make_stage(
        self, cfg: Mapping, name: str, previous: list[int]
    ) -> tuple[nn.ModuleList, nn.Sequential, list[int]]:
        """Transition into the stage's branch widths, then NUM_MODULES high-resolution modules."""
        block, num_blocks, num_channels, num_modules = _stage_spec(cfg, name)
        current = [c * block.expansion for c in num_channels]
        transition = _make_transition(previous, current)
        modules = []
        for _ in range(num_modules):
            modules.append(HighResolutionModule(current, block, num_blocks, num_channels, self.align_corners))
            current = modules[-1].out_channels
        return transition, nn.Sequential(*modules), current

    def fuse_pointwise(self, enabled: bool = True) -> bool:
        """Run each convolution with the ReLU and residual add after it in one oneDNN call where the input allows
        (CPU fp32 inference: ``fused_conv.applies``; elsewhere ``forward`` runs the plain modules); returns whether
        it is on. Needs every BatchNorm folded first (``fold_batchnorm``): the kernels fuse what follows a
        convolution, and an unfolded norm sits between.

        Measured on the shipped HRNet, folded and factored, one thread, 1024x2048: one call 0.656 -> 0.633 s (min
        of 7, interleaved in one process, outputs bit-identical to the unfused folded model's); SegCertify end to
        end, engine alone, 2 runs each: 73.7-75.4 s -> 71.7-71.7 s, certificates identical.
        """
        if enabled:
            unfolded = [name for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]
            if unfolded:
                raise ValueError(f"fuse_pointwise needs folded BatchNorms (fold_batchnorm); {len(unfolded)} are "
                                 f"not, the first {unfolded[0]}")
        self.pointwise_fused = enabled
        return enabled

    def _runs_fused(self, x: torch.Tensor) -> bool:
        return self.pointwise_fused and fused_conv.applies(x, self.conv1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The final branches, highest resolution first."""
        if self._runs_fused(x):
            return self._fused_branches(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        ys = [self.layer1(x)]
        for n in (2, 3, 4):
            xs = _apply_transition(getattr(self, f"transition{n - 1}"), ys)
            ys = getattr(self, f"stage{n}")(xs)
        return ys

    def _fused_branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = fused_conv.conv2d(self.conv1, x, relu=True)
        x = fused_conv.conv2d(self.conv2, x, relu=True)
        ys = [_fused_blocks(self.layer1, x)]
        for n in (2, 3, 4):
            xs = _apply_transition(getattr(self, f"transition{n - 1}"), ys, fused=True)
            for module in getattr(self, f"stage{n}"):
                xs = module.fused_forward(xs)
            ys = xs
        return ys

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: all final branches upsampled to branch 0's size and concatenated in branch order."""
        return self._concatenated(self.branches(x))

    def _concatenated(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """``ys`` upsampled to the first one's size and concatenated in branch order."""
        return torch.cat([ys[0]] + [_upsample_to(y, ys[0], self.align_corners) for y in ys[1:]], dim=1)

    def factor_head(self, enabled: bool = True) -> int:
        """Run the head's first 1x1 convolution on the wide branches before they are upsampled (``forward``), not
        after; returns how many branches it factors (0: the official order).

        Why this is the same function: bilinear upsampling and a bias-free 1x1 convolution are both linear maps, one
        over positions and one over channels, so they commute, and conv(cat[y0, up(y1), ...]) = conv_0(y0) + b +
        up(conv_1(y1)) + ... with conv_k the weight columns of branch k and the bias b added once. Float rounding
        differs (another summation order), as with folded BatchNorm.
        Why only the wide branches: factoring branch k saves the convolution's work on its channels at branch 0's
        resolution but upsamples the head's whole width instead of branch k's; it pays where branch k holds at
        least a quarter of the head's width (shipped HRNet, 1024x2048, one thread, one sample: the official order
        0.839 s, branches 2 and 3 factored 0.720 s, branches 1 to 3 0.736 s; HRNetV2-W48 has the same
        proportions, 48/96/192/384 of 720).
        """
        widths = self.stage4[-1].out_channels
        width = self.last_layer[0].in_channels
        first = next((k for k, c in enumerate(widths) if k > 0 and 4 * c >= width), len(widths))
        self.factored_from = first if enabled else None
        return len(widths) - first if enabled else 0

    def _head(self, ys: list[torch.Tensor], fused: bool) -> torch.Tensor:
        """``last_layer`` on ``features``' concatenation: as is, or with branches from ``factored_from`` on
        convolved first (``_factored_rows``); ``fused``: the ReLU done in the convolution's pass (norm folded)
        and the factored head run in bands of rows (``head_band_bytes``) where that gives the whole head's bits:
        channels-last, where oneDNN sums each pixel's channels in the same order whatever the band's extent (in
        channels-first layout the last bits differ, measured), and upsampling by powers of two
        (``_rows_upsample_exactly``)."""
        conv, classifier = self.last_layer[0], self.last_layer[3]
        if self.factored_from is None:
            if fused:
                return classifier(fused_conv.conv2d(conv, self._concatenated(ys), relu=True))
            return self.last_layer(self._concatenated(ys))
        late = max(1, self.factored_from)  # branch 0 is at the head's resolution: nothing to factor
        early = self._concatenated(ys[:late])
        start = early.shape[1]
        conv1x1 = fused_conv.conv1x1 if fused else F.conv2d
        parts = []
        for y in ys[late:]:
            parts.append(conv1x1(y, conv.weight[:, start:start + y.shape[1]], None))
            start += y.shape[1]
        height = early.shape[-2]
        rows = self._band_rows(early) if fused else height
        if (rows >= height or not early.is_contiguous(memory_format=torch.channels_last)
                or not all(_rows_upsample_exactly(p, early, self.align_corners) for p in parts)):
            return self._factored_rows(early, parts, 0, height, fused)
        return torch.cat([
            torch.cat([self._factored_rows(early[i:i + 1], [p[i:i + 1] for p in parts], top,
                                           min(top + rows, height), fused) for top in range(0, height, rows)], dim=2)
            for i in range(early.shape[0])
        ], dim=0)

    def _band_rows(self, early: torch.Tensor) -> int:
        """Rows per band of the fused factored head, one sample at a time: as many equal bands as keep a band's
        activations (the head's width) within ``head_band_bytes``, each at least ``head_band_min_rows`` high; the
        whole height (and the whole batch at once) where one band fits."""
        height = early.shape[-2]
        row_bytes = self.last_layer[0].out_channels * early.shape[-1] * early.element_size()
        bands = -(-height * row_bytes // self.head_band_bytes)
        return height if bands <= 1 else max(-(-height // bands), self.head_band_min_rows)

    def _factored_rows(self, early: torch.Tensor, parts: list[torch.Tensor], top: int, bottom: int,
                       fused: bool) -> torch.Tensor:
        """Rows ``top:bottom`` of the factored head's output: ``early`` convolved with its weight columns and the
        bias, plus the convolved late branches (``parts``) upsampled, then the rest of ``last_layer``. Fused, the
        upsampled parts are summed first and the convolution adds its output to that sum and applies the ReLU in
        the same pass, into the sum's memory: one pass over a tensor of the head's width fewer, and no new one."""
        conv, classifier = self.last_layer[0], self.last_layer[3]
        weight = conv.weight[:, :early.shape[1]]
        if fused and parts:
            total = None
            for part in parts:
                up = _upsample_rows(part, early, top, bottom, self.align_corners)
                total = up if total is None else total.add_(up)
            return classifier(fused_conv.conv1x1_add_relu_(total, early[:, :, top:bottom], weight, conv.bias))
        conv1x1 = fused_conv.conv1x1 if fused else F.conv2d
        z = conv1x1(early[:, :, top:bottom], weight, conv.bias)
        for part in parts:
            z = z.add_(_upsample_rows(part, early, top, bottom, self.align_corners))
        if not fused:
            return self.last_layer[1:](z)
        return classifier(F.relu(z, inplace=True))  # nothing factored after all: the ReLU on its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._runs_fused(x)
        return self._head(self.branches(x), fused)


def build_hrnet(model_cfg: Mapping, num_classes: int) -> HRNetV2:
    """Build from the yaml's ``MODEL`` node (``EXTRA``, ``ALIGN_CORNERS``; missing ALIGN_CORNERS means True)."""
    return HRNetV2(model_cfg, num_classes)


def _stage(num_modules: int, channels: Sequence[int]) -> dict:
    return {
        "NUM_MODULES": num_modules,
        "NUM_BRANCHES": len(channels),
        "BLOCK": "BASIC",
        "NUM_BLOCKS": [4] * len(channels),
        "NUM_CHANNELS": list(channels),
        "FUSE_METHOD": "SUM",
    }


def _hrnetv2_cfg(width: int) -> dict:
    """The official ``seg_hrnet_w{width}`` yaml MODEL node (Cityscapes / Pascal-Context: ALIGN_CORNERS False)."""
    channels = [width * 2**i for i in range(4)]
    return {
        "NAME": "seg_hrnet",
        "ALIGN_CORNERS": False,
        "EXTRA": {
            "FINAL_CONV_KERNEL": 1,
            "STAGE1": {
                "NUM_MODULES": 1,
                "NUM_RANCHES": 1,
                "BLOCK": "BOTTLENECK",
                "NUM_BLOCKS": [4],
                "NUM_CHANNELS": [64],
                "FUSE_METHOD": "SUM",
            },
            "STAGE2": _stage(1, channels[:2]),
            "STAGE3": _stage(4, channels[:3]),
            "STAGE4": _stage(3, channels),
        },
    }


HRNET_W18: dict = _hrnetv2_cfg(18)
HRNET_W48: dict = _hrnetv2_cfg(48)

PRESETS: dict[str, tuple[dict, int]] = {
    "hrnetv2-w48-cityscapes": (HRNET_W48, 19),
    "hrnetv2-w48-pascal-context-59": (HRNET_W48, 59),
    "hrnetv2-w18-cityscapes": (HRNET_W18, 19),
}


def build_preset(name: str) -> HRNetV2:
    """Build a named preset (see ``PRESETS``); randomly initialised, load weights separately."""
    if name not in PRESETS:
        raise ValueError(f"unknown HRNet preset {name!r}; known: {', '.join(PRESETS)}")
    model_cfg, num_classes = PRESETS[name]
    return build_hrnet(model_cfg, num_classes)


def preset_factories() -> dict[str, Callable[[], nn.Module]]:
    """Builders of every preset, for the loader's "it fits preset X" suggestion (it calls them on meta)."""
    return {name: partial(build_preset, name) for name in PRESETS}
