"""Semantic segmentation losses: soft Dice, Focal, Tversky, class-weighted cross-entropy.

Every function takes raw ``logits`` and integer ``targets``:

* multi-class: ``logits`` (N, C, H, W) with C >= 2, softmax over C; ``targets`` (N, H, W)
  long with values in ``[0, C)`` or ``ignore_index``;
* binary: ``logits`` (N, 1, H, W) (or (N, H, W)), sigmoid; ``targets`` (N, H, W) with 1 for
  foreground, 0 for background, or ``ignore_index``.

Pixels equal to ``ignore_index`` contribute nothing (neither to numerators nor denominators).
Each function returns a scalar tensor. Region losses (Dice, Tversky) pool the counts over the
batch and the pixels of each class ("batch Dice"), then average over classes.

No function reads a value back to the host on a GPU (no ``.item()``, ``bool(tensor)`` or
boolean-mask indexing, each of which waits for the device): ignored pixels are masked by
multiplication, and the range of the target values is checked only for CPU tensors. On a GPU,
:func:`check_targets` does that check (one synchronisation); ``EncoderDecoderSegmentor`` runs
it on its first training batch and ``D2SEG.DATASETS.CHECK`` checks every label map before
training.

:class:`SemSegLoss` combines named losses with weights, as chosen in
``cfg.MODEL.SEM_SEG_LOSS`` (e.g. CE+Dice, BCE+Dice, Focal+Dice, Tversky).
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.logger import log_first_n

__all__ = [
    "soft_dice_loss",
    "tversky_loss",
    "focal_loss",
    "cross_entropy_loss",
    "check_targets",
    "TargetValueError",
    "SemSegLoss",
    "LOSS_NAMES",
]

LOSS_NAMES = ("CE", "BCE", "Dice", "Focal", "Tversky")


def _binary_logits(logits: Tensor) -> Tensor:
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"binary logits must have 1 channel, got shape {tuple(logits.shape)}")
        logits = logits[:, 0]
    return logits


def _is_binary(logits: Tensor) -> bool:
    return logits.dim() == 3 or logits.shape[1] == 1


def _check_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """``targets`` as (N, H, W); an (N, 1, H, W) target (segmentation_models_pytorch's binary
    mask shape) loses its channel dimension. Any other shape is an error naming both."""
    if targets.dim() == 4 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if (targets.dim() != 3 or targets.shape[-2:] != logits.shape[-2:]
            or targets.shape[0] != logits.shape[0]):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}: targets are (N, H, W) (or (N, 1, H, W)) class ids at the "
            f"logits' N, H and W"
        )
    return targets


class TargetValueError(ValueError):
    """A label value outside the model's classes (the training step adds the batch's files)."""


def check_targets(targets: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise :class:`TargetValueError` (a ``ValueError``) naming a target value the model
    cannot have predicted.

    ``num_classes`` >= 2 (multi-class): valid values are ``[0, num_classes)`` and
    ``ignore_index``; ``num_classes`` = 1 (binary, one channel): 0, 1 and ``ignore_index``.
    Reads one flag back from the device (a synchronisation on a GPU), and the offending value
    only when there is one.
    """
    c = max(int(num_classes), 2)
    bad = (targets != ignore_index) & ((targets >= c) | (targets < 0))
    if bool(bad.any()):
        value = targets[bad][0].item()
        if num_classes == 1:
            raise TargetValueError(f"binary (one-channel) logits need targets 0, 1 or the ignore value "
                             f"{ignore_index}; got {value} (set MODEL.SEM_SEG_HEAD.NUM_CLASSES "
                             f">= 2 for classes)")
        raise TargetValueError(f"target value {value} is outside [0, {c}) and not ignore_index "
                         f"({ignore_index})")


