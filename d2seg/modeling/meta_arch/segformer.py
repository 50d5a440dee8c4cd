"""``MODEL.META_ARCHITECTURE: "SegFormer"``."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..heads.segformer_head import SegFormerHead
from .segmentor import EncoderDecoderSegmentor

__all__ = ["SegFormer"]


@META_ARCH_REGISTRY.register()
class SegFormer(EncoderDecoderSegmentor):
    """SegFormer (Xie et al., 2021): the Mix Transformer encoder (``MODEL.BACKBONE.NAME:
    "build_mit_backbone"``, ``MODEL.MIT.*``, presets b0..b5) and the all-MLP
    :class:`~d2seg.modeling.heads.SegFormerHead` (``MODEL.SEGFORMER.*``); logits at stride 4.

    With 150 classes b0 has 3.8M parameters (decoder dim 256) and b2 27.5M (dim 768), as
    published. Inputs and outputs: see :class:`EncoderDecoderSegmentor` (inputs padded to a
    multiple of 32).
    """

    head_class = SegFormerHead
