"""detectron2's R-CNN ground-truth matching without host synchronisations, same results.

A Mask R-CNN R18-FPN training step at batch 16 waits for the GPU about 365 times (d2seg's
host-sync audit, ``tools/benchmark.py``'s ``host_syncs``; about 205 with these swaps), most of
them in detectron2's
per-image Python: each wait drains the device queue, and the GPU idles until the host has
queued the next kernels. Two of those places have a synchronisation-free form that gives
bit-identical results (same matches, labels and random sampling):

* :class:`SyncFreeMatcher` - ``Matcher.__call__`` assigns labels with boolean-mask writes
  (``labels[mask] = l``: a ``nonzero`` each) and asserts non-negative qualities (a read
  back); the low-quality rule indexes with ``nonzero``. Here: ``torch.where`` throughout; the
  assertion runs for CPU tensors only. (3-5 waits per matcher call, 2 calls per image.)
* :class:`SyncFreeBox2BoxTransform` - ``Box2BoxTransform.get_deltas`` asserts that the
  source boxes have positive widths (a read back, RPN and box-head losses: 2 per step); here
  only for CPU tensors (elsewhere a zero-width box gives non-finite deltas and losses, which
  d2seg's non-finite guard reports).
* :func:`sample_proposals` - ``ROIHeads._sample_proposals`` relabels background and ignored
  proposals with boolean-mask writes (2 waits per image); here with ``torch.where``. The
  sampling itself (``subsample_labels``) is detectron2's, unchanged.

The training statistics detectron2 logs have the same values read later
(:mod:`d2seg.utils.deferred_scalars`: d2seg's trainer reads them with the losses):

* :func:`log_classification_stats` - the box classifier's ``fast_rcnn/cls_accuracy``,
  ``fg_cls_accuracy`` and ``false_negative`` (detectron2: 6 waits, ``nonzero`` and boolean
  indexing), from 4 counts; swapped into ``FastRCNNOutputLayers.losses``;
* :func:`mask_rcnn_loss` - detectron2's mask loss (the same value) with
  ``mask_rcnn/accuracy``, ``false_positive`` and ``false_negative`` from 4 counts (detectron2:
  4 ``.item()``), and the class index on the logits' device (detectron2 builds it on the CPU:
  a host-to-device copy); swapped into ``BaseMaskRCNNHead`` heads.

And :func:`pooler_forward` - ``ROIPooler.forward`` (box and mask heads, training and
inference) builds the boxes' image index on the device (detectron2 copies the per-image box
counts to it and sizes a ``repeat_interleave`` from them: 1-2 waits) and finds each FPN
level's boxes from one stable sort by level and one read of the per-level counts
(detectron2: a ``nonzero`` per level). The same boxes reach the same level's ROIAlign in the
same order: bit-identical outputs and gradients, 1 wait per call instead of 5-6.

And :func:`grid_offsets` - detectron2's anchor generator makes each FPN level's grid of
anchor positions on the CPU and copies it to the device every forward pass (10 copies per
step for 5 levels, each a host wait on a GPU); here the grids are made on the device, with the
same values (multiples of half a stride: exact in float32).

:func:`make_sync_free` swaps them into a built model (``D2SEG.SPEED.RCNN_SYNC_FREE``, applied
by ``d2seg.engine.fast_paths.prepare_model``). What stays: sampling (``nonzero`` +
``randperm`` on value-dependent sizes), proposal filtering and NMS (value-dependent output
sizes).
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import cat
from detectron2.modeling import anchor_generator as d2_anchor
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.roi_heads import fast_rcnn as d2_fast_rcnn
from detectron2.modeling.roi_heads import mask_head as d2_mask_head
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.tracing import is_fx_tracing

from ..utils.deferred_scalars import put_scalars_later

__all__ = ["SyncFreeMatcher", "SyncFreeBox2BoxTransform", "sample_proposals",
           "log_classification_stats", "mask_rcnn_loss", "pooler_forward", "grid_offsets",
           "make_sync_free"]


class SyncFreeMatcher(Matcher):
    """:class:`detectron2.modeling.matcher.Matcher` with the same ``(matches, labels)`` and
    no host synchronisation on a GPU.

    ``__call__(match_quality_matrix)``: (M gt, N predictions) qualities >= 0 ->
    ``matches`` (N,) int64 index of the best gt, ``match_labels`` (N,) int8 from ``labels``
    by threshold interval (with ``allow_low_quality_matches``: 1 for every prediction that
    is some gt's best match, ties included).
    """

    @classmethod
    def from_matcher(cls, matcher: Matcher) -> "SyncFreeMatcher":
        """The same thresholds, labels and low-quality rule as ``matcher``."""
        return cls(list(matcher.thresholds[1:-1]), list(matcher.labels),
                   allow_low_quality_matches=matcher.allow_low_quality_matches)

    def __call__(self, match_quality_matrix: Tensor) -> Tuple[Tensor, Tensor]:
        q = match_quality_matrix
        assert q.dim() == 2
        if q.numel() == 0:  # shapes only: no synchronisation
            return super().__call__(q)
        if q.device.type == "cpu":  # free there; on a GPU it would wait for the device
            assert torch.all(q >= 0)
        matched_vals, matches = q.max(dim=0)
        labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
        for lab, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            inside = (matched_vals >= low) & (matched_vals < high)
            labels = torch.where(inside, lab, labels)  # a Python scalar: no host-to-device copy
        if self.allow_low_quality_matches:
            best_of_some_gt = (q == q.max(dim=1).values[:, None]).any(dim=0)
            labels = torch.where(best_of_some_gt, 1, labels)
        return matches, labels


class SyncFreeBox2BoxTransform(Box2BoxTransform):
    """:class:`detectron2.modeling.box_regression.Box2BoxTransform` whose ``get_deltas``
    checks the source boxes' widths for CPU tensors only (on a GPU the check waits for the
    device). Same deltas: (N, 4) source and target boxes (x0, y0, x1, y1) -> (N, 4)
    weighted (dx, dy, dw, dh)."""

    @classmethod
    def from_transform(cls, t: Box2BoxTransform) -> "SyncFreeBox2BoxTransform":
        return cls(t.weights, scale_clamp=t.scale_clamp)

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        if src_boxes.device.type == "cpu":  # free there
            return super().get_deltas(src_boxes, target_boxes)
        return self.deltas(src_boxes, target_boxes)

    def deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """detectron2's encoding, operation for operation, without the check."""
        src_w = src_boxes[:, 2] - src_boxes[:, 0]
        src_h = src_boxes[:, 3] - src_boxes[:, 1]
        src_x = src_boxes[:, 0] + 0.5 * src_w
        src_y = src_boxes[:, 1] + 0.5 * src_h
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0]
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1]
        tgt_x = target_boxes[:, 0] + 0.5 * tgt_w
        tgt_y = target_boxes[:, 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tgt_x - src_x) / src_w, wy * (tgt_y - src_y) / src_h,
                            ww * torch.log(tgt_w / src_w), wh * torch.log(tgt_h / src_h)),
                           dim=1)


