"""PSPNet head with pyramid pooling and an auxiliary head (``"PSPHead"``)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..layers.blocks import Norm, conv_norm_act
from ..layers.pyramid_pooling import PyramidPooling
from ..losses import SemSegLoss
from .base import SemSegHeadBase, resize_logits

__all__ = ["PSPHead"]


def _classifier(in_ch: int, num_classes: int, dropout: float) -> nn.Sequential:
    conv = Conv2d(in_ch, num_classes, 1)
    nn.init.normal_(conv.weight, 0, 0.001)
    nn.init.constant_(conv.bias, 0)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


@SEM_SEG_HEADS_REGISTRY.register()
class PSPHead(SemSegHeadBase):
    """PSPNet (Zhao et al., 2017): pyramid pooling on ``in_feature`` (bins 1, 2, 3, 6 by
    default), a 3x3 conv, dropout and a 1x1 classifier; logits at that feature's stride.

    In training an auxiliary head (3x3 conv, dropout, 1x1 classifier) on ``aux_in_feature``
    adds the same losses, weighted by ``aux_loss_weight``, under ``loss_aux_*`` keys. It is
    unused at inference. See :class:`SemSegHeadBase` for the forward protocol.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        pool_channels: int = 512,
        convs_dim: int = 512,
        dropout: float = 0.1,
        aux_in_feature: str = "",
        aux_convs_dim: int = 256,
        norm: Norm = "BN",
        ignore_value: int = 255,
        loss: Optional[SemSegLoss] = None,
        aux_loss: Optional[SemSegLoss] = None,
    ):
        """
        Args:
            input_shape: the backbone's features (must contain ``in_feature`` and, if set,
                ``aux_in_feature``).
            aux_in_feature: "" = no auxiliary head (built from a config it is
                ``MODEL.PSP.AUX_IN_FEATURE``, "res4" by default, as in the PSPNet paper).
            aux_loss: the auxiliary losses (their ``loss_weight`` includes the aux weight);
                default: ``loss``'s settings times 0.4.
        """
        for key, n in (("MODEL.PSP.IN_FEATURE", in_feature),
                       ("MODEL.PSP.AUX_IN_FEATURE", aux_in_feature)):
            if n and n not in input_shape:
                raise ValueError(f"{key} '{n}' is not among the backbone's outputs "
                                 f"{list(input_shape.keys())} (see MODEL.RESNETS.OUT_FEATURES)")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MODEL.PSP.DROPOUT must be in [0, 1], got {dropout}")
        super().__init__(num_classes=num_classes, ignore_value=ignore_value,
                         common_stride=input_shape[in_feature].stride, loss=loss)
        self.in_feature = in_feature
        self.ppm = PyramidPooling(input_shape[in_feature].channels, pool_channels, bins, norm=norm)
        self.bottleneck = conv_norm_act(self.ppm.out_channels, convs_dim, 3, norm=norm)
        self.predictor = _classifier(convs_dim, num_classes, dropout)
        self.aux_in_feature = aux_in_feature
        if aux_in_feature:
            self.aux = nn.Sequential(
                conv_norm_act(input_shape[aux_in_feature].channels, aux_convs_dim, 3, norm=norm),
                _classifier(aux_convs_dim, num_classes, dropout),
            )
            if aux_loss is None:  # the main losses' settings, weighted 0.4 (PSPNet's paper)
                aux_loss = self.loss.derived(0.4, prefix="loss_aux")
            self.aux_loss = aux_loss

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        p = cfg.MODEL.PSP
        aux_args = SemSegLoss.from_config(cfg, prefix="loss_aux")
        aux_args["loss_weight"] = aux_args["loss_weight"] * p.AUX_LOSS_WEIGHT
        return {
            "input_shape": input_shape,
            "in_feature": p.IN_FEATURE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "bins": list(p.BINS),
            "pool_channels": p.POOL_CHANNELS,
            "convs_dim": p.CONVS_DIM,
            "dropout": p.DROPOUT,
            "aux_in_feature": p.AUX_IN_FEATURE,
            "aux_convs_dim": p.AUX_CONVS_DIM,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss": SemSegLoss(cfg),
            "aux_loss": SemSegLoss(**aux_args),
        }

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        return self.predictor(self.bottleneck(self.ppm(features[self.in_feature])))

    def forward(self, features: Dict[str, Tensor], targets: Optional[Tensor] = None
                ) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
        """:meth:`SemSegHeadBase.forward`, plus the auxiliary ``loss_aux_*`` terms in
        training."""
        logits, losses = super().forward(features, targets)
        if self.training and self.aux_in_feature:
            aux = self.aux(features[self.aux_in_feature]).float()
            aux = resize_logits(aux, targets.shape[-2:], self.resize_impl)
            losses.update(self.aux_loss(aux, targets))
        return logits, losses