def _host_check(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Shape check always; value check only where it costs no device synchronisation.
    Returns the targets as (N, H, W)."""
    targets = _check_targets(logits, targets)
    if targets.device.type == "cpu":
        check_targets(targets, 1 if _is_binary(logits) else logits.shape[1], ignore_index)
    return targets


def _probs_and_onehot(logits: Tensor, targets: Tensor, ignore_index: int):
    """(probs, onehot, valid) as (N, K, H, W), (N, K, H, W), (N, 1, H, W) float tensors; the
    one-hot is 0 at ignored pixels.

    K = C for multi-class (softmax) and K = 1 for binary (sigmoid, the foreground channel).
    """
    targets = _host_check(logits, targets, ignore_index)
    valid = (targets != ignore_index).unsqueeze(1)
    safe = targets.unsqueeze(1).masked_fill(~valid, 0).long()
    mask = valid.float()
    if _is_binary(logits):
        probs = torch.sigmoid(_binary_logits(logits).float()).unsqueeze(1)
        onehot = (safe == 1).float() * mask
    else:
        # out-of-range values on a GPU: scatter_'s device-side index assert
        probs = F.softmax(logits.float(), dim=1)
        # (N, C, H, W) float one-hot of the valid pixels written directly (F.one_hot makes an
        # int64 (N, H, W, C) tensor that then needs a permuted float copy)
        onehot = torch.zeros_like(probs).scatter_(1, safe, mask)
    return probs, onehot, mask


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(values * weights) / sum(weights); 0 (with a zero gradient) when the weights sum
    to 0. No host synchronisation."""
    den = weights.sum()
    return (values * weights).sum() / den.clamp_min(torch.finfo(den.dtype).tiny)


def _region_index(tp: Tensor, fp: Tensor, fn: Tensor, a: float, b: float, smooth: float) -> Tensor:
    """Per-class Tversky index (TP + s) / (TP + a FP + b FN + s); 1 for a class with no
    predicted and no true pixel (0/0)."""
    num = tp + smooth
    den = tp + a * fp + b * fn + smooth
    empty = den <= 0
    return torch.where(empty, torch.ones_like(num), num / den.clamp_min(1e-12))


def _counts(logits: Tensor, targets: Tensor, ignore_index: int, classes: Optional[Sequence[int]]):
    probs, onehot, valid = _probs_and_onehot(logits, targets, ignore_index)
    probs = probs * valid  # the one-hot is 0 at ignored pixels already
    dims = (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    # FP = sum p (1 - y) = sum p - TP and FN = sum (1 - p) y = sum y - TP: no more full-size
    # temporaries (and their backward) than TP's
    fp = probs.sum(dims) - tp
    fn = onehot.sum(dims) - tp
    if classes is not None:
        idx = torch.as_tensor(list(classes), device=tp.device, dtype=torch.long)
        tp, fp, fn = tp[idx], fp[idx], fn[idx]
    return tp, fp, fn


def soft_dice_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    classes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Soft Dice loss ``1 - mean_c (2 TP_c + s) / (2 TP_c + FP_c + FN_c + s)``.

    ``TP_c = sum p_c y_c``, ``FP_c = sum p_c (1 - y_c)``, ``FN_c = sum (1 - p_c) y_c`` over the
    batch's valid pixels, with p the softmax (multi-class) or sigmoid (binary, one channel:
    only the foreground Dice) probabilities and y the one-hot targets.

    Args:
        logits: (N, C, H, W) or binary (N, 1, H, W) raw scores.
        targets: (N, H, W) integer class ids (binary: 0/1; (N, 1, H, W) is taken too),
            ``ignore_index`` ignored.
        smooth: added to numerator and denominator. With ``smooth > 0`` a class absent from
            the targets scores about 1 while little probability falls on it; with
            ``smooth = 0`` it scores 0 as soon as any probability falls on it (only an exact
            0 / 0 scores 1).
        classes: multi-class only: average over these class ids instead of all.
    Returns:
        scalar tensor in [0, 1].
    """
    tp, fp, fn = _counts(logits, targets, ignore_index, classes)
    dice = _region_index(2 * tp, fp, fn, 1.0, 1.0, smooth)
    return 1.0 - dice.mean()


def tversky_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    ignore_index: int = 255,
    smooth: float = 1.0,
    classes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Tversky loss ``1 - mean_c (TP_c + s) / (TP_c + alpha FP_c + beta FN_c + s)``.

    ``alpha`` weighs false positives and ``beta`` false negatives; ``alpha = beta = 0.5`` is
    the soft Dice loss (with Dice's smoothing ``2 * smooth``). Shapes and counts as in
    :func:`soft_dice_loss`.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"Tversky alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    tp, fp, fn = _counts(logits, targets, ignore_index, classes)
    return 1.0 - _region_index(tp, fp, fn, alpha, beta, smooth).mean()


def _focal_factor(q: Tensor, gamma: float) -> Tensor:
    """``q ** gamma`` for ``q = 1 - p_t`` in [0, 1], with a finite gradient at q = 0 also for
    gamma < 1 (where ``q ** gamma``'s derivative is infinite and times 0 gives NaN)."""
    if gamma == 0:
        return torch.ones_like(q)
    q = q.clamp(0.0, 1.0)
    tiny = torch.finfo(q.dtype).tiny
    return torch.where(q > 0, q.clamp_min(tiny) ** gamma, torch.zeros_like(q))


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma: float = 2.0,
    alpha: Union[None, float, Sequence[float]] = None,
    ignore_index: int = 255,
) -> Tensor:
    """Focal loss, averaged over valid pixels.

    * binary (one channel): ``torchvision.ops.sigmoid_focal_loss``'s definition with ``alpha``
      (a float in [0, 1] weighting positives, ``1 - alpha`` negatives; None or < 0 = no
      weighting);
    * multi-class: ``-alpha_y (1 - p_y)^gamma log p_y`` with p the softmax; ``alpha`` None
      (all 1), one float per class, or one float (or a list of one): with 2 classes (a
      softmax over background and foreground) the foreground's weight and ``1 - alpha`` the
      background's, as in the binary case; with more classes a factor on every class; < 0 =
      no weighting.

    ``gamma = 0`` and no alpha gives the (binary) cross-entropy. Gradients stay finite for
    any ``gamma >= 0``, also with saturated logits; ignored pixels get zero gradients.

    Returns:
        scalar tensor; 0 when no pixel is valid.
    """
    targets = _host_check(logits, targets, ignore_index)
    valid = targets != ignore_index
    w = valid.float()
    if _is_binary(logits):
        x = _binary_logits(logits).float()
        y = (targets == 1).float()
        if isinstance(alpha, (list, tuple)):
            if len(alpha) != 1:
                raise ValueError(f"binary focal loss takes one alpha, got {list(alpha)}")
            alpha = alpha[0]
        # torchvision's sigmoid_focal_loss, with a modulating factor whose gradient stays
        # finite where 1 - p_t is 0 (gamma < 1 with saturated logits gave NaN gradients), and
        # ignored pixels' logits zeroed so that they cannot poison the gradient
        x = torch.where(valid, x, torch.zeros_like(x))
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        loss = ce * _focal_factor(torch.sigmoid(torch.where(y > 0, -x, x)), gamma)
        if alpha is not None and float(alpha) >= 0:
            a = float(alpha)
            loss = loss * (a * y + (1.0 - a) * (1.0 - y))
        return _masked_mean(loss, w)
    c = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=1)
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -_focal_factor(-torch.expm1(logp_t), gamma) * logp_t
    if isinstance(alpha, (list, tuple)) and len(alpha) == 1:  # [a]: as the float a
        alpha = alpha[0]
    if isinstance(alpha, (int, float)) and alpha < 0:  # < 0: no weighting, as binary
        alpha = None
    if isinstance(alpha, (int, float)) and c == 2:  # [background, foreground]: as binary
        alpha = [1.0 - float(alpha), float(alpha)]
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            loss = loss * float(alpha)
        else:
            if len(alpha) != c:
                raise ValueError(f"focal alpha has {len(alpha)} values for {c} classes: "
                                 f"{list(alpha)}")
            a = torch.as_tensor(list(alpha), dtype=loss.dtype, device=loss.device)
            loss = loss * a[safe]
    return _masked_mean(loss, w)


