"""``MODEL.META_ARCHITECTURE: "DeepLabV3"`` and ``"DeepLabV3Plus"``."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads.deeplab_head import ASPPDecoderHead, ASPPHead
from .segmentor import EncoderDecoderSegmentor

__all__ = ["DeepLabV3", "DeepLabV3Plus"]


@META_ARCH_REGISTRY.register()
class DeepLabV3(EncoderDecoderSegmentor):
    """DeepLabV3 (Chen et al., 2017): a dilated ResNet (output stride 8 or 16, e.g.
    detectron2's ``build_resnet_deeplab_backbone`` with ``MODEL.RESNETS.RES4_DILATION`` /
    ``RES5_DILATION``) and the :class:`~d2seg.modeling.heads.ASPPHead` on its deepest feature.
    Inputs and outputs: see :class:`EncoderDecoderSegmentor`.
    """

    head_class = ASPPHead


@META_ARCH_REGISTRY.register()
class DeepLabV3Plus(EncoderDecoderSegmentor):
    """DeepLabV3+ (Chen et al., 2018): DeepLabV3 plus a decoder fusing low-level features
    (``MODEL.SEM_SEG_HEAD.PROJECT_FEATURES``, e.g. res2) —
    :class:`~d2seg.modeling.heads.ASPPDecoderHead`. Inputs and outputs: see
    :class:`EncoderDecoderSegmentor`.
    """

    head_class = ASPPDecoderHead
