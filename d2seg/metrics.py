"""Standalone segmentation metrics for numpy arrays and torch tensors.

Binary masks (``iou``, ``dice``, ``boundary_iou``) are anything whose non-zero entries mark
the foreground: bool, integer or float arrays / tensors of the same shape (a leading batch
dimension is simply more pixels; use ``per_image=True`` for one score per image).

Empty cases, for two binary masks P (prediction) and G (ground truth):

* both empty: IoU = Dice = ``empty_score`` (default 1.0: nothing to find, nothing found);
* P empty, G not (or G empty, P not): IoU = Dice = 0.0.

Label maps (``confusion_matrix`` and what derives from it) hold class ids in ``[0, C)``;
pixels whose ground truth is ``ignore_label`` (or outside ``[0, C)``) are left out. From the
(dataset-wide) confusion matrix:

* a class with no ground-truth *and* no predicted pixel has IoU = Dice = NaN, and is left out
  of mIoU / mDice (``nanmean``); a class predicted but absent from the ground truth scores 0;
* pixel accuracy = correct / valid pixels; NaN when there is no valid pixel.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

try:  # torch is optional for the numpy functions
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = [
    "iou",
    "dice",
    "confusion_matrix",
    "per_class_iou",
    "per_class_dice",
    "mean_iou",
    "mean_dice",
    "pixel_accuracy",
    "boundary_mask",
    "boundary_iou",
    "boundary_counts",
    "class_boundary_counts",
    "segmentation_metrics",
    "surface_distances",
    "surface_distance_stats",
    "hausdorff95",
    "average_surface_distance",
]

ArrayLike = Union[np.ndarray, "torch.Tensor"]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_pair(pred: ArrayLike, target: ArrayLike):
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if torch is not None and isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        return pred != 0, target.to(pred.device) != 0, True
    return _to_numpy(pred) != 0, _to_numpy(target) != 0, False


def _overlap_score(pred, target, empty_score: float, per_image: bool, dice_score: bool):
    p, g, is_torch = _binary_pair(pred, target)
    if per_image:
        if p.ndim < 3:
            raise ValueError(f"per_image=True needs (N, H, W) masks, got shape {tuple(p.shape)}")
        dims = tuple(range(1, p.ndim))
    else:
        dims = None
    if is_torch:
        inter = (p & g).sum(dim=dims) if dims else (p & g).sum()
        sp = p.sum(dim=dims) if dims else p.sum()
        sg = g.sum(dim=dims) if dims else g.sum()
        inter, sp, sg = inter.double(), sp.double(), sg.double()
        den = (sp + sg) if dice_score else (sp + sg - inter)
        num = 2 * inter if dice_score else inter
        out = torch.where(den > 0, num / den.clamp_min(1), torch.full_like(den, empty_score))
        return float(out) if not per_image else out
    inter = np.logical_and(p, g).sum(axis=dims).astype(np.float64)
    sp = p.sum(axis=dims).astype(np.float64)
    sg = g.sum(axis=dims).astype(np.float64)
    den = (sp + sg) if dice_score else (sp + sg - inter)
    num = 2 * inter if dice_score else inter
    out = np.where(den > 0, num / np.maximum(den, 1), empty_score)
    return float(out) if not per_image else out


def iou(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0,
        per_image: bool = False) -> Union[float, ArrayLike]:
    """Intersection over union |P & G| / |P | G| of two binary masks.

    Args:
        pred, target: same-shape numpy arrays or torch tensors; non-zero = foreground.
        empty_score: the value when both masks are empty.
        per_image: masks are (N, ...): return one score per image (array / tensor of N).
    Returns:
        a float in [0, 1] (or N of them with ``per_image``). Prediction empty and target not
        (or the reverse): 0.0.
    """
    return _overlap_score(pred, target, empty_score, per_image, dice_score=False)


def dice(pred: ArrayLike, target: ArrayLike, *, empty_score: float = 1.0,
         per_image: bool = False) -> Union[float, ArrayLike]:
    """Dice coefficient 2 |P & G| / (|P| + |G|) of two binary masks (= F1 score).

    Same arguments and empty-case rules as :func:`iou`.
    """
    return _overlap_score(pred, target, empty_score, per_image, dice_score=True)


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int,
                     ignore_label: Optional[int] = 255) -> np.ndarray:
    """(C, C) int64 matrix, rows = ground-truth class, columns = predicted class.

    Pixels whose target is ``ignore_label`` or outside ``[0, C)`` are skipped; a prediction
    outside ``[0, C)`` on a valid pixel raises.
    """
    p = _to_numpy(pred).astype(np.int64, copy=False).ravel()
    g = _to_numpy(target).astype(np.int64, copy=False).ravel()
    if p.shape != g.shape:
        raise ValueError(f"pred has {p.size} pixels, target {g.size}")
    valid = (g >= 0) & (g < num_classes)
    if ignore_label is not None:
        valid &= g != ignore_label
    p, g = p[valid], g[valid]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted label outside [0, {num_classes}): {p.min()}..{p.max()}")
    return np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def _tp_fp_fn(cm: np.ndarray):
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU per class from a confusion matrix; NaN for a class neither present nor predicted."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tp / den, np.nan)


def per_class_dice(cm: np.ndarray) -> np.ndarray:
    """Dice per class from a confusion matrix; NaN for a class neither present nor predicted."""
    tp, fp, fn = _tp_fp_fn(cm)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def mean_iou(cm: np.ndarray) -> float:
    """Mean of :func:`per_class_iou` over the classes where it is defined (NaN if none)."""
    return _nanmean(per_class_iou(cm))


def mean_dice(cm: np.ndarray) -> float:
    """Mean of :func:`per_class_dice` over the classes where it is defined (NaN if none)."""
    return _nanmean(per_class_dice(cm))


def pixel_accuracy(cm: np.ndarray) -> float:
    """Correct pixels / valid pixels; NaN without valid pixels."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")