def sample_proposals(self: ROIHeads, matched_idxs: Tensor, matched_labels: Tensor,
                     gt_classes: Tensor) -> Tuple[Tensor, Tensor]:
    """``ROIHeads._sample_proposals`` with the relabelling done by ``torch.where``.

    Returns (sampled proposal indices, their classes in [0, num_classes], num_classes being
    background), exactly as detectron2's."""
    if gt_classes.numel() > 0:
        gt_classes = gt_classes[matched_idxs]
        gt_classes = torch.where(matched_labels == 0, self.num_classes, gt_classes)
        gt_classes = torch.where(matched_labels == -1, -1, gt_classes)
    else:
        gt_classes = torch.zeros_like(matched_idxs) + self.num_classes
    fg, bg_idx = subsample_labels(gt_classes, self.batch_size_per_image,
                                  self.positive_fraction, self.num_classes)
    sampled = torch.cat([fg, bg_idx], dim=0)
    return sampled, gt_classes[sampled]


def log_classification_stats(pred_logits: Tensor, gt_classes: Tensor,
                             prefix: str = "fast_rcnn") -> None:
    """detectron2's ``_log_classification_stats`` without reading counts back mid-step.

    Args:
        pred_logits: (R, K + 1) class scores of R sampled proposals (K = background).
        gt_classes: (R,) their classes in [0, K].

    Logs ``<prefix>/cls_accuracy`` and, when some proposal is foreground, ``fg_cls_accuracy``
    and ``false_negative`` (foreground predicted as background): the same values."""
    num_instances = gt_classes.numel()
    if num_instances == 0:
        return
    pred = pred_logits.argmax(dim=1)
    bg = pred_logits.shape[1] - 1
    fg = (gt_classes >= 0) & (gt_classes < bg)
    right = pred == gt_classes
    counts = torch.stack([right.sum(), fg.sum(), (fg & right).sum(), (fg & (pred == bg)).sum()])

    def values(c: Sequence[float]) -> Dict[str, float]:
        num_right, num_fg, fg_right, false_neg = c
        out = {f"{prefix}/cls_accuracy": num_right / num_instances}
        if num_fg > 0:
            out[f"{prefix}/fg_cls_accuracy"] = fg_right / num_fg
            out[f"{prefix}/false_negative"] = false_neg / num_fg
        return out
    put_scalars_later(counts, values)


