"""Registered semantic segmentation meta-architectures."""
from .deeplab import DeepLabV3, DeepLabV3Plus
from .hrnet import HRNetV2
from .pspnet import PSPNet
from .segformer import SegFormer
from .segmentor import EncoderDecoderSegmentor, binary_to_two_class_logits
from .unet import UNet

__all__ = ["EncoderDecoderSegmentor", "binary_to_two_class_logits", "UNet", "DeepLabV3",
           "DeepLabV3Plus", "PSPNet", "SegFormer",
           "HRNetV2"]