def boundary_mask(mask: ArrayLike, dilation: int) -> np.ndarray:
    """Pixels of a binary (H, W) mask within ``dilation`` pixels of its contour.

    The mask minus its erosion by a (2d+1)-square; the image border counts as background
    (padding with zeros), as in Boundary IoU (Cheng et al., CVPR 2021).
    """
    import cv2

    m = (_to_numpy(mask) != 0).astype(np.uint8)
    if m.ndim != 2:
        raise ValueError(f"boundary_mask takes an (H, W) mask, got shape {m.shape}")
    d = max(int(dilation), 1)
    padded = cv2.copyMakeBorder(m, d, d, d, d, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((2 * d + 1, 2 * d + 1), np.uint8))[d:-d, d:-d]
    return (m - eroded).astype(bool)


def _boundary_dilation(shape, dilation_ratio: float) -> int:
    h, w = shape[-2:]
    return max(1, int(round(dilation_ratio * np.sqrt(h * h + w * w))))


def boundary_counts(pred: ArrayLike, target: ArrayLike, *, dilation_ratio: float = 0.02
                    ) -> Tuple[int, int]:
    """(intersection, union) pixel counts of the boundary regions of two (H, W) binary masks."""
    p, g = _to_numpy(pred) != 0, _to_numpy(target) != 0
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {g.shape}")
    d = _boundary_dilation(p.shape, dilation_ratio)
    bp, bg = boundary_mask(p, d), boundary_mask(g, d)
    return int(np.logical_and(bp, bg).sum()), int(np.logical_or(bp, bg).sum())


def _label_boundary(labels: np.ndarray, dilation: int, sentinel: int) -> np.ndarray:
    """Pixels whose (2d+1)-square window, the image padded with ``sentinel``, holds more than
    one label: for a pixel of class c, exactly ``boundary_mask(labels == c, d)``."""
    import cv2

    d = max(int(dilation), 1)
    padded = cv2.copyMakeBorder(labels, d, d, d, d, cv2.BORDER_CONSTANT, value=sentinel)
    k = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    return cv2.erode(padded, k)[d:-d, d:-d] != cv2.dilate(padded, k)[d:-d, d:-d]


def class_boundary_counts(pred: ArrayLike, target: ArrayLike, num_classes: int,
                          ignore_label: Optional[int] = 255, *, dilation: Optional[int] = None,
                          dilation_ratio: float = 0.02) -> Tuple[np.ndarray, np.ndarray]:
    """Boundary IoU's (intersection, union) pixel counts for every class of two (H, W) label
    maps: two (C,) int64 arrays.

    For class c: the boundary regions ``boundary_mask(pred == c, d)`` and
    ``boundary_mask(target == c, d)``, counted on the valid pixels only (target in
    ``[0, C)`` and not ``ignore_label``, as :func:`confusion_matrix`). The same counts as those
    two calls per class, from one erosion and one dilation of each label map instead of two
    erosions per class (a pixel is inside its class's mask, away from the contour, exactly
    when its window holds one label). ``d``: ``dilation``, or ``dilation_ratio`` x the image
    diagonal (at least 1 pixel).
    """
    p = _to_numpy(pred).astype(np.int64, copy=False)
    g = _to_numpy(target).astype(np.int64, copy=False)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"two (H, W) label maps expected, got {p.shape} and {g.shape}")
    c = int(num_classes)
    if c > 65535:
        raise ValueError(f"num_classes={c}: at most 65535 classes")
    valid = (g >= 0) & (g < c)
    if ignore_label is not None:
        valid &= g != ignore_label
    # OpenCV morphology on the smallest unsigned type with a value no class uses
    dt, sentinel = (np.uint8, 255) if c <= 255 else (np.uint16, 65535)
    p_map = p.astype(dt)
    if p.size and (p.min() < 0 or p.max() >= c):  # allowed on ignored pixels only
        inside = (p >= 0) & (p < c)
        if not inside[valid].all():
            raise ValueError(f"predicted label outside [0, {c}) on a valid pixel")
        p_map[~inside] = sentinel
    g_map = g.astype(dt)
    g_map[~valid] = sentinel
    d = dilation if dilation is not None else _boundary_dilation(p.shape, dilation_ratio)
    bp = _label_boundary(p_map, d, sentinel) & valid
    bg = _label_boundary(g_map, d, sentinel) & valid
    n_p = np.bincount(p[bp], minlength=c)
    n_g = np.bincount(g[bg], minlength=c)
    both = bp & bg & (p == g)
    inter = np.bincount(p[both], minlength=c)
    return inter, n_p + n_g - inter