def mask_rcnn_loss(pred_mask_logits: Tensor, instances: List[Instances],
                   vis_period: int = 0) -> Tensor:
    """detectron2's ``mask_rcnn_loss`` (per-pixel binary cross-entropy against each
    proposal's ground-truth mask cropped to it, for the ground-truth class) with its logged
    accuracy, false positive and false negative rates read later.

    Args:
        pred_mask_logits: (B, C, M, M) mask logits (C = 1: class-agnostic) of the B
            foreground proposals of ``instances``, in order.
        instances: per image, the foreground proposals with ``proposal_boxes``,
            ``gt_classes`` and ``gt_masks``.
        vis_period: steps at which detectron2 also stores mask images; those steps run
            detectron2's own function.

    Returns the mean loss (0-dim); with no proposal, 0 connected to the logits."""
    if vis_period > 0 and get_event_storage().iter % vis_period == 0:
        return _D2_MASK_RCNN_LOSS(pred_mask_logits, instances, vis_period)
    agnostic = pred_mask_logits.size(1) == 1
    side = pred_mask_logits.size(2)
    assert side == pred_mask_logits.size(3), "Mask prediction must be square!"
    classes, masks = [], []
    for inst in instances:
        if len(inst) == 0:
            continue
        if not agnostic:
            classes.append(inst.gt_classes.to(dtype=torch.int64))
        masks.append(inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, side)
                     .to(device=pred_mask_logits.device))
    if not masks:
        return pred_mask_logits.sum() * 0
    gt = cat(masks, dim=0)
    if agnostic:
        logits = pred_mask_logits[:, 0]
    else:
        rows = torch.arange(pred_mask_logits.size(0), device=pred_mask_logits.device)
        logits = pred_mask_logits[rows, cat(classes, dim=0)]
    gt_bool = gt if gt.dtype == torch.bool else gt > 0.5
    gt = gt.to(dtype=torch.float32)
    wrong = (logits > 0.0) != gt_bool
    numel = wrong.numel()
    counts = torch.stack([wrong.sum(), gt_bool.sum(), (wrong & ~gt_bool).sum(),
                          (wrong & gt_bool).sum()])

    def values(c: Sequence[float]) -> Dict[str, float]:
        num_wrong, num_pos, false_pos, false_neg = c
        return {"mask_rcnn/accuracy": 1 - num_wrong / max(numel, 1.0),
                "mask_rcnn/false_positive": false_pos / max(numel - num_pos, 1.0),
                "mask_rcnn/false_negative": false_neg / max(num_pos, 1.0)}
    put_scalars_later(counts, values)
    return F.binary_cross_entropy_with_logits(logits, gt, reduction="mean")


