"""HRNet (HRNetV2) as a detectron2 backbone (``MODEL.BACKBONE.NAME: "build_hrnet_backbone"``).

High-Resolution Network (Sun et al., 2019; Wang et al., TPAMI 2020): a stride-4 stem, stage 1
of bottleneck blocks, then stages 2, 3, 4 that run 2, 3, 4 branches (strides 4, 8, 16, 32,
channels W, 2W, 4W, 8W) in parallel. Each stage is a sequence of *modules*: every branch runs
its basic blocks, then a multi-resolution fusion (exchange unit) gives every branch the sum of
all branches brought to its resolution (1x1 conv + bilinear up-sampling from lower
resolutions, chains of stride-2 3x3 convs from higher ones). A transition before each stage
adapts the existing branches' widths and creates the new lower-resolution branch with a
stride-2 3x3 conv on the lowest one.

Outputs (``MODEL.HRNET.OUT_FEATURES``):

* ``"hr1"``, ``"hr2"``, ``"hr3"``, ``"hr4"``: the four branches after stage 4, strides 4, 8,
  16, 32, channels W, 2W, 4W, 8W;
* ``"hrcat"``: the HRNetV2 representation, the four branches up-sampled to ``hr1``'s size and
  concatenated: stride 4, 15W channels.

``build_hrnet_fpn_backbone`` puts detectron2's ``FPN`` on top (``MODEL.FPN.IN_FEATURES:
["hr1", "hr2", "hr3", "hr4"]`` -> p2..p6) for Mask R-CNN, Panoptic FPN and Semantic FPN.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..layers.blocks import gn_groups, norm_layer
from ..layers.resize import resize_bilinear

__all__ = ["HRNet", "HRNetSpec", "HRNET_PRESETS", "HRModule", "build_hrnet_backbone",
           "build_hrnet_fpn_backbone", "hrnet_norm", "concat_upsampled"]

Norm = Union[str, Callable[[int], nn.Module], None]
BRANCH_FEATURES = ("hr1", "hr2", "hr3", "hr4")
CONCAT_FEATURE = "hrcat"


@dataclass(frozen=True)
class HRNetSpec:
    """The numbers that define an HRNet.

    Attributes:
        stem_channels: width of the two stride-2 stem convs.
        stage1_channels: bottleneck width of stage 1 (its output has 4x as many channels).
        width: W; branch i (0-3) of stages 2-4 has ``W * 2**i`` channels.
        num_modules: modules of stages 2, 3, 4 (stage 1 is a single sequence of blocks).
        num_blocks: blocks of stage 1 and blocks per branch and module of stages 2, 3, 4.
    """

    stem_channels: int = 64
    stage1_channels: int = 64
    width: int = 18
    num_modules: Tuple[int, int, int] = (1, 4, 3)
    num_blocks: Tuple[int, int, int, int] = (4, 4, 4, 4)

    @property
    def branch_channels(self) -> List[int]:
        return [self.width * 2 ** i for i in range(4)]


# The published HRNetV2 configurations (HRNet-Semantic-Segmentation's experiments/*.yaml).
HRNET_PRESETS: Dict[str, HRNetSpec] = {
    "w18_small_v1": HRNetSpec(64, 32, 16, (1, 1, 1), (1, 2, 2, 2)),
    "w18_small_v2": HRNetSpec(64, 64, 18, (1, 3, 2), (2, 2, 2, 2)),
    "w18": HRNetSpec(64, 64, 18, (1, 4, 3), (4, 4, 4, 4)),
    "w32": HRNetSpec(64, 64, 32, (1, 4, 3), (4, 4, 4, 4)),
    "w48": HRNetSpec(64, 64, 48, (1, 4, 3), (4, 4, 4, 4)),
}


def hrnet_norm(norm: Norm) -> Norm:
    """``norm`` for :func:`detectron2.layers.get_norm`, with "GN" made valid for any width
    (see :func:`d2seg.modeling.layers.blocks.gn_groups`); every other value is passed
    through."""
    if norm == "GN":
        return lambda c: nn.GroupNorm(gn_groups(c), c)
    return norm


def _conv(in_ch: int, out_ch: int, k: int, *, stride: int = 1, norm: Norm = "BN",
          relu: bool = True) -> Conv2d:
    """``k x k`` conv ('same' padding, ``stride``) -> norm -> optional ReLU, MSRA init."""
    conv = Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=not norm,
                  norm=norm_layer(norm, out_ch), activation=F.relu if relu else None)
    weight_init.c2_msra_fill(conv)
    return conv


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with a residual connection (1x1 projection when the widths
    differ) and ReLU. (N, Cin, H, W) -> (N, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: Norm = "BN"):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, norm=norm)
        self.conv2 = _conv(out_channels, out_channels, 3, norm=norm, relu=False)
        self.shortcut = (None if in_channels == out_channels else
                         _conv(in_channels, out_channels, 1, norm=norm, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (4x expansion) conv-norm layers with a residual connection.
    (N, Cin, H, W) -> (N, 4 * planes, H, W)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, norm: Norm = "BN"):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1, norm=norm)
        self.conv2 = _conv(planes, planes, 3, norm=norm)
        self.conv3 = _conv(planes, out_channels, 1, norm=norm, relu=False)
        self.shortcut = (None if in_channels == out_channels else
                         _conv(in_channels, out_channels, 1, norm=norm, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


def _resize(x: Tensor, size, impl: str = "interpolate") -> Tensor:
    """Bilinear resize to exactly ``size`` (odd inputs give non-integer ratios). Always
    resizes while tracing, so that an export stays valid for every input size. ``impl``: see
    :func:`d2seg.modeling.layers.resize.resize_bilinear`."""
    if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return resize_bilinear(x, size, impl)


def concat_upsampled(features: Sequence[Tensor], impl: str = "interpolate") -> Tensor:
    """The HRNetV2 representation: every (N, C_i, h_i, w_i) tensor bilinearly resized to the
    first one's (h_0, w_0) and concatenated: (N, sum C_i, h_0, w_0)."""
    size = features[0].shape[-2:]
    return torch.cat([features[0]] + [_resize(f, size, impl) for f in features[1:]], dim=1)


