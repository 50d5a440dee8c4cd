"""Reference implementations that d2seg's models are measured against, side by side.

They are deliberately plain PyTorch (no detectron2), written the way a user would write them
without d2seg, so that a ratio "d2seg / reference" measures what d2seg adds. Nothing here ever
downloads weights: every model starts from random initialisation.

Semantic references (``forward``: (N, 3, H, W) normalised float -> (N, K, H, W) logits, train
and eval alike; :func:`semantic_logits` unwraps torchvision's ``{"out": ...}`` dicts):

===============================  ===========================================================
``plain_unet``                   :class:`PlainUNet`, the classic U-Net (same network as d2seg's
                                 ``UNet`` with ``UPSAMPLE: transposed``)
``plain_deeplabv3plus_r50``      :class:`PlainDeepLabV3Plus`: torchvision ResNet-50 (output
                                 stride 16) + torchvision's ASPP + the V3+ decoder
``tv_deeplabv3_r50``             torchvision's DeepLab**V3**-ResNet50 (no V3+ decoder) at the
                                 d2seg config's output stride (8 or 16) and ASPP rates
``smp_unet_r34``                 segmentation_models_pytorch ``Unet(resnet34)`` (optional)
``smp_deeplabv3plus_r50``        segmentation_models_pytorch ``DeepLabV3Plus(resnet50)``
``smp_pspnet_r50``               segmentation_models_pytorch ``PSPNet(resnet50)``
===============================  ===========================================================

Instance reference: ``tv_maskrcnn_r50_fpn`` (torchvision ``maskrcnn_resnet50_fpn``, training:
``model(images, targets)`` -> loss dict; eval: ``model(images)`` -> detections). "Plain
detectron2" (detectron2's own model from the same config, trained by detectron2's
``SimpleTrainer`` / ``AMPTrainer``) is :func:`build_plain_detectron2`.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PlainUNet", "PlainDeepLabV3Plus", "REFERENCES", "ReferenceSpec", "build_reference",
           "smp_available", "semantic_logits", "build_plain_detectron2", "reference_unavailable"]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class PlainUNet(nn.Module):
    """The classic U-Net (Ronneberger et al., 2015) in plain PyTorch, 'same' padding, BN.

    ``depth`` max-pool levels, ``base * 2**i`` channels at level i, transposed-conv
    up-sampling, skip concatenation, 1x1 classifier. With the defaults (3 input channels,
    64 base, depth 4, 2 classes) it has 31,043,586 parameters, like d2seg's classic ``UNet``.

    forward: (N, in_channels, H, W) with H, W divisible by ``2**depth`` ->
    (N, num_classes, H, W) logits (train and eval alike).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 64,
                 depth: int = 4):
        super().__init__()
        chs = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, chs[0])] +
                                  [_double_conv(chs[i - 1], chs[i]) for i in range(1, depth + 1)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chs[i], chs[i - 1], 2, stride=2)
                                 for i in range(depth, 0, -1)])
        self.dec = nn.ModuleList([_double_conv(chs[i], chs[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(chs[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainDeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al., 2018) from torchvision parts, as a plain-PyTorch user builds it.

    torchvision ResNet-50 with the last stage dilated (output stride 16; ``output_stride=8``
    dilates layer3 too), torchvision's ``ASPP`` (rates ``atrous_rates``, image pooling, 256
    channels), and the V3+ decoder: layer1 projected to ``project_channels`` by 1x1 conv,
    concatenated with the 4x up-sampled ASPP output, two 3x3 conv + BN + ReLU of
    ``decoder_channels``, 1x1 classifier, bilinear up-sampling to the input size.

    forward: (N, 3, H, W), H and W divisible by 16 -> (N, num_classes, H, W) logits.
    """

    def __init__(self, num_classes: int = 2, atrous_rates: Tuple[int, ...] = (6, 12, 18),
                 output_stride: int = 16, project_channels: int = 48,
                 decoder_channels: int = 256):
        super().__init__()
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import ASPP

        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        dilate = [False, output_stride == 8, True]
        trunk = resnet50(weights=None, replace_stride_with_dilation=dilate)
        self.backbone = IntermediateLayerGetter(trunk, {"layer1": "low", "layer4": "out"})
        self.aspp = ASPP(2048, list(atrous_rates), 256)
        self.project = _conv_bn_relu(256, project_channels, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(256 + project_channels, decoder_channels, 3),
                                     _conv_bn_relu(decoder_channels, decoder_channels, 3))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        feats = self.backbone(x)
        low = self.project(feats["low"])
        y = F.interpolate(self.aspp(feats["out"]), size=low.shape[-2:], mode="bilinear",
                          align_corners=False)
        y = self.classifier(self.decoder(torch.cat([low, y], dim=1)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def semantic_logits(out) -> Tensor:
    """A semantic reference's output as a logits tensor (torchvision returns ``{"out": t}``)."""
    return out["out"] if isinstance(out, dict) else out


def smp_available() -> bool:
    """Whether ``segmentation_models_pytorch`` can be imported (it is optional)."""
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        return False
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


class ReferenceSpec(NamedTuple):
    """How to build one reference: ``task`` ("semantic" or "instance"), a one-line
    ``description`` (what network it is, how it differs), ``build(num_classes, **kw)``, and
    ``needs`` (an optional module that must import, e.g. segmentation_models_pytorch)."""

    task: str
    description: str
    build: Callable[..., nn.Module]
    needs: Optional[str] = None


def _unet(num_classes: int, base: int = 64, depth: int = 4, **_) -> nn.Module:
    return PlainUNet(3, num_classes, base=base, depth=depth)


def _plain_dlv3p(num_classes: int, **_) -> nn.Module:
    return PlainDeepLabV3Plus(num_classes)


def _tv_deeplabv3(num_classes: int, output_stride: int = 8,
                  atrous_rates: Sequence[int] = (12, 24, 36), **_) -> nn.Module:
    """torchvision's DeepLabV3-ResNet50 (its own classes), at ``output_stride`` 8
    (``deeplabv3_resnet50`` exactly) or 16 (layer4 dilated only, as d2seg's R50 configs)."""
    from torchvision.models import resnet50
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if output_stride not in (8, 16):
        raise ValueError(f"tv_deeplabv3_r50: output stride 8 or 16, got {output_stride}")
    dilate = [False, output_stride == 8, True]
    backbone = IntermediateLayerGetter(resnet50(weights=None, replace_stride_with_dilation=dilate),
                                       return_layers={"layer4": "out"})
    return DeepLabV3(backbone, DeepLabHead(2048, num_classes, tuple(atrous_rates)), None)


def _tv_maskrcnn(num_classes: int, min_size: int = 800, max_size: int = 1333, **_) -> nn.Module:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    # num_classes counts the background in torchvision (label 0)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                 num_classes=num_classes + 1, min_size=min_size,
                                 max_size=max_size)


def _smp(arch: str, encoder: str):
    def build(num_classes: int, **_) -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None,
                                  classes=num_classes)
    return build


REFERENCES: Dict[str, ReferenceSpec] = {
    "plain_unet": ReferenceSpec(
        "semantic", "plain-PyTorch classic U-Net (same network as d2seg UNet, transposed conv)",
        _unet),
    "plain_deeplabv3plus_r50": ReferenceSpec(
        "semantic", "plain-PyTorch DeepLabV3+ from torchvision ResNet-50 (OS16, 7x7 stem, no "
        "multi-grid) + torchvision ASPP (6,12,18) + V3+ decoder", _plain_dlv3p),
    "tv_deeplabv3_r50": ReferenceSpec(
        "semantic", "torchvision DeepLabV3-ResNet50 (deeplabv3_resnet50's classes): DeepLabV3, "
        "NOT V3+ (no decoder); built at the d2seg config's output stride and ASPP rates",
        _tv_deeplabv3),
    "smp_unet_r34": ReferenceSpec(
        "semantic", "segmentation_models_pytorch Unet(resnet34): a ResNet-34 U-Net, not the "
        "classic U-Net", _smp("Unet", "resnet34"), "segmentation_models_pytorch"),
    "smp_deeplabv3plus_r50": ReferenceSpec(
        "semantic", "segmentation_models_pytorch DeepLabV3Plus(resnet50), OS16, rates (12,24,36)",
        _smp("DeepLabV3Plus", "resnet50"), "segmentation_models_pytorch"),
    "smp_pspnet_r50": ReferenceSpec(
        "semantic", "segmentation_models_pytorch PSPNet(resnet50): encoder depth 3, no dilation",
        _smp("PSPNet", "resnet50"), "segmentation_models_pytorch"),
    "tv_maskrcnn_r50_fpn": ReferenceSpec(
        "instance", "torchvision maskrcnn_resnet50_fpn (BN, 2-fc box head, 4-conv mask head; "
        "not detectron2's config)", _tv_maskrcnn),
}


def reference_unavailable(name: str) -> Optional[str]:
    """None when reference ``name`` can be built here, else the reason (one line)."""
    if name == "plain_d2":
        return None
    if name not in REFERENCES:
        return f"unknown reference '{name}' (known: plain_d2, {', '.join(REFERENCES)})"
    needs = REFERENCES[name].needs
    if needs == "segmentation_models_pytorch" and not smp_available():
        return ("segmentation_models_pytorch is not installed (optional: pip install --no-deps "
                "segmentation-models-pytorch timm)")
    return None


def build_reference(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build reference ``name`` (a key of :data:`REFERENCES`) with random initialisation.

    ``kwargs``: ``base``/``depth`` (plain_unet), ``output_stride``/``atrous_rates``
    (tv_deeplabv3_r50), ``min_size``/``max_size`` (tv_maskrcnn_r50_fpn); others are ignored.
    Raises ValueError for an unknown name, RuntimeError when an optional package is missing.
    """
    why = reference_unavailable(name)
    if why is not None:
        raise (ValueError if name not in REFERENCES else RuntimeError)(why)
    return REFERENCES[name].build(num_classes, **kwargs)


def build_plain_detectron2(cfg) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """"Plain detectron2": detectron2's ``build_model`` and ``build_optimizer`` for ``cfg``,
    without d2seg's fast paths. Train it with detectron2's ``SimpleTrainer`` / ``AMPTrainer``.

    The same training as d2seg's: where the config asks for what detectron2's
    ``build_optimizer`` cannot give (``SOLVER.OPTIMIZER`` ADAM / ADAMW, e.g. SegFormer), torch's
    Adam / AdamW over detectron2's parameter groups (its default multi-tensor implementation);
    ``D2SEG.FINETUNE.FREEZE`` freezes the same parameters."""
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    model = build_model(cfg)
    freeze = list(cfg.D2SEG.FINETUNE.FREEZE) if "D2SEG" in cfg else []
    if freeze:
        from ..checkpoint import freeze_parameters

        freeze_parameters(model, freeze)
    name = str(cfg.SOLVER.get("OPTIMIZER", "SGD")).upper()
    if name == "SGD":
        return model, build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
    opt_cls = torch.optim.Adam if name == "ADAM" else torch.optim.AdamW
    return model, maybe_add_gradient_clipping(cfg, opt_cls)(
        params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
        weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True)


def reference_names() -> List[str]:
    """Every reference name, ``plain_d2`` included."""
    return ["plain_d2", *REFERENCES]