def _hardest_mean(loss: Tensor, weight: Tensor, top_k: float) -> Tensor:
    """``sum(loss * weight) / sum(weight)`` over all pixels (``top_k`` >= 1), or over the
    ``int(top_k * numel)`` pixels with the largest ``loss * weight`` (hard pixel mining, as
    detectron2's ``DeepLabCE``; pixels of weight 0, i.e. ignored, are never among them). The
    pixel count comes from the shape: no host synchronisation."""
    if top_k >= 1.0:
        return _masked_mean(loss, weight)
    loss, weight = loss.reshape(-1), weight.reshape(-1)
    k = max(1, int(top_k * loss.numel()))
    score = torch.where(weight > 0, loss * weight, torch.full_like(loss, -1.0))
    idx = score.topk(k, sorted=False).indices
    return _masked_mean(loss[idx], weight[idx])


def cross_entropy_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    class_weights: Optional[Sequence[float]] = None,
    ignore_index: int = 255,
    top_k: float = 1.0,
) -> Tensor:
    """Class-weighted cross-entropy, averaged over valid pixels.

    * multi-class: ``F.cross_entropy(weight=class_weights)`` (the weighted mean
      ``sum w_y (-log p_y) / sum w_y``, as PyTorch defines it);
    * binary: ``F.binary_cross_entropy_with_logits`` with per-pixel weight
      ``class_weights[target]`` (``class_weights = [w_background, w_foreground]``), normalised
      the same way (weighted mean).

    ``top_k`` in (0, 1): hard pixel mining (OHEM): the mean over only the ``top_k`` fraction
    of the batch's pixels with the largest (weighted) loss, as detectron2's DeepLab heads do
    with ``MODEL.SEM_SEG_HEAD.LOSS_TYPE "hard_pixel_mining"``; ignored pixels never count.

    Returns:
        scalar tensor; 0 when no pixel is valid.
    """
    if not 0.0 < float(top_k) <= 1.0:
        raise ValueError(f"cross-entropy top_k (MODEL.SEM_SEG_HEAD.LOSS_TOP_K) must be in "
                         f"(0, 1], got {top_k}")
    targets = _host_check(logits, targets, ignore_index)
    valid = targets != ignore_index
    if _is_binary(logits):
        x = _binary_logits(logits).float()
        y = (targets == 1).float()
        w = valid.float()
        if class_weights is not None and len(class_weights) > 0:
            if len(class_weights) != 2:
                raise ValueError(f"binary cross-entropy takes 2 class weights [background, "
                                 f"foreground], got {list(class_weights)}")
            w = w * torch.where(y > 0.5, float(class_weights[1]), float(class_weights[0]))
        return _hardest_mean(F.binary_cross_entropy_with_logits(x, y, reduction="none"), w,
                             top_k)
    weighted = class_weights is not None and len(class_weights) > 0
    if not weighted and top_k >= 1.0:  # one fused kernel, no per-pixel temporaries
        return (F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index,
                                reduction="sum")
                / valid.sum().clamp_min(1).to(torch.float32))
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    w = valid.float()
    if weighted:
        if len(class_weights) != logits.shape[1]:
            raise ValueError(f"{len(class_weights)} class weights for {logits.shape[1]} classes: "
                             f"{list(class_weights)}")
        weight = torch.as_tensor(list(class_weights), dtype=torch.float32, device=logits.device)
        w = w * weight[safe]
    # the weighted mean F.cross_entropy(weight=..., reduction="mean") computes, with 0 (not
    # 0/0 = NaN) when every pixel is ignored
    return _hardest_mean(F.cross_entropy(logits.float(), safe, reduction="none"), w, top_k)


