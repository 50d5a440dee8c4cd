"""Semantic segmentation heads, registered in detectron2's ``SEM_SEG_HEADS_REGISTRY``."""
from .base import SemSegHeadBase, resize_logits
from .deeplab_head import ASPPDecoderHead, ASPPHead
from .fpn_loss_head import SemSegFPNLossHead
from .hrnet_head import HRNetV2Head
from .psp_head import PSPHead
from .segformer_head import SegFormerHead
from .unet_head import UNetHead, UNetUpBlock

__all__ = ["SemSegHeadBase", "resize_logits", "ASPPHead", "ASPPDecoderHead", "SemSegFPNLossHead",
           "PSPHead", "UNetHead", "UNetUpBlock", "SegFormerHead",
           "HRNetV2Head"]