class HRModule(nn.Module):
    """One HRNet module: ``num_blocks`` basic blocks on every branch, then the exchange unit.

    ``forward(xs)`` takes one (N, C_j, H_j, W_j) tensor per branch (branch j at stride
    4 * 2**j) and returns a list of the same length: output i = ReLU(sum over j of x_j brought
    to branch i's width and exact size), for i in ``out_branches``; None for the others.
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, *, norm: Norm = "BN",
                 out_branches: Optional[Sequence[int]] = None):
        super().__init__()
        n = len(channels)
        self.out_branches = list(range(n)) if out_branches is None else sorted(out_branches)
        self.branches = nn.ModuleList([
            nn.Sequential(*[BasicBlock(c, c, norm=norm) for _ in range(num_blocks)])
            for c in channels
        ])
        # fuse[i][j] brings branch j to branch i (None for j == i).
        self.fuse = nn.ModuleDict()
        for i in self.out_branches:
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution: 1x1 conv to C_i (then bilinear up-sampling)
                    row.append(_conv(channels[j], channels[i], 1, norm=norm, relu=False))
                else:  # higher resolution: i - j stride-2 3x3 convs, the last one to C_i
                    steps = [_conv(channels[j], channels[j], 3, stride=2, norm=norm)
                             for _ in range(i - j - 1)]
                    steps.append(_conv(channels[j], channels[i], 3, stride=2, norm=norm,
                                       relu=False))
                    row.append(nn.Sequential(*steps))
            self.fuse[str(i)] = row
        self.resize_impl = "interpolate"  # see d2seg.modeling.layers.resize

    def forward(self, xs: List[Tensor]) -> List[Optional[Tensor]]:
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out: List[Optional[Tensor]] = [None] * len(xs)
        for i in self.out_branches:
            row = self.fuse[str(i)]
            y = xs[i]
            for j, x in enumerate(xs):
                if j == i:
                    continue
                z = row[j](x)
                if j > i:
                    z = _resize(z, xs[i].shape[-2:], self.resize_impl)
                y = y + z
            out[i] = F.relu(y)
        return out


class HRNet(Backbone):
    """HRNetV2 backbone; see the module docstring for the architecture and outputs.

    Input (N, in_channels, H, W), any H and W (branches are resized to each other's exact
    sizes; with padding to ``size_divisibility`` = 32 the strides are exact). Output: dict of
    the requested features, ``"hr<k>"`` (N, W * 2**(k-1), ceil(H / s), ceil(W / s)) with
    s = 4 * 2**(k-1) when H, W are multiples of s (``ceil`` applied per stride-2 step
    otherwise), ``"hrcat"`` (N, 15 W, ceil(H / 4), ceil(W / 4)). Same in train and eval mode.
    """

    @configurable
    def __init__(self, *, in_channels: int = 3, spec: Union[str, HRNetSpec] = "w18",
                 norm: Norm = "BN", out_features: Sequence[str] = BRANCH_FEATURES):
        """
        Args:
            spec: a preset name (``HRNET_PRESETS``: w18_small_v1, w18_small_v2, w18, w32, w48)
                or an :class:`HRNetSpec`.
            norm: "BN", "SyncBN", "GN" (any width, see :func:`hrnet_norm`), "", or a callable.
            out_features: any of "hr1".."hr4", "hrcat".
        """
        super().__init__()
        self.resize_impl = "interpolate"  # see d2seg.modeling.layers.resize
        if isinstance(spec, str):
            if spec not in HRNET_PRESETS:
                raise ValueError(f"MODEL.HRNET.NAME '{spec}' is not a preset; choose one of "
                                 f"{sorted(HRNET_PRESETS)}")
            spec = HRNET_PRESETS[spec]
        _check_spec(spec)
        out_features = list(out_features)
        bad = [f for f in out_features if f not in BRANCH_FEATURES + (CONCAT_FEATURE,)]
        if bad or not out_features:
            raise ValueError(f"MODEL.HRNET.OUT_FEATURES {out_features}: choose among "
                             f"{list(BRANCH_FEATURES) + [CONCAT_FEATURE]}")
        self.spec = spec
        norm = hrnet_norm(norm)
        ch = spec.branch_channels

        self.stem = nn.Sequential(
            _conv(in_channels, spec.stem_channels, 3, stride=2, norm=norm),
            _conv(spec.stem_channels, spec.stem_channels, 3, stride=2, norm=norm),
        )
        blocks, c = [], spec.stem_channels
        for _ in range(spec.num_blocks[0]):
            blocks.append(Bottleneck(c, spec.stage1_channels, norm=norm))
            c = spec.stage1_channels * Bottleneck.expansion
        self.layer1 = nn.Sequential(*blocks)

        # The last module computes only the branches that are returned.
        wanted = ([0, 1, 2, 3] if CONCAT_FEATURE in out_features else
                  [BRANCH_FEATURES.index(f) for f in out_features])
        prev = [c]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s, n_branches in enumerate((2, 3, 4)):
            cur = ch[:n_branches]
            self.transitions.append(self._transition(prev, cur, norm))
            modules = []
            for m in range(spec.num_modules[s]):
                last = s == 2 and m == spec.num_modules[s] - 1
                modules.append(HRModule(cur, spec.num_blocks[s + 1], norm=norm,
                                        out_branches=wanted if last else None))
            self.stages.append(nn.ModuleList(modules))
            prev = cur

        self._out_features = out_features
        self._out_feature_channels = {f"hr{i + 1}": ch[i] for i in range(4)}
        self._out_feature_strides = {f"hr{i + 1}": 4 * 2 ** i for i in range(4)}
        self._out_feature_channels[CONCAT_FEATURE] = sum(ch)
        self._out_feature_strides[CONCAT_FEATURE] = 4
        for k in list(self._out_feature_channels):
            if k not in out_features:
                del self._out_feature_channels[k], self._out_feature_strides[k]

    @staticmethod
    def _transition(prev: List[int], cur: List[int], norm: Norm) -> nn.ModuleList:
        """Per branch of the next stage: identity when the width is kept, a 3x3 conv when it
        changes, and for the new branch a stride-2 3x3 conv of the lowest existing branch."""
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(prev):
                layers.append(nn.Identity() if prev[i] == c else _conv(prev[i], c, 3, norm=norm))
            else:
                layers.append(_conv(prev[-1], c, 3, stride=2, norm=norm))
        return layers

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        return {"in_channels": input_shape.channels, "spec": hrnet_spec_from_config(cfg),
                "norm": cfg.MODEL.HRNET.NORM, "out_features": list(cfg.MODEL.HRNET.OUT_FEATURES)}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"HRNet takes (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        x = self.layer1(self.stem(x))
        xs: List[Optional[Tensor]] = [x]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            for module in stage:
                xs = module(xs)
        out = {f: xs[BRANCH_FEATURES.index(f)] for f in self._out_features
               if f in BRANCH_FEATURES}
        if CONCAT_FEATURE in self._out_features:
            out[CONCAT_FEATURE] = concat_upsampled(xs, self.resize_impl)
        return out


def _check_spec(spec: HRNetSpec) -> None:
    for key, v in (("MODEL.HRNET.STEM_CHANNELS", spec.stem_channels),
                   ("MODEL.HRNET.STAGE1_CHANNELS", spec.stage1_channels),
                   ("MODEL.HRNET.WIDTH", spec.width)):
        if v < 1:
            raise ValueError(f"{key} must be >= 1, got {v}")
    if len(spec.num_modules) != 3 or min(spec.num_modules) < 1:
        raise ValueError(f"MODEL.HRNET.NUM_MODULES must be 3 numbers >= 1 (stages 2, 3, 4), "
                         f"got {list(spec.num_modules)}")
    if len(spec.num_blocks) != 4 or min(spec.num_blocks) < 1:
        raise ValueError(f"MODEL.HRNET.NUM_BLOCKS must be 4 numbers >= 1 (stages 1-4), "
                         f"got {list(spec.num_blocks)}")


def hrnet_spec_from_config(cfg) -> HRNetSpec:
    """``MODEL.HRNET.NAME``'s preset with the non-zero / non-empty overrides of WIDTH,
    STEM_CHANNELS, STAGE1_CHANNELS, NUM_MODULES, NUM_BLOCKS applied."""
    h = cfg.MODEL.HRNET
    if h.NAME not in HRNET_PRESETS:
        raise ValueError(f"MODEL.HRNET.NAME '{h.NAME}' is not a preset; choose one of "
                         f"{sorted(HRNET_PRESETS)}")
    over = {}
    for key, field in (("WIDTH", "width"), ("STEM_CHANNELS", "stem_channels"),
                       ("STAGE1_CHANNELS", "stage1_channels")):
        if h[key]:
            over[field] = int(h[key])
    if len(h.NUM_MODULES):
        over["num_modules"] = tuple(int(v) for v in h.NUM_MODULES)
    if len(h.NUM_BLOCKS):
        over["num_blocks"] = tuple(int(v) for v in h.NUM_BLOCKS)
    spec = replace(HRNET_PRESETS[h.NAME], **over)
    _check_spec(spec)
    return spec


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> HRNet:
    """HRNet from ``cfg.MODEL.HRNET`` (NAME, WIDTH, STEM_CHANNELS, STAGE1_CHANNELS,
    NUM_MODULES, NUM_BLOCKS, NORM, OUT_FEATURES)."""
    return HRNet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_hrnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``FPN`` (``MODEL.FPN.*``, plus a max-pooled p6 as
    ``build_resnet_fpn_backbone``) on HRNet's ``MODEL.FPN.IN_FEATURES``
    (e.g. ["hr1", "hr2", "hr3", "hr4"] -> p2..p6). HRNet then outputs exactly those features
    (``MODEL.HRNET.OUT_FEATURES`` is not read)."""
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    bad = [f for f in in_features if f not in BRANCH_FEATURES]
    if bad or not in_features:
        raise ValueError(f"MODEL.FPN.IN_FEATURES {in_features}: with build_hrnet_fpn_backbone "
                         f"use HRNet branches among {list(BRANCH_FEATURES)}")
    bottom_up = HRNet(in_channels=input_shape.channels, spec=hrnet_spec_from_config(cfg),
                      norm=cfg.MODEL.HRNET.NORM, out_features=in_features)
    return FPN(bottom_up=bottom_up, in_features=in_features,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
               top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
