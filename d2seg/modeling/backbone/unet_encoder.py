"""The U-Net encoder as a detectron2 backbone (``MODEL.BACKBONE.NAME: "build_unet_backbone"``)."""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..layers.blocks import DoubleConv, Norm

__all__ = ["UNetEncoder", "build_unet_backbone"]


class UNetEncoder(Backbone):
    """Contracting path of U-Net (Ronneberger et al., 2015), with 'same' padding.

    Level 0 is a double conv at full resolution; each level i = 1..depth max-pools by 2 and
    double-convs to ``base_channels * 2**i`` channels. Input (N, in_channels, H, W) with H, W
    divisible by ``2**depth``; output ``{"enc<i>": (N, base * 2**i, H / 2**i, W / 2**i)}``
    for i = 0..depth, the same in training and eval.
    """

    @configurable
    def __init__(self, *, in_channels: int = 3, depth: int = 4, base_channels: int = 64,
                 norm: Norm = "BN", conv_bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MODEL.UNET.DEPTH must be >= 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"MODEL.UNET.BASE_CHANNELS must be >= 1, got {base_channels}")
        self.depth = depth
        self.stages = nn.ModuleList()
        self._out_features = []
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        ch_in = in_channels
        for i in range(depth + 1):
            ch = base_channels * 2 ** i
            self.stages.append(DoubleConv(ch_in, ch, norm=norm, bias=conv_bias))
            name = f"enc{i}"
            self._out_features.append(name)
            self._out_feature_channels[name] = ch
            self._out_feature_strides[name] = 2 ** i
            ch_in = ch

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        u = cfg.MODEL.UNET
        return {"in_channels": input_shape.channels, "depth": u.DEPTH,
                "base_channels": u.BASE_CHANNELS, "norm": u.NORM, "conv_bias": u.CONV_BIAS}

    @property
    def size_divisibility(self) -> int:
        return 2 ** self.depth

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out = {}
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            out[f"enc{i}"] = x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n],
                             stride=self._out_feature_strides[n]) for n in self._out_features}


@BACKBONE_REGISTRY.register()
def build_unet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> UNetEncoder:
    """U-Net encoder from ``cfg.MODEL.UNET`` (DEPTH, BASE_CHANNELS, NORM, CONV_BIAS)."""
    return UNetEncoder(cfg, input_shape)
