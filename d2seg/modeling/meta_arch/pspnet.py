"""``MODEL.META_ARCHITECTURE: "PSPNet"``."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads.psp_head import PSPHead
from .segmentor import EncoderDecoderSegmentor

__all__ = ["PSPNet"]


@META_ARCH_REGISTRY.register()
class PSPNet(EncoderDecoderSegmentor):
    """PSPNet (Zhao et al., 2017): a dilated ResNet (output stride 8) and the
    :class:`~d2seg.modeling.heads.PSPHead` (pyramid pooling over 1, 2, 3, 6 bins; an auxiliary
    loss on res4 in training when the head has an ``aux_in_feature``, as the configs'
    ``MODEL.PSP.AUX_IN_FEATURE: res4`` (the default) sets it; none for a head built in Python
    without one). Inputs and outputs: see :class:`EncoderDecoderSegmentor`.
    """

    head_class = PSPHead
