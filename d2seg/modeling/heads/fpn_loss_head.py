"""detectron2's Semantic FPN head trained with d2seg's losses (``"SemSegFPNLossHead"``).

Use with detectron2's own ``SemanticSegmentor`` to compare Semantic FPN with d2seg's models
under the same loss (``MODEL.SEM_SEG_LOSS``); ``"SemSegFPNHead"`` keeps detectron2's plain CE.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from ..layers.resize import resize_bilinear
from ..losses import SemSegLoss

__all__ = ["SemSegFPNLossHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class SemSegFPNLossHead(SemSegFPNHead):
    """``SemSegFPNHead`` (same layers and outputs) whose ``losses`` is a :class:`SemSegLoss`.

    Training returns ``(None, {"loss_sem_seg_<name>": ...})`` (lower-case loss names);
    inference (N, C, H, W) fp32 logits. ``NUM_CLASSES: 1`` (binary, sigmoid) trains one
    channel and infers the two channels [0, z] that d2seg's own models return
    (:func:`d2seg.modeling.postprocessing.binary_to_two_class_logits`), so that
    detectron2's ``SemanticSegmentor`` and the evaluators (which argmax) see class 1 where
    sigmoid(z) > 0.5.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, loss: Optional[SemSegLoss] = None,
                 loss_weight: float = 1.0, **kwargs):
        """
        Args:
            input_shape, kwargs: as detectron2's ``SemSegFPNHead`` (``num_classes``,
                ``conv_dims``, ``common_stride``, ``norm``, ``ignore_value``).
            loss: the losses; default: cross-entropy ignoring ``ignore_value``. The loss's own
                ``ignore_index`` is what the losses ignore.
            loss_weight: multiplies ``loss``'s terms (from a config it is already inside
                ``loss``: ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``).

        The classifier keeps detectron2's MSRA initialisation, so the first losses are larger
        than d2seg's heads' (whose classifiers start at N(0, 0.001): loss ln K).
        """
        super().__init__(input_shape, loss_weight=loss_weight, **kwargs)
        if loss is None:
            loss = SemSegLoss(ignore_index=self.ignore_value)
        self.loss = loss.derived(loss_weight) if loss_weight != 1.0 else loss
        self.resize_impl = "interpolate"  # the loss's resize: see d2seg.modeling.layers.resize

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        """detectron2's layers; in eval mode the logits in fp32 (upsampled in fp32 under
        inference autocast, ``D2SEG.SPEED.INFERENCE_AMP``)."""
        x = super().layers(features)
        if self.training:
            return x
        x = x.float()
        return torch.cat([torch.zeros_like(x), x], dim=1) if x.shape[1] == 1 else x

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret.pop("loss_weight", None)  # applied inside SemSegLoss
        ret["loss"] = SemSegLoss(cfg)
        return ret

    def losses(self, predictions: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """(N, K, h, w) predictions resized (in fp32) to the (N, H, W) targets' size, then
        ``self.loss``: ``{"loss_sem_seg_<name>": scalar}``."""
        predictions = resize_bilinear(predictions.float(), targets.shape[-2:], self.resize_impl)
        return self.loss(predictions, targets)
