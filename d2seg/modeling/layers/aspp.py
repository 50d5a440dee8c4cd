"""Atrous Spatial Pyramid Pooling with any number of rates and an optional pooling branch.

detectron2's ``detectron2.layers.ASPP`` fixes three rates and always has the image-pooling
branch; DeepLab ablations (and output stride 8 vs 16) need both configurable, hence this one.
Like detectron2's, the image-pooling branch has no norm (its output is 1x1, so BatchNorm would
fail at batch size 1) and the 3x3 branches may be depthwise-separable.
"""
from __future__ import annotations

from typing import List, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, DepthwiseSeparableConv2d

from .blocks import Norm, conv_norm_act

__all__ = ["ASPP"]


class ASPP(nn.Module):
    """ASPP (DeepLabV3): parallel 1x1 conv, 3x3 atrous convs and image pooling, projected.

    Input (N, in_channels, H, W) -> output (N, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        *,
        norm: Norm = "BN",
        image_pooling: bool = True,
        dropout: float = 0.0,
        depthwise_separable: bool = False,
    ):
        """
        Args:
            dilations: one 3x3 atrous branch per rate (may be empty); all must be >= 1.
            image_pooling: add the global-average-pooling branch.
            dropout: dropout rate after the projection (training only).
            depthwise_separable: 3x3 branches as depthwise-separable convs (DeepLabV3+).
        """
        super().__init__()
        dilations = [int(d) for d in dilations]
        if any(d < 1 for d in dilations):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.ASPP_DILATIONS: ASPP dilations must be >= 1, "
                             f"got {dilations}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.ASPP_DROPOUT must be in [0, 1], got {dropout}")
        self.dilations = dilations
        self.image_pooling = image_pooling
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)  # a module: eval mode turns it off (validation loss)
        branches: List[nn.Module] = [conv_norm_act(in_channels, out_channels, 1, norm=norm)]
        for d in dilations:
            if depthwise_separable:
                branches.append(DepthwiseSeparableConv2d(
                    in_channels, out_channels, kernel_size=3, padding=d, dilation=d,
                    norm1=norm, activation1=nn.ReLU(), norm2=norm, activation2=nn.ReLU(),
                ))
            else:
                branches.append(conv_norm_act(in_channels, out_channels, 3, norm=norm, dilation=d))
        self.branches = nn.ModuleList(branches)
        if image_pooling:
            self.pool_conv = Conv2d(in_channels, out_channels, 1, bias=True, activation=F.relu)
            weight_init.c2_msra_fill(self.pool_conv)
        n = len(branches) + int(image_pooling)
        self.project = conv_norm_act(n * out_channels, out_channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        if self.image_pooling:
            pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
            outs.append(pooled.expand(-1, -1, x.shape[-2], x.shape[-1]))
        y = self.project(torch.cat(outs, dim=1))
        if self.dropout > 0:
            y = self.drop(y)
        return y
