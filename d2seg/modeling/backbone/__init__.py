"""Backbones registered in detectron2's ``BACKBONE_REGISTRY``.

Importing this also registers detectron2's ``build_resnet_deeplab_backbone`` (from
``detectron2.projects.deeplab``: ResNet with RES4/RES5 dilation for output stride 8 or 16).
"""
import detectron2.projects.deeplab  # noqa: F401  (registers build_resnet_deeplab_backbone)

from .hrnet import HRNet, build_hrnet_backbone, build_hrnet_fpn_backbone
from .mit import MixVisionTransformer, build_mit_backbone
from .unet_encoder import UNetEncoder, build_unet_backbone

__all__ = ["UNetEncoder", "build_unet_backbone", "MixVisionTransformer", "build_mit_backbone",
           "HRNet", "build_hrnet_backbone", "build_hrnet_fpn_backbone"]
