"""Layers shared by d2seg's models."""
from .aspp import ASPP
from .blocks import DoubleConv, conv_norm_act
from .pyramid_pooling import PyramidPooling

__all__ = ["ASPP", "DoubleConv", "conv_norm_act", "PyramidPooling"]
