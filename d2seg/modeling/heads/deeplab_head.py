"""DeepLabV3 and DeepLabV3+ heads (``"ASPPHead"``, ``"ASPPDecoderHead"``).

detectron2's ``projects/DeepLab`` heads (``DeepLabV3Head``, ``DeepLabV3PlusHead``) fix three
ASPP rates with image pooling and only offer (hard-pixel-mined) cross-entropy; these take any
rates, image pooling on/off, and d2seg's loss combinations. They read detectron2's DeepLab
config keys (``MODEL.SEM_SEG_HEAD.ASPP_*``, ``PROJECT_FEATURES``, ``PROJECT_CHANNELS``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..layers.aspp import ASPP
from ..layers.blocks import Norm, conv_norm_act
from ..layers.resize import resize_bilinear
from ..losses import SemSegLoss
from .base import SemSegHeadBase

__all__ = ["ASPPHead", "ASPPDecoderHead"]


def _aspp_from_config(cfg) -> dict:
    h = cfg.MODEL.SEM_SEG_HEAD
    return {
        "aspp_channels": h.ASPP_CHANNELS,
        "aspp_dilations": list(h.ASPP_DILATIONS),
        "aspp_dropout": h.ASPP_DROPOUT,
        "image_pooling": h.ASPP_IMAGE_POOLING,
        "depthwise_separable": h.USE_DEPTHWISE_SEPARABLE_CONV,
        "num_classes": h.NUM_CLASSES,
        "norm": h.NORM,
        "ignore_value": h.IGNORE_VALUE,
        "loss": SemSegLoss(cfg),
    }


def _pick(input_shape: Dict[str, ShapeSpec], names: Sequence[str], key: str):
    missing = [n for n in names if n not in input_shape]
    if missing:
        raise ValueError(f"{key} {list(names)}: {missing} not among the backbone's outputs "
                         f"{list(input_shape.keys())} (see MODEL.RESNETS.OUT_FEATURES)")
    return {n: input_shape[n] for n in names}


def _deepest(input_shape: Dict[str, ShapeSpec]) -> Tuple[str, ShapeSpec]:
    """The feature ASPP runs on: the one of largest stride, and of those the last (a dilated
    ResNet's res4 and res5 share a stride: res5, as the DeepLab papers use)."""
    items = list(input_shape.items())
    i = max(range(len(items)), key=lambda j: (items[j][1].stride, j))
    return items[i]


@SEM_SEG_HEADS_REGISTRY.register()
class ASPPHead(SemSegHeadBase):
    """DeepLabV3 head: ASPP on the deepest feature, a 3x3 conv, a 1x1 classifier.

    Logits at the feature's stride (8 or 16 with a dilated ResNet); see
    :class:`SemSegHeadBase` for the forward protocol.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        image_pooling: bool = True,
        depthwise_separable: bool = False,
        norm: Norm = "BN",
        ignore_value: int = 255,
        loss: Optional[SemSegLoss] = None,
    ):
        """
        Args:
            input_shape: the feature ASPP runs on (the deepest, if several are given).
        """
        name, shape = _deepest(input_shape)
        super().__init__(num_classes=num_classes, ignore_value=ignore_value,
                         common_stride=shape.stride, loss=loss)
        self.in_feature = name
        self.aspp = ASPP(shape.channels, aspp_channels, aspp_dilations, norm=norm,
                         image_pooling=image_pooling, dropout=aspp_dropout,
                         depthwise_separable=depthwise_separable)
        self.conv = conv_norm_act(aspp_channels, aspp_channels, 3, norm=norm)
        self.predictor = Conv2d(aspp_channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = _aspp_from_config(cfg)
        ret["input_shape"] = _pick(input_shape, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES,
                                   "MODEL.SEM_SEG_HEAD.IN_FEATURES")
        return ret

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        return self.predictor(self.conv(self.aspp(features[self.in_feature])))


@SEM_SEG_HEADS_REGISTRY.register()
class ASPPDecoderHead(SemSegHeadBase):
    """DeepLabV3+ head: ASPP on the deepest feature, then a decoder that, for each low-level
    feature from deep to shallow, up-samples to it, concatenates its 1x1 projection and
    applies two 3x3 convs. Logits at the shallowest low-level feature's stride (4 for res2):
    (N, K, H / 4, W / 4) in ``layers``; see :class:`SemSegHeadBase` for the forward protocol
    (training: losses at the targets' resolution; inference: logits up-sampled 4x, the input's
    (H, W) when it is a multiple of the backbone's stride; the meta-architecture pads and crops).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        project_features: Sequence[str],
        project_channels: Sequence[int],
        num_classes: int,
        decoder_channels: int = 256,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        image_pooling: bool = True,
        depthwise_separable: bool = False,
        norm: Norm = "BN",
        ignore_value: int = 255,
        loss: Optional[SemSegLoss] = None,
    ):
        """
        Args:
            input_shape: features including the ``project_features``; ASPP runs on the
                deepest of the others (e.g. a backbone's whole ``output_shape()``).
            project_features: low-level features fused by the decoder (e.g. ["res2"]).
            project_channels: 1x1 projection width of each (e.g. [48]).
            decoder_channels: width of the decoder's 3x3 convs.
        """
        project_features = list(project_features)
        if not project_features:
            raise ValueError("MODEL.SEM_SEG_HEAD.PROJECT_FEATURES is empty: DeepLabV3+ needs at "
                             "least one low-level feature (e.g. ['res2'])")
        if len(project_channels) != len(project_features):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS {list(project_channels)} needs "
                             f"one value per PROJECT_FEATURES {project_features}")
        for n in project_features:
            if n not in input_shape:
                raise ValueError(f"MODEL.SEM_SEG_HEAD.PROJECT_FEATURES: '{n}' is not among the "
                                 f"head's inputs {list(input_shape.keys())}")
        deep = [k for k in input_shape if k not in project_features]
        if not deep:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.PROJECT_FEATURES {project_features}: the "
                             f"DeepLabV3+ head (ASPPDecoderHead) needs a deeper feature for "
                             f"ASPP besides them, got only {list(input_shape.keys())}")
        # as ASPPHead: the deepest of the others (a backbone's whole output_shape() works)
        deep_name = _deepest({k: input_shape[k] for k in deep})[0]
        low = sorted(((n, c) for n, c in zip(project_features, project_channels)),
                     key=lambda nc: input_shape[nc[0]].stride, reverse=True)
        if any(input_shape[n].stride >= input_shape[deep_name].stride for n, _ in low):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.PROJECT_FEATURES {project_features} must "
                             f"be shallower than the ASPP feature '{deep_name}'")
        super().__init__(num_classes=num_classes, ignore_value=ignore_value,
                         common_stride=input_shape[low[-1][0]].stride, loss=loss)
        self.in_feature = deep_name
        self.aspp = ASPP(input_shape[deep_name].channels, aspp_channels, aspp_dilations,
                         norm=norm, image_pooling=image_pooling, dropout=aspp_dropout,
                         depthwise_separable=depthwise_separable)
        self.low_features: List[str] = [n for n, _ in low]
        self.projects = nn.ModuleList()
        self.fuses = nn.ModuleList()
        ch = aspp_channels
        for n, pc in low:
            self.projects.append(conv_norm_act(input_shape[n].channels, pc, 1, norm=norm))
            self.fuses.append(nn.Sequential(
                conv_norm_act(ch + pc, decoder_channels, 3, norm=norm),
                conv_norm_act(decoder_channels, decoder_channels, 3, norm=norm),
            ))
            ch = decoder_channels
        self.predictor = Conv2d(ch, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        ret = _aspp_from_config(cfg)
        names = list(h.IN_FEATURES) + [n for n in h.PROJECT_FEATURES if n not in h.IN_FEATURES]
        ret["input_shape"] = _pick(input_shape, names,
                                   "MODEL.SEM_SEG_HEAD.IN_FEATURES + PROJECT_FEATURES")
        ret["project_features"] = list(h.PROJECT_FEATURES)
        ret["project_channels"] = list(h.PROJECT_CHANNELS)
        ret["decoder_channels"] = h.CONVS_DIM
        return ret

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        x = self.aspp(features[self.in_feature])
        for name, proj, fuse in zip(self.low_features, self.projects, self.fuses):
            low = proj(features[name])
            x = resize_bilinear(x, low.shape[-2:], self.resize_impl)
            x = fuse(torch.cat([x, low], dim=1))
        return self.predictor(x)