_D2_MASK_RCNN_LOSS = d2_mask_head.mask_rcnn_loss


def _tracing() -> bool:
    """Under ``torch.jit.trace`` or FX (export): detectron2's trace-friendly code instead."""
    return torch.jit.is_tracing() or is_fx_tracing()


def pooler_forward(self: ROIPooler, x: List[Tensor], box_lists: List[Boxes]) -> Tensor:
    """``ROIPooler.forward`` with one host wait per call (see the module docstring).

    Args:
        x: the feature maps (N, C, H_l, W_l) of the pooler's levels.
        box_lists: N ``Boxes`` in image coordinates.

    Returns (M, C, S, S): the M boxes' pooled features, in the order of ``box_lists``.
    Rotated boxes and tracing run detectron2's forward."""
    if _tracing() or not all(type(b) is Boxes for b in box_lists):
        return ROIPooler.forward(self, x, box_lists)
    assert isinstance(x, list) and isinstance(box_lists, list), \
        "Arguments to pooler must be lists"
    assert len(x) == len(self.level_poolers), (
        f"unequal value, num_level_assignments={len(self.level_poolers)}, but x is list of "
        f"{len(x)} Tensors")
    assert len(box_lists) == x[0].size(0), (
        f"unequal value, x[0] batch dim 0 is {x[0].size(0)}, but box_list has length "
        f"{len(box_lists)}")
    if len(box_lists) == 0:
        return ROIPooler.forward(self, x, box_lists)
    boxes = torch.cat([b.tensor for b in box_lists], dim=0)
    image = torch.cat([torch.full((len(b),), float(i), dtype=boxes.dtype, device=boxes.device)
                       for i, b in enumerate(box_lists)])  # filled on the device: no copy
    rois = torch.cat([image[:, None], boxes], dim=1)
    if len(self.level_poolers) == 1:
        return self.level_poolers[0](x[0], rois)
    levels = assign_boxes_to_levels(box_lists, self.min_level, self.max_level,
                                    self.canonical_box_size, self.canonical_level)
    order = torch.argsort(levels, stable=True)  # within a level: ascending, as nonzero
    per_level = torch.arange(len(self.level_poolers), device=levels.device)
    # (bincount would size its output from the largest level: a wait of its own on a GPU)
    counts = (levels[None, :] == per_level[:, None]).sum(dim=1).tolist()  # the one wait
    out = torch.zeros((rois.shape[0], x[0].shape[1], *self.output_size), dtype=x[0].dtype,
                      device=x[0].device)
    start = 0
    for level, (pooler, n) in enumerate(zip(self.level_poolers, counts)):
        inds = order[start:start + n]
        start += n
        out.index_put_((inds,), pooler(x[level], rois[inds]))
    return out


def grid_offsets(size: Sequence[int], stride: int, offset: float,
                 target_device_tensor: Tensor) -> Tuple[Tensor, Tensor]:
    """detectron2's ``_create_grid_offsets`` made on ``target_device_tensor``'s device.

    Args:
        size: (H, W) of the feature map.
        stride: its stride in input pixels.
        offset: the anchor centres' offset, in strides.

    Returns (shift_x, shift_y): (H * W,) float32 each, row-major over the map."""
    height, width = size
    dev = target_device_tensor.device
    xs = torch.arange(offset * stride, width * stride, step=stride, dtype=torch.float32,
                      device=dev)
    ys = torch.arange(offset * stride, height * stride, step=stride, dtype=torch.float32,
                      device=dev)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    return shift_x.reshape(-1), shift_y.reshape(-1)


