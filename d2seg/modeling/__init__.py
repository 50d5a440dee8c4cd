"""Models registered in detectron2's registries on import.

* meta-architectures (``MODEL.META_ARCHITECTURE``): ``UNet``, ``DeepLabV3``,
  ``DeepLabV3Plus``, ``PSPNet``, ``SegFormer``, ``HRNetV2``;
* semantic heads (``MODEL.SEM_SEG_HEAD.NAME``): ``UNetHead``, ``ASPPHead``,
  ``ASPPDecoderHead``, ``PSPHead``, ``SemSegFPNLossHead``, ``SegFormerHead``, ``HRNetV2Head``;
* backbones (``MODEL.BACKBONE.NAME``): ``build_unet_backbone``, ``build_mit_backbone``
  (SegFormer's Mix Transformer), ``build_hrnet_backbone``, ``build_hrnet_fpn_backbone``
  and detectron2's ``build_resnet_deeplab_backbone``.
"""
from . import backbone, heads, meta_arch  # noqa: F401  (registration side effects)
from .losses import SemSegLoss, cross_entropy_loss, focal_loss, soft_dice_loss, tversky_loss
from .meta_arch import (DeepLabV3, DeepLabV3Plus, EncoderDecoderSegmentor, HRNetV2, PSPNet,
                        SegFormer, UNet)
from .postprocessing import SemSegPostProcessor, postprocess_mask, search_threshold

__all__ = [
    "SemSegLoss", "cross_entropy_loss", "focal_loss", "soft_dice_loss", "tversky_loss",
    "EncoderDecoderSegmentor", "UNet", "DeepLabV3", "DeepLabV3Plus", "PSPNet", "SegFormer",
    "HRNetV2",
    "SemSegPostProcessor", "postprocess_mask", "search_threshold",
]
