"""The U-Net expanding path as a semantic segmentation head (``"UNetHead"``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..layers.blocks import DoubleConv, Norm
from ..layers.resize import resize_bilinear
from ..losses import SemSegLoss
from .base import SemSegHeadBase

__all__ = ["UNetHead", "UNetUpBlock"]

UPSAMPLE_MODES = ("transposed", "bilinear")


class UNetUpBlock(nn.Module):
    """Up-sample by ``factor`` to ``out_channels``, concatenate the skip (if any), double conv.

    ``x`` (N, Cin, h, w), ``skip`` (N, Cskip, h * f, w * f) or None -> (N, Cout, h * f, w * f).
    "transposed": ``ConvTranspose2d(Cin, Cout, f, stride=f)``; "bilinear": bilinear resize then
    a 1x1 conv to Cout.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, factor: int,
                 mode: str = "transposed", norm: Norm = "BN", conv_bias: bool = True):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"MODEL.UNET.UPSAMPLE must be one of {UPSAMPLE_MODES}, got '{mode}'")
        self.factor = int(factor)
        self.mode = mode
        if mode == "transposed":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, self.factor, stride=self.factor)
        else:
            self.up = Conv2d(in_channels, out_channels, 1)
        weight_init.c2_msra_fill(self.up)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, norm=norm,
                               bias=conv_bias)
        self.resize_impl = "interpolate"  # see d2seg.modeling.layers.resize

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if self.mode == "transposed":
            x = self.up(x)
        else:
            if self.resize_impl == "matmul":
                h, w = x.shape[-2:]
                x = resize_bilinear(x, (h * self.factor, w * self.factor), "matmul")
            else:  # a scale factor: an export stays valid for every input size
                x = F.interpolate(x, scale_factor=self.factor, mode="bilinear",
                                  align_corners=False)
            x = self.up(x)
        if skip is not None:
            if x.shape[-2:] != skip.shape[-2:]:  # only for inputs not padded to the stride
                x = resize_bilinear(x, skip.shape[-2:], self.resize_impl)
            x = torch.cat([skip, x], dim=1)
        return self.conv(x)


@SEM_SEG_HEADS_REGISTRY.register()
class UNetHead(SemSegHeadBase):
    """U-Net decoder over any encoder's multi-scale features.

    The deepest feature is up-sampled stage by stage, each stage fusing the next shallower
    feature (skip connection). When the shallowest feature has stride s > 1 (e.g. a ResNet
    encoder, s = 4), log2(s) more up-sampling stages without skip reach full resolution.
    A 1x1 conv predicts ``num_classes`` logits. See :class:`SemSegHeadBase` for the forward
    protocol (common stride 1).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        norm: Norm = "BN",
        conv_bias: bool = True,
        upsample: str = "transposed",
        decoder_channels: Sequence[int] = (),
        ignore_value: int = 255,
        loss: Optional[SemSegLoss] = None,
    ):
        """
        Args:
            input_shape: encoder features used (all of them), any order.
            decoder_channels: output channels per stage, deep to shallow, including the stages
                without skip; empty: each skip stage keeps its skip's channels, each extra
                stage halves the channels (at least 16).
        """
        super().__init__(num_classes=num_classes, ignore_value=ignore_value, common_stride=1,
                         loss=loss)
        if len(input_shape) < 1:
            raise ValueError("MODEL.UNET.IN_FEATURES is empty: UNetHead needs at least one "
                             "input feature")
        feats = sorted(input_shape.items(), key=lambda kv: kv[1].stride, reverse=True)
        self.in_features = [k for k, _ in feats]  # deep to shallow
        strides = [v.stride for _, v in feats]
        channels = [v.channels for _, v in feats]
        for a, b in zip(strides, strides[1:]):
            if a == b or a % b:
                raise ValueError(f"MODEL.UNET.IN_FEATURES {self.in_features}: their strides "
                                 f"{strides} must be distinct and each divide the next deeper "
                                 "one (UNetHead; a dilated backbone, e.g. "
                                 "MODEL.RESNETS.RES5_DILATION > 1, repeats a stride)")
        s_min = strides[-1]
        if s_min & (s_min - 1):
            raise ValueError(f"MODEL.UNET.IN_FEATURES {self.in_features}: the shallowest "
                             f"stride {s_min} must be a power of 2 (UNetHead)")
        n_extra = int(s_min).bit_length() - 1
        n_stages = len(feats) - 1 + n_extra
        decoder_channels = list(decoder_channels)
        if decoder_channels and len(decoder_channels) != n_stages:
            raise ValueError(f"MODEL.UNET.DECODER_CHANNELS {decoder_channels} must have "
                             f"{n_stages} values (one per decoder stage) for features "
                             f"{self.in_features}")
        self.stages = nn.ModuleList()
        ch = channels[0]
        for i in range(1, len(feats)):
            out = decoder_channels[i - 1] if decoder_channels else channels[i]
            factor = strides[i - 1] // strides[i]
            self.stages.append(UNetUpBlock(ch, channels[i], out, factor=factor, mode=upsample,
                                           norm=norm, conv_bias=conv_bias))
            ch = out
        for j in range(n_extra):
            k = len(feats) - 1 + j
            out = decoder_channels[k] if decoder_channels else max(ch // 2, 16)
            self.stages.append(UNetUpBlock(ch, 0, out, factor=2, mode=upsample, norm=norm,
                                           conv_bias=conv_bias))
            ch = out
        self.predictor = Conv2d(ch, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        u = cfg.MODEL.UNET
        names = list(u.IN_FEATURES) or list(input_shape.keys())
        missing = [n for n in names if n not in input_shape]
        if missing:
            raise ValueError(f"MODEL.UNET.IN_FEATURES {names}: {missing} not among the backbone's "
                             f"outputs {list(input_shape.keys())}")
        return {
            "input_shape": {n: input_shape[n] for n in names},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "norm": u.NORM,
            "conv_bias": u.CONV_BIAS,
            "upsample": u.UPSAMPLE,
            "decoder_channels": list(u.DECODER_CHANNELS),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss": SemSegLoss(cfg),
        }

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        feats: List[Tensor] = [features[k] for k in self.in_features]
        x = feats[0]
        for i, stage in enumerate(self.stages):
            skip = feats[i + 1] if i + 1 < len(feats) else None
            x = stage(x, skip)
        return self.predictor(x)
