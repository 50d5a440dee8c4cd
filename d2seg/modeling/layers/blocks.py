"""Small building blocks shared by d2seg's heads and backbones (detectron2 ``Conv2d`` based)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import fvcore.nn.weight_init as weight_init
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, get_norm

__all__ = ["conv_norm_act", "DoubleConv"]

Norm = Union[str, Callable[[int], nn.Module], None]


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    norm: Norm = "BN",
    dilation: int = 1,
    bias: Optional[bool] = None,
    activation: bool = True,
) -> Conv2d:
    """``Conv2d(k, 'same' padding, dilation) -> norm -> ReLU`` with MSRA init.

    ``bias`` defaults to "no norm" (a bias before a norm is redundant).
    """
    if bias is None:
        bias = not norm
    conv = Conv2d(
        in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
        dilation=dilation, bias=bias, norm=get_norm(norm, out_channels),
        activation=F.relu if activation else None,
    )
    weight_init.c2_msra_fill(conv)
    return conv


class DoubleConv(nn.Sequential):
    """Two ``3x3 conv -> norm -> ReLU`` (the U-Net unit). (N, Cin, H, W) -> (N, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: Norm = "BN",
                 bias: Optional[bool] = None, mid_channels: Optional[int] = None):
        mid = mid_channels or out_channels
        super().__init__(
            conv_norm_act(in_channels, mid, 3, norm=norm, bias=bias),
            conv_norm_act(mid, out_channels, 3, norm=norm, bias=bias),
        )
