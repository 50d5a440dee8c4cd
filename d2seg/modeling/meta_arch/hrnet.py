"""``MODEL.META_ARCHITECTURE: "HRNetV2"``."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads.hrnet_head import HRNetV2Head
from .segmentor import EncoderDecoderSegmentor

__all__ = ["HRNetV2"]


@META_ARCH_REGISTRY.register()
class HRNetV2(EncoderDecoderSegmentor):
    """HRNetV2 for semantic segmentation (Sun et al., 2019): the HRNet backbone
    (``MODEL.BACKBONE.NAME: "build_hrnet_backbone"``, branches ``hr1..hr4``) and the
    :class:`~d2seg.modeling.heads.HRNetV2Head` (branches up-sampled to stride 4,
    concatenated, 1x1 conv-BN-ReLU, 1x1 classifier). Inputs and outputs: see
    :class:`EncoderDecoderSegmentor`.

    HRNet also serves the other heads: ``DeepLabV3Plus`` (ASPP on ``hr4``, decoder on ``hr1``),
    ``PSPNet`` (``MODEL.PSP.IN_FEATURE``), and with ``build_hrnet_fpn_backbone`` detectron2's
    Semantic FPN, Mask R-CNN and Panoptic FPN.
    """

    head_class = HRNetV2Head