def boundary_iou(pred: ArrayLike, target: ArrayLike, *, dilation_ratio: float = 0.02,
                 empty_score: float = 1.0) -> float:
    """Boundary IoU of two (H, W) binary masks (Cheng et al., 2021).

    IoU of the two masks' boundary regions: pixels within d = ``dilation_ratio`` x image
    diagonal (at least 1 pixel) of each contour, inside the mask. Empty cases as :func:`iou`.
    """
    inter, union = boundary_counts(pred, target, dilation_ratio=dilation_ratio)
    return inter / union if union > 0 else float(empty_score)


def _surface(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a background 4-neighbour (outside the image counts as
    background): MONAI's ``get_mask_edges`` (scipy's erosion with its default cross)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_distances(pred: ArrayLike, target: ArrayLike, spacing: Sequence[float]
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(distances from pred's surface pixels to target's surface, target's to pred's); both
    empty when both masks are empty, ``[inf]`` each when exactly one is."""
    from scipy import ndimage

    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p, t = _to_numpy(pred) != 0, _to_numpy(target) != 0
    if p.ndim != 2:
        raise ValueError(f"surface distances take (H, W) masks, got shape {p.shape}")
    sp, st = _surface(p), _surface(t)
    if not sp.any() and not st.any():
        return np.zeros(0), np.zeros(0)
    if not sp.any() or not st.any():
        return np.array([np.inf]), np.array([np.inf])
    to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_t[sp], to_p[st]


def surface_distances(pred: ArrayLike, target: ArrayLike,
                      spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """The symmetric surface distances of two (H, W) binary masks: for every surface pixel of
    each mask (a pixel of the mask with a background 4-neighbour; outside the image counts as
    background, as in MONAI), the Euclidean distance to the other mask's surface, in units of
    ``spacing`` (row, column; default pixels).

    Returns:
        1-D float64 array of the distances (both directions), empty when both masks are empty;
        ``[inf, inf]`` when exactly one is (no surface to reach).
    """
    return np.concatenate(_directed_distances(pred, target, spacing))


def surface_distance_stats(pred: ArrayLike, target: ArrayLike,
                           spacing: Sequence[float] = (1.0, 1.0),
                           empty_score: float = 0.0) -> Tuple[float, float]:
    """(HD95, ASSD) of two (H, W) binary masks from one pair of distance transforms:
    :func:`hausdorff95` and :func:`average_surface_distance`."""
    a, b = _directed_distances(pred, target, spacing)
    if not a.size:
        return float(empty_score), float(empty_score)
    if np.isinf(a).any():
        return float("inf"), float("inf")
    hd95 = max(float(np.percentile(a, 95)), float(np.percentile(b, 95)))
    return hd95, float(np.concatenate([a, b]).mean())


def hausdorff95(pred: ArrayLike, target: ArrayLike, spacing: Sequence[float] = (1.0, 1.0),
                empty_score: float = 0.0) -> float:
    """95 % Hausdorff distance as MONAI's ``compute_hausdorff_distance(percentile=95)``: the
    larger of the two directed 95th percentiles of :func:`surface_distances` (medpy's ``hd95``
    pools both directions instead, which can be lower); ``empty_score`` when both masks are
    empty, ``inf`` when exactly one is."""
    return surface_distance_stats(pred, target, spacing, empty_score)[0]


def average_surface_distance(pred: ArrayLike, target: ArrayLike,
                             spacing: Sequence[float] = (1.0, 1.0),
                             empty_score: float = 0.0) -> float:
    """Average symmetric surface distance (ASSD, MONAI's symmetric average surface distance):
    the mean of :func:`surface_distances`; ``empty_score`` when both masks are empty, ``inf``
    when exactly one is."""
    return surface_distance_stats(pred, target, spacing, empty_score)[1]


def segmentation_metrics(cm: np.ndarray, class_names: Optional[Sequence[str]] = None
                         ) -> Dict[str, float]:
    """Flat dict of fractions from a confusion matrix: mIoU, mDice, pACC, IoU-<c>, Dice-<c>."""
    n = np.asarray(cm).shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    ious, dices = per_class_iou(cm), per_class_dice(cm)
    out = {"mIoU": mean_iou(cm), "mDice": mean_dice(cm), "pACC": pixel_accuracy(cm)}
    for name, i, d in zip(names, ious, dices):
        out[f"IoU-{name}"] = float(i)
        out[f"Dice-{name}"] = float(d)
    return out
