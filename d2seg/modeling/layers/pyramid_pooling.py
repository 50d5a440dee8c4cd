"""The pyramid pooling module of PSPNet (Zhao et al., 2017)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import Norm, conv_norm_act
from .resize import resize_bilinear

__all__ = ["PyramidPooling"]


class PyramidPooling(nn.Module):
    """Adaptive-average-pool the input to b x b for each bin b, 1x1 conv each, upsample back and
    concatenate with the input.

    (N, C, H, W) -> (N, C + len(bins) * pool_channels, H, W). The 1x1-bin branch has a bias and
    no norm (a 1x1 map cannot be batch-normalised at batch size 1); the others conv-norm-ReLU.
    """

    def __init__(self, in_channels: int, pool_channels: int, bins: Sequence[int] = (1, 2, 3, 6),
                 *, norm: Norm = "BN"):
        super().__init__()
        bins = [int(b) for b in bins]
        if not bins or any(b < 1 for b in bins):
            raise ValueError(f"MODEL.PSP.BINS must be positive integers, got {bins}")
        self.bins = bins
        self.convs = nn.ModuleList([
            conv_norm_act(in_channels, pool_channels, 1, norm=(norm if b > 1 else ""))
            for b in bins
        ])
        self.out_channels = in_channels + len(bins) * pool_channels
        self.resize_impl = "interpolate"  # see d2seg.modeling.layers.resize

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x]
        for b, conv in zip(self.bins, self.convs):
            y = conv(F.adaptive_avg_pool2d(x, b))
            # from a 1x1 bin every pixel gets the same value: a broadcast, in either impl
            outs.append(y.expand(-1, -1, *size) if b == 1 else
                        resize_bilinear(y, size, self.resize_impl))
        return torch.cat(outs, dim=1)
