"""Small building blocks shared by d2seg's heads and backbones (detectron2 ``Conv2d`` based)."""
from __future__ import annotations

import difflib
from typing import Callable, Optional, Union

import fvcore.nn.weight_init as weight_init
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, get_norm

__all__ = ["conv_norm_act", "DoubleConv", "gn_groups", "norm_layer"]

Norm = Union[str, Callable[[int], nn.Module], None]


def gn_groups(channels: int) -> int:
    """32 groups when the channels allow (detectron2's "GN"); otherwise the largest divisor of
    ``channels`` below 32 that leaves at least 4 channels per group (widths such as DeepLabV3+'s
    48-channel projection, a 16-channel U-Net level or HRNet's 18 are not multiples of 32)."""
    if channels % 32 == 0:
        return 32
    for g in range(min(32, channels // 4), 0, -1):
        if channels % g == 0:
            return g
    return 1


# the names detectron2's get_norm knows (detectron2/layers/batch_norm.py), for error messages
NORM_NAMES = ("", "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N",
              "LN")


def norm_layer(norm: Norm, channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm``, with "GN" valid for any width (:func:`gn_groups`).

    Raises:
        ValueError: ``norm`` is a name ``get_norm`` does not know (instead of its bare
            ``KeyError``).
    """
    if norm == "GN":
        return nn.GroupNorm(gn_groups(channels), channels)
    try:
        return get_norm(norm, channels)
    except KeyError:
        if not isinstance(norm, str):
            raise
        close = [n for n in NORM_NAMES if n and n.lower() == norm.lower()] or \
            difflib.get_close_matches(norm, [n for n in NORM_NAMES if n], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM / MODEL.UNET.NORM / MODEL.HRNET.NORM: "
                         f"{norm!r} is not one of detectron2's get_norm names "
                         f"{list(NORM_NAMES)}{hint}") from None


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
        dilation=dilation, bias=bias, norm=norm_layer(norm, out_channels),
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
