"""The HRNetV2 segmentation head (``"HRNetV2Head"``)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..backbone.hrnet import concat_upsampled, hrnet_norm
from ..layers.blocks import Norm, conv_norm_act
from ..losses import SemSegLoss
from .base import SemSegHeadBase

__all__ = ["HRNetV2Head"]


@SEM_SEG_HEADS_REGISTRY.register()
class HRNetV2Head(SemSegHeadBase):
    """HRNetV2 (Sun et al., 2019) head: every input feature bilinearly up-sampled to the
    highest-resolution one and concatenated, a 1x1 conv-norm-ReLU (as wide as the
    concatenation by default, the published ``last_inp_channels``), a 1x1 classifier.

    With HRNet's ``hr1..hr4`` the logits are at stride 4; a single input (e.g. ``"hrcat"``, the
    concatenation already made by the backbone) is used as it is. Works on any backbone's
    features (e.g. ResNet ``res2..res5``). See :class:`SemSegHeadBase` for the forward
    protocol: (N, K, ceil(H / 4), ceil(W / 4)) logits in ``layers``; training returns losses,
    inference those logits up-sampled 4x (the input's (H, W) when it is a multiple of the
    backbone's stride; the meta-architecture pads and crops).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Optional[Sequence[str]] = None,
        channels: int = 0,
        norm: Norm = "BN",
        ignore_value: int = 255,
        loss: Optional[SemSegLoss] = None,
    ):
        """
        Args:
            input_shape: the backbone's features.
            in_features: the features concatenated; None or [] = all of ``input_shape``.
            channels: width of the 1x1 conv before the classifier; 0 = the sum of the input
                channels (HRNetV2).
            norm: norm of that conv ("GN" accepts any width, see ``hrnet_norm``).
        """
        names = list(in_features) if in_features else list(input_shape)
        missing = [n for n in names if n not in input_shape]
        if missing or not names:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {names}: {missing} not among the "
                             f"backbone's outputs {list(input_shape)} (see "
                             "MODEL.HRNET.OUT_FEATURES)")
        if channels < 0:
            raise ValueError(f"MODEL.HRNET.HEAD_CHANNELS must be >= 0, got {channels}")
        # highest resolution first: the concatenation is made at its size
        names = sorted(names, key=lambda n: input_shape[n].stride)
        super().__init__(num_classes=num_classes, ignore_value=ignore_value,
                         common_stride=input_shape[names[0]].stride, loss=loss)
        self.in_features = names
        in_ch = sum(input_shape[n].channels for n in names)
        channels = channels or in_ch
        self.fuse = conv_norm_act(in_ch, channels, 1, norm=hrnet_norm(norm))
        self.predictor = Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": h.NUM_CLASSES,
            "in_features": list(h.IN_FEATURES),
            "channels": cfg.MODEL.HRNET.HEAD_CHANNELS,
            "norm": h.NORM,
            "ignore_value": h.IGNORE_VALUE,
            "loss": SemSegLoss(cfg),
        }

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        x = concat_upsampled([features[n] for n in self.in_features], self.resize_impl)
        return self.predictor(self.fuse(x))
