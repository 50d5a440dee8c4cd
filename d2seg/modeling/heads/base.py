"""What every d2seg semantic segmentation head shares: the forward protocol and the losses."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.resize import resize_bilinear
from ..losses import SemSegLoss

__all__ = ["SemSegHeadBase", "resize_logits"]

logger = logging.getLogger(__name__)


def resize_logits(logits: Tensor, size: Tuple[int, int], impl: str = "interpolate") -> Tensor:
    """Bilinear resize of (N, K, h, w) logits to ``size`` (a no-op when already there);
    ``impl``: see :func:`d2seg.modeling.layers.resize.resize_bilinear`."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return resize_bilinear(logits, size, impl)


class SemSegHeadBase(nn.Module):
    """Base of d2seg's heads, following detectron2's ``SemSegFPNHead`` protocol.

    Subclasses implement ``layers(features) -> (N, K, H / s, W / s)`` logits, where
    s = ``self.common_stride`` and K = ``num_classes`` (K = 1: binary, sigmoid).

    ``forward(features, targets)``:

    * training: ``targets`` (N, H, W) long at the (padded) input resolution, ``ignore_value``
      where unlabelled; returns ``(None, dict of losses)`` with the logits upsampled to the
      targets' size before the loss.
    * inference: returns ``((N, K, s * h, s * w) float32 logits, {})``: the layers' output
      upsampled by s, which is the input's (H, W) when H and W are multiples of the head's
      deepest stride (the meta-architectures pad the batch to their ``size_divisibility`` and
      crop the result back); fp32 also under autocast (``D2SEG.SPEED.INFERENCE_AMP``).

    A ``loss`` given must ignore the same ``ignore_value`` (targets are padded with it).
    """

    def __init__(self, *, num_classes: int, ignore_value: int, common_stride: int,
                 loss: Optional[SemSegLoss] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be >= 1, got {num_classes}")
        if loss is not None and loss.ignore_index != ignore_value:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE: the head's ignore_value "
                             f"{ignore_value} (padding and unlabelled pixels) differs from its "
                             f"loss's ignore_index {loss.ignore_index}; give both the same value")
        if 0 <= ignore_value < max(num_classes, 2):
            logger.warning(f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE {ignore_value} is a class id "
                           f"(NUM_CLASSES {num_classes}): class {ignore_value} is never trained "
                           f"and scores no loss; datasets mark unlabelled pixels with 255")
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.common_stride = int(common_stride)
        self.loss = loss if loss is not None else SemSegLoss(ignore_index=ignore_value)
        # how the training logits (and subclasses' feature maps) are resized: see
        # d2seg.modeling.layers.resize (D2SEG.SPEED.MATMUL_RESIZE)
        self.resize_impl = "interpolate"

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Dict[str, Tensor], targets: Optional[Tensor] = None
                ) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
        """See the class docstring: ``(None, losses)`` in training, ``(logits, {})`` in
        inference."""
        logits = self.layers(features)
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__} needs targets ('sem_seg') in training")
            return None, self.losses(logits, targets)
        logits = logits.float()  # upsampled (and returned) in fp32 under inference autocast
        if self.common_stride > 1:
            logits = F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear",
                                   align_corners=False)
        return logits, {}

    def losses(self, logits: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """(N, K, h, w) logits resized (in fp32) to the (N, H, W) targets' size, then
        ``self.loss``: ``{"loss_sem_seg_<name>": scalar}``."""
        logits = resize_logits(logits.float(), targets.shape[-2:], self.resize_impl)
        return self.loss(logits, targets)