def _log_once(level: int, msg: str) -> None:
    """Log ``msg`` once per process (the loss is built at config load and with the model)."""
    log_first_n(level, msg, n=1, name=__name__, key="message")


class SemSegLoss(nn.Module):
    """Weighted sum of named losses; returns one entry per loss so each is logged.

    ``forward(logits, targets)`` with logits (N, C, H, W) (C = 1: binary) and targets
    (N, H, W) at the same resolution returns ``{f"{prefix}_{name.lower()}": weight * loss}``.
    """

    @configurable
    def __init__(
        self,
        *,
        names: Sequence[str] = ("CE",),
        weights: Optional[Sequence[float]] = None,
        ignore_index: int = 255,
        class_weights: Optional[Sequence[float]] = None,
        smooth: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: Union[None, float, Sequence[float]] = None,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        top_k: float = 1.0,
        loss_weight: float = 1.0,
        prefix: str = "loss_sem_seg",
    ):
        """
        Args:
            names: losses among ``LOSS_NAMES`` ("CE", "BCE", "Dice", "Focal", "Tversky").
            weights: one per name (default all 1).
            ignore_index: target value ignored by every loss.
            class_weights: for "CE"/"BCE" (see :func:`cross_entropy_loss`).
            smooth: Dice/Tversky smoothing.
            focal_gamma, focal_alpha: see :func:`focal_loss`.
            tversky_alpha, tversky_beta: see :func:`tversky_loss`.
            top_k: "CE"/"BCE" average only this fraction of hardest pixels (hard pixel
                mining, see :func:`cross_entropy_loss`); 1 = all.
            loss_weight: multiplies every term (``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``).
            prefix: key prefix of the returned dict.
        """
        super().__init__()
        names = [names] if isinstance(names, str) else list(names)
        if isinstance(weights, (int, float)):
            weights = [weights]
        if not names:
            raise ValueError("MODEL.SEM_SEG_LOSS.NAMES is empty: name at least one loss")
        canon = {n.lower(): n for n in LOSS_NAMES}
        for n in names:
            if n.lower() not in canon:
                raise ValueError(f"MODEL.SEM_SEG_LOSS.NAMES: unknown loss '{n}'; choose from "
                                 f"{list(LOSS_NAMES)}")
        if len({n.lower() for n in names}) != len(names):
            raise ValueError(f"MODEL.SEM_SEG_LOSS.NAMES has duplicates: {names}")
        if {"ce", "bce"} <= {n.lower() for n in names}:
            raise ValueError(f"MODEL.SEM_SEG_LOSS.NAMES {names}: 'CE' and 'BCE' are the same "
                             "loss on one output channel (and 'BCE' needs one); name only one")
        weights = [1.0] * len(names) if weights is None or len(weights) == 0 else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"MODEL.SEM_SEG_LOSS.WEIGHTS {weights} must have one value per "
                             f"name in MODEL.SEM_SEG_LOSS.NAMES {names}")
        self.names: List[str] = [canon[n.lower()] for n in names]
        self.weights = [float(w) for w in weights]
        self.ignore_index = ignore_index
        self.class_weights = list(class_weights) if class_weights else None
        self.smooth = smooth
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.tversky_alpha = tversky_alpha
        self.tversky_beta = tversky_beta
        if not 0.0 < float(top_k) <= 1.0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_TOP_K must be in (0, 1], got {top_k}")
        self.top_k = float(top_k)
        self.loss_weight = loss_weight
        self.prefix = prefix

    @classmethod
    def from_config(cls, cfg, prefix: str = "loss_sem_seg"):
        args = cls.config_args(cfg, prefix)
        alpha, k = list(cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA), int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        if len(alpha) == 1 and k == 2:
            _log_once(logging.INFO, f"MODEL.SEM_SEG_LOSS.FOCAL_ALPHA {alpha} with 2 classes: "
                                    f"focal weights [{1.0 - alpha[0]:g}, {alpha[0]:g}] "
                                    f"(background, foreground), as for one sigmoid channel")
        elif len(alpha) == 1 and k > 2:
            _log_once(logging.WARNING, f"MODEL.SEM_SEG_LOSS.FOCAL_ALPHA {alpha} with {k} "
                                       f"classes scales every class's focal term alike; give "
                                       f"one value per class to weigh the classes")
        c, names = cfg.MODEL.SEM_SEG_LOSS, {n.lower() for n in cfg.MODEL.SEM_SEG_LOSS.NAMES}
        unused = [(key, given) for key, given, users in (
            ("CLASS_WEIGHTS", list(c.CLASS_WEIGHTS), ("ce", "bce")),
            ("FOCAL_ALPHA", list(c.FOCAL_ALPHA), ("focal",)),
            ("TVERSKY_ALPHA / TVERSKY_BETA", [c.TVERSKY_ALPHA, c.TVERSKY_BETA]
             if (c.TVERSKY_ALPHA, c.TVERSKY_BETA) != (0.3, 0.7) else [], ("tversky",)),
            ("LOSS_TYPE", [cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE]
             if cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE == "hard_pixel_mining" else [], ("ce", "bce")),
        ) if given and not names & set(users)]
        for key, given in unused:
            where = "MODEL.SEM_SEG_HEAD" if key == "LOSS_TYPE" else "MODEL.SEM_SEG_LOSS"
            _log_once(logging.WARNING, f"{where}.{key} {given} has no effect: no "
                                       f"loss in MODEL.SEM_SEG_LOSS.NAMES {list(c.NAMES)} uses "
                                       f"it")
        return args

    @classmethod
    def config_args(cls, cfg, prefix: str = "loss_sem_seg") -> Dict[str, object]:
        """The constructor's arguments for ``cfg`` (``from_config`` without its log lines).

        Raises:
            ValueError: lengths that do not fit ``NUM_CLASSES`` (CLASS_WEIGHTS, FOCAL_ALPHA),
                'BCE' with more than one output channel.
        """
        c = cfg.MODEL.SEM_SEG_LOSS
        alpha = list(c.FOCAL_ALPHA)
        # lengths checked when the model is built, not at the first forward
        k = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        n_cw = 2 if k == 1 else k
        if c.CLASS_WEIGHTS and len(c.CLASS_WEIGHTS) != n_cw:
            raise ValueError(f"MODEL.SEM_SEG_LOSS.CLASS_WEIGHTS {list(c.CLASS_WEIGHTS)} needs "
                             f"{n_cw} values ({'[background, foreground] for ' if k == 1 else ''}"
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {k}), got {len(c.CLASS_WEIGHTS)}")
        if len(alpha) > 1 and (k == 1 or len(alpha) != k):
            raise ValueError(f"MODEL.SEM_SEG_LOSS.FOCAL_ALPHA {alpha} needs one value (the "
                             f"foreground's weight, with NUM_CLASSES 1 or 2) or one per class: "
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {k}")
        if len(alpha) == 1 and k == 2:  # softmax over [background, foreground]: as binary
            alpha = [1.0 - alpha[0], alpha[0]]
        loss_type = cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE
        if loss_type not in ("cross_entropy", "hard_pixel_mining"):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}: d2seg's models take "
                             f"'cross_entropy' (every pixel) or 'hard_pixel_mining' (CE / BCE "
                             f"over the MODEL.SEM_SEG_HEAD.LOSS_TOP_K hardest pixels)")
        top_k = float(cfg.MODEL.SEM_SEG_HEAD.LOSS_TOP_K) if loss_type == "hard_pixel_mining" else 1.0
        if any(n.lower() == "bce" for n in c.NAMES) and k != 1:
            raise ValueError(f"MODEL.SEM_SEG_LOSS.NAMES {list(c.NAMES)}: 'BCE' needs one output "
                             f"channel (MODEL.SEM_SEG_HEAD.NUM_CLASSES 1), NUM_CLASSES is {k}; "
                             f"use 'CE' with {k} classes")
        return {
            "names": list(c.NAMES),
            "weights": list(c.WEIGHTS),
            "ignore_index": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "class_weights": list(c.CLASS_WEIGHTS),
            "smooth": c.SMOOTH,
            "focal_gamma": c.FOCAL_GAMMA,
            "focal_alpha": None if not alpha else (alpha[0] if len(alpha) == 1 else alpha),
            "tversky_alpha": c.TVERSKY_ALPHA,
            "tversky_beta": c.TVERSKY_BETA,
            "top_k": top_k,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "prefix": prefix,
        }

    def extra_repr(self) -> str:
        terms = ", ".join(f"{w} * {n}" for n, w in zip(self.names, self.weights))
        return terms + (f", hardest {self.top_k:g} of pixels for CE" if self.top_k < 1 else "")

    def derived(self, weight_factor: float = 1.0, prefix: Optional[str] = None) -> "SemSegLoss":
        """A copy with every setting of this one, ``loss_weight`` times ``weight_factor`` and
        the keys under ``prefix`` (e.g. an auxiliary head's losses)."""
        new = copy.deepcopy(self)
        new.loss_weight = self.loss_weight * float(weight_factor)
        if prefix is not None:
            new.prefix = prefix
        return new

    def forward(self, logits: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """logits (N, C, H, W), targets (N, H, W) -> dict of weighted scalar losses."""
        binary = _is_binary(logits)
        out: Dict[str, Tensor] = {}
        for name, w in zip(self.names, self.weights):
            if name in ("CE", "BCE"):
                if name == "BCE" and not binary:
                    raise ValueError(
                        "MODEL.SEM_SEG_LOSS.NAMES: 'BCE' needs one output channel "
                        f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1), got {logits.shape[1]}; use 'CE'"
                    )
                loss = cross_entropy_loss(logits, targets, class_weights=self.class_weights,
                                          ignore_index=self.ignore_index, top_k=self.top_k)
            elif name == "Dice":
                loss = soft_dice_loss(logits, targets, ignore_index=self.ignore_index,
                                      smooth=self.smooth)
            elif name == "Focal":
                loss = focal_loss(logits, targets, gamma=self.focal_gamma, alpha=self.focal_alpha,
                                  ignore_index=self.ignore_index)
            else:  # Tversky
                loss = tversky_loss(logits, targets, alpha=self.tversky_alpha,
                                    beta=self.tversky_beta, ignore_index=self.ignore_index,
                                    smooth=self.smooth)
            out[f"{self.prefix}_{name.lower()}"] = loss * (w * self.loss_weight)
        return out