def _grid_anchors(self: d2_anchor.DefaultAnchorGenerator, grid_sizes: List[List[int]]):
    """``DefaultAnchorGenerator._grid_anchors`` with :func:`grid_offsets` (tracing: detectron2's,
    whose copy keeps the traced graph's device generic)."""
    if _tracing():
        return d2_anchor.DefaultAnchorGenerator._grid_anchors(self, grid_sizes)
    with _module_function(d2_anchor, "_create_grid_offsets", grid_offsets):
        return d2_anchor.DefaultAnchorGenerator._grid_anchors(self, grid_sizes)


@contextlib.contextmanager
def _module_function(module, name: str, fn) -> Iterator[None]:
    """``module.<name>`` is ``fn`` inside the block (how detectron2's heads look up their loss
    and logging functions)."""
    saved = getattr(module, name)
    setattr(module, name, fn)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _box_losses(self: d2_fast_rcnn.FastRCNNOutputLayers, predictions, proposals):
    """``FastRCNNOutputLayers.losses`` with :func:`log_classification_stats`."""
    with _module_function(d2_fast_rcnn, "_log_classification_stats", log_classification_stats):
        return d2_fast_rcnn.FastRCNNOutputLayers.losses(self, predictions, proposals)


def _mask_head_forward(self: d2_mask_head.BaseMaskRCNNHead, x, instances: List[Instances]):
    """``BaseMaskRCNNHead.forward`` with :func:`mask_rcnn_loss` in training."""
    if not self.training:
        return d2_mask_head.BaseMaskRCNNHead.forward(self, x, instances)
    with _module_function(d2_mask_head, "mask_rcnn_loss", mask_rcnn_loss):
        return d2_mask_head.BaseMaskRCNNHead.forward(self, x, instances)


# (detectron2 class, method, d2seg's replacement) for make_sync_free
_METHODS = ((ROIHeads, "_sample_proposals", sample_proposals),
            (d2_fast_rcnn.FastRCNNOutputLayers, "losses", _box_losses),
            (d2_mask_head.BaseMaskRCNNHead, "forward", _mask_head_forward),
            (ROIPooler, "forward", pooler_forward),
            (d2_anchor.DefaultAnchorGenerator, "_grid_anchors", _grid_anchors))


def make_sync_free(model: nn.Module) -> int:
    """Swap :class:`SyncFreeMatcher` for every ``Matcher`` held by a sub-module
    (``anchor_matcher``, ``proposal_matcher``, cascade ``proposal_matchers``),
    :class:`SyncFreeBox2BoxTransform` for every ``Box2BoxTransform``,
    :func:`sample_proposals` into every ``ROIHeads``, the read-later statistics into
    detectron2's box predictors (``FastRCNNOutputLayers.losses``) and mask heads
    (``BaseMaskRCNNHead.forward``) that use detectron2's own, :func:`pooler_forward` into
    every ``ROIPooler`` and :func:`grid_offsets` into every ``DefaultAnchorGenerator``.
    Returns how many were swapped."""
    swapped = 0
    for mod in model.modules():
        for name, value in list(vars(mod).items()):
            if type(value) is Matcher:
                setattr(mod, name, SyncFreeMatcher.from_matcher(value))
                swapped += 1
            elif type(value) is Box2BoxTransform:
                setattr(mod, name, SyncFreeBox2BoxTransform.from_transform(value))
                swapped += 1
            elif isinstance(value, list) and value and all(type(v) is Matcher for v in value):
                setattr(mod, name, [SyncFreeMatcher.from_matcher(v) for v in value])
                swapped += len(value)
        for cls, name, fn in _METHODS:
            # only where the module keeps detectron2's own method (not a subclass's)
            if isinstance(mod, cls) and getattr(type(mod), name) is getattr(cls, name):
                setattr(mod, name, types.MethodType(fn, mod))
                swapped += 1
    return swapped
