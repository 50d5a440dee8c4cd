"""Registered semantic segmentation meta-architectures."""
from .deeplab import DeepLabV3, DeepLabV3Plus
from .pspnet import PSPNet
from .segmentor import EncoderDecoderSegmentor, binary_to_two_class_logits
from .unet import UNet

__all__ = ["EncoderDecoderSegmentor", "binary_to_two_class_logits", "UNet", "DeepLabV3",
           "DeepLabV3Plus", "PSPNet"]
