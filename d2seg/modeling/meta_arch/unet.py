"""``MODEL.META_ARCHITECTURE: "UNet"``."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads.unet_head import UNetHead
from .segmentor import EncoderDecoderSegmentor

__all__ = ["UNet"]


@META_ARCH_REGISTRY.register()
class UNet(EncoderDecoderSegmentor):
    """U-Net: an encoder (``MODEL.BACKBONE.NAME``: ``"build_unet_backbone"`` for the classic
    U-Net encoder, or a detectron2 backbone such as ``"build_resnet_backbone"``) and the
    :class:`~d2seg.modeling.heads.UNetHead` decoder (``MODEL.UNET.*``).

    The classic configuration (``MODEL.UNET``: DEPTH 4, BASE_CHANNELS 64, NORM "BN",
    CONV_BIAS True, UPSAMPLE "transposed"; 3 input channels; NUM_CLASSES 2) has 31,043,586
    parameters. Inputs and outputs: see :class:`EncoderDecoderSegmentor`.
    """

    head_class = UNetHead
