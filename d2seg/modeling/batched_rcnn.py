"""R-CNN proposals and training targets for the whole batch at once
(``D2SEG.SPEED.RCNN_BATCHED``).

detectron2 selects the RPN's proposals and labels and samples the RPN's anchors and the ROI
heads' proposals one image at a time: per image finite-value and box checks that read values
back, a box-IoU matrix, a matcher, two ``nonzero`` + ``randperm`` samplings, box encoding,
field indexing, and (mask head) a ``nonzero`` to select the foreground. Done for the batch
here, a Mask R-CNN step at batch 16 has 2,900 device operations instead of 5,800 and 41 host
waits instead of 369 (counted on the CPU; ``docs/benchmarks.md``). On a GPU they run after the first wait, when the device has
caught up with the host, so every one of them costs its host-side launch time while the device
idles.

Here the same work is done for all images together, with ground truth and proposals padded to
the batch's largest count:

* proposals: the same boxes as ``find_top_rpn_proposals`` (checks, clipping and the small-box
  filter for the batch, one host read; the per-image NMS is detectron2's, run for several
  images at once on a multi-threaded CPU);
* matching: the same IoU values, matches and labels as detectron2's ``Matcher`` (padding never
  wins a match; the low-quality rule ignores it);
* sampling: the same numbers of foreground and background samples per image as
  ``subsample_labels`` (``min(#fg, fraction x size)``, then ``min(#bg, size - that)``), each a
  uniformly random subset of its candidates as there - drawn as the top-k of random keys, so
  the random draws differ from detectron2's ``randperm``: same distribution, not the same
  samples for a seed;
* the RPN losses: the same sums over the sampled anchors, computed with masks instead of
  boolean indexing (no host wait; float sums in another order);
* the ROI heads: one host read of the per-image sample counts (instead of two per image); each
  image's samples are its foreground first, so the mask head takes the first ``num_fg`` rows
  instead of a ``nonzero`` per image.

:func:`make_batched` swaps these into a built model (plain detectron2 ``RPN`` and
``StandardROIHeads`` / its subclasses that keep detectron2's sampling); anything else is left
to detectron2. ``D2SEG.SPEED.RCNN_BATCHED: off`` gives detectron2's per-image code
and its exact random stream.
"""
from __future__ import annotations

import math
import types
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import (ROIHeads, StandardROIHeads,
                                                     select_foreground_proposals)
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import smooth_l1_loss

from ..utils.deferred_scalars import put_scalars_later
from ..utils.threads import chunk_bounds, run_in_parallel

__all__ = ["batched_pairwise_iou", "batched_match", "sample_subsets", "rpn_label_and_sample",
           "rpn_losses", "find_top_proposals", "rpn_predict_proposals",
           "roi_label_and_sample", "roi_forward_mask", "make_batched"]

# elements of one (images, gt, boxes) IoU block; larger batches are matched in chunks of images
_IOU_BLOCK = 1 << 25
# the objectness logit detectron2 gives appended ground-truth boxes (P(object) ~ 1), computed
# as in detectron2's add_ground_truth_to_proposals_single_image
_GT_LOGIT = math.log((1.0 - 1e-10) / (1 - (1.0 - 1e-10)))


def batched_pairwise_iou(gt: Tensor, boxes: Tensor) -> Tensor:
    """IoU of (B, G, 4) boxes with (B, N, 4) or (N, 4) boxes (XYXY) -> (B, G, N).

    The same operations, element for element, as ``detectron2.structures.pairwise_iou``
    (0 where boxes do not intersect); all-zero padding boxes have IoU 0 with everything."""
    if boxes.dim() == 2:
        boxes = boxes[None]
    g = gt[:, :, None, :]  # (B, G, 1, 4)
    b = boxes[:, None, :, :]  # (B, 1, N, 4)
    wh = torch.min(g[..., 2:], b[..., 2:]) - torch.max(g[..., :2], b[..., :2])
    wh.clamp_(min=0)
    inter = wh.prod(dim=3)
    area_g = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    union = area_g[:, :, None] + area_b[:, None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros(1, dtype=inter.dtype,
                                                             device=inter.device))


def batched_match(matcher: Matcher, quality: Tensor, gt_valid: Tensor) -> Tuple[Tensor, Tensor]:
    """``matcher``'s rule for a batch: ``quality`` (B, G, N) with ``gt_valid`` (B, G) marking
    real (not padding) ground truth -> ``matches`` (B, N) int64 (best gt; 0 where an image has
    none), ``labels`` (B, N) int8 from ``matcher.labels`` by ``matcher.thresholds``.

    Per image the same as ``matcher(quality[b, :num_gt])`` (detectron2's ``Matcher`` and
    d2seg's ``SyncFreeMatcher``), as long as padding rows hold qualities no larger than the
    real ones' minimum (0 for IoU): padding comes after the real rows, and ``max`` returns the
    first of equal values."""
    vals, matches = quality.max(dim=1)
    labels = matches.new_full(matches.shape, 1, dtype=torch.int8)
    for lab, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels = torch.where((vals >= low) & (vals < high), lab, labels)
    if matcher.allow_low_quality_matches:
        best = quality == quality.max(dim=2, keepdim=True).values
        best = (best & gt_valid[:, :, None]).any(dim=1)
        labels = torch.where(best, 1, labels)
    return matches, labels


def sample_subsets(candidates: Tensor, counts: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """A uniformly random subset of ``counts[b]`` of row ``b``'s ``candidates`` (B, N) bool, for
    every row at once: (B, k') indices (k' = min(k, N); in random order) and (B, k') bool,
    True for the first ``counts[b]`` (the subset; ``counts`` must not exceed a row's number of
    candidates or ``k``). The subset is the top ``counts[b]`` of i.i.d. uniform keys, which is
    uniform over the subsets of that size - the distribution of detectron2's ``randperm``
    draw, not its samples."""
    keys = torch.rand(candidates.shape, device=candidates.device, dtype=torch.float64)
    keys = torch.where(candidates, keys, -1.0)
    k = min(int(k), candidates.shape[1])
    idx = keys.topk(k, dim=1, sorted=True).indices
    taken = torch.arange(k, device=candidates.device)[None, :] < counts[:, None]
    return idx, taken


def _subsample(labels: Tensor, valid: Tensor, bg_label: int, size: int,
               fraction: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``subsample_labels`` for (B, N) ``labels`` (-1 = ignore, ``bg_label`` = background, any
    other = foreground; ``valid`` False = padding): foreground (indices, taken, count) and
    background (indices, taken, count)."""
    fg = (labels != -1) & (labels != bg_label) & valid
    bg = (labels == bg_label) & valid
    max_fg = int(size * fraction)
    num_fg = fg.sum(dim=1).clamp(max=max_fg)
    num_bg = torch.minimum(bg.sum(dim=1), size - num_fg)
    fg_idx, fg_taken = sample_subsets(fg, num_fg, max_fg)
    bg_idx, bg_taken = sample_subsets(bg, num_bg, size)
    return fg_idx, fg_taken, num_fg, bg_idx, bg_taken, num_bg


def _padded(tensors: Sequence[Tensor], like: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Zero-padded stack of (n_b, ...) tensors -> (B, M, ...), (B, M) validity, M (at least 1)."""
    counts = [t.shape[0] for t in tensors]
    m = max(counts + [1])
    out = torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)
    if out.shape[1] < m:  # every tensor empty
        out = out.new_zeros((len(tensors), m) + tuple(out.shape[2:]))
    valid = torch.arange(m, device=like.device)[None, :] < \
        torch.as_tensor(counts).to(like.device, non_blocking=True)[:, None]
    return out, valid, m


def _match_in_chunks(matcher: Matcher, gt: Tensor, gt_valid: Tensor,
                     boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`batched_match` of :func:`batched_pairwise_iou`, a few images at a time so that
    the IoU block stays under ``_IOU_BLOCK`` elements."""
    b, g = gt.shape[:2]
    n = boxes.shape[-2]
    step = max(1, _IOU_BLOCK // max(1, g * n))
    out = []
    for s in range(0, b, step):
        bx = boxes if boxes.dim() == 2 else boxes[s:s + step]
        out.append(batched_match(matcher, batched_pairwise_iou(gt[s:s + step], bx),
                                 gt_valid[s:s + step]))
    if len(out) == 1:
        return out[0]
    return torch.cat([m for m, _ in out]), torch.cat([lab for _, lab in out])


# ------------------------------------------------------------------------------------------
# RPN
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def rpn_label_and_sample(self: RPN, anchors: List[Boxes],
                         gt_instances: List[Instances]) -> Tuple[List[Tensor], List[Tensor]]:
    """``RPN.label_and_sample_anchors`` for all images at once.

    Returns, as detectron2: per image (R,) int8 labels (1 = sampled positive, 0 = sampled
    negative, -1 = not sampled or ignored; R = all levels' anchors) and (R, 4) matched gt
    boxes (meaningful where the label is 1)."""
    anchors_t = Boxes.cat(anchors).tensor
    gt, gt_valid, _ = _padded([x.gt_boxes.tensor for x in gt_instances], anchors_t)
    matches, labels = _match_in_chunks(self.anchor_matcher, gt, gt_valid, anchors_t)
    valid = torch.ones_like(labels, dtype=torch.bool)
    fg_idx, fg_taken, _, bg_idx, bg_taken, _ = _subsample(
        labels, valid, 0, self.batch_size_per_image, self.positive_fraction)
    pos = torch.zeros_like(valid).scatter_(1, fg_idx, fg_taken)
    neg = torch.zeros_like(valid).scatter_(1, bg_idx, bg_taken)
    out = torch.where(pos, 1, torch.where(neg, 0, -1)).to(torch.int8)
    boxes = gt.gather(1, matches[:, :, None].expand(-1, -1, 4))
    return list(out.unbind(0)), list(boxes.unbind(0))


def rpn_losses(self: RPN, anchors: List[Boxes], pred_objectness_logits: List[Tensor],
               gt_labels: List[Tensor], pred_anchor_deltas: List[Tensor],
               gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
    """``RPN.losses`` (smooth-L1 box loss) without boolean indexing: the same sums over the
    sampled anchors as masked sums, the deltas of all images in one ``get_deltas`` call, the
    logged anchor counts read with the losses (``d2seg.utils.deferred_scalars``; detectron2:
    two host reads). Returns ``loss_rpn_cls`` and ``loss_rpn_loc`` (scalars)."""
    num_images = len(gt_labels)
    labels = torch.stack(gt_labels)  # (B, R)
    pos = labels == 1
    valid = labels >= 0
    put_scalars_later(torch.stack([pos.sum(), (labels == 0).sum()]),
                      lambda c: {"rpn/num_pos_anchors": c[0] / num_images,
                                 "rpn/num_neg_anchors": c[1] / num_images})

    anchors_t = Boxes.cat(anchors).tensor
    boxes = torch.stack(gt_boxes)  # (B, R, 4)
    # where a box is not positive its deltas are not used; give it the anchor itself (finite)
    boxes = torch.where(pos[..., None], boxes, anchors_t[None])
    src = anchors_t[None].expand_as(boxes).reshape(-1, 4)
    deltas = self.box2box_transform.get_deltas(src, boxes.reshape(-1, 4)).view_as(boxes)
    pred = torch.cat(pred_anchor_deltas, dim=1)
    loc = smooth_l1_loss(pred, deltas, beta=self.smooth_l1_beta, reduction="none")
    loc = (loc * pos[..., None].to(loc.dtype)).sum()
    logits = torch.cat(pred_objectness_logits, dim=1)
    cls = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(torch.float32),
                                             weight=valid.to(torch.float32), reduction="sum")
    normalizer = self.batch_size_per_image * num_images
    losses = {"loss_rpn_cls": cls / normalizer, "loss_rpn_loc": loc / normalizer}
    return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}


@torch.no_grad()
def find_top_proposals(proposals: List[Tensor], pred_objectness_logits: List[Tensor],
                       image_sizes: List[Tuple[int, int]], nms_thresh: float,
                       pre_nms_topk: int, post_nms_topk: int, min_box_size: float,
                       training: bool) -> List[Instances]:
    """detectron2's ``find_top_rpn_proposals`` with the checks, clipping and small-box filter
    done for all images together: the same proposals, in the same order.

    ``proposals``: per level (B, Hi*Wi*A, 4); ``pred_objectness_logits``: per level
    (B, Hi*Wi*A). Returns per image ``Instances`` with ``proposal_boxes`` and
    ``objectness_logits``, at most ``post_nms_topk``, by descending score. One host read for
    the whole batch (finite values, boxes kept per image) and one ``nonzero`` when a box is
    filtered, instead of three reads per image; the per-image NMS is detectron2's."""
    num_images = len(image_sizes)
    dev = proposals[0].device
    batch_idx = torch.arange(num_images, device=dev)
    scores, boxes, levels = [], [], []
    for level, (props, logits) in enumerate(zip(proposals, pred_objectness_logits)):
        k = min(logits.shape[1], pre_nms_topk)
        top_scores, top_idx = logits.topk(k, dim=1)
        boxes.append(props[batch_idx[:, None], top_idx])
        scores.append(top_scores)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=dev))
    scores, boxes, levels = torch.cat(scores, dim=1), torch.cat(boxes, dim=1), torch.cat(levels)
    finite = torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    hw = torch.as_tensor(image_sizes, dtype=boxes.dtype).to(dev, non_blocking=True)
    h, w = hw[:, 0:1], hw[:, 1:2]
    zero = torch.zeros((), dtype=boxes.dtype, device=dev)
    x1 = torch.clamp(boxes[..., 0], min=zero, max=w)
    y1 = torch.clamp(boxes[..., 1], min=zero, max=h)
    x2 = torch.clamp(boxes[..., 2], min=zero, max=w)
    y2 = torch.clamp(boxes[..., 3], min=zero, max=h)
    boxes = torch.stack((x1, y1, x2, y2), dim=-1)
    keep = ((x2 - x1) > min_box_size) & ((y2 - y1) > min_box_size)
    stats = torch.cat([finite.all().view(1).to(torch.int64), keep.sum(dim=1)]).tolist()
    if not stats[0]:
        if training:
            raise FloatingPointError(
                "Predicted boxes or scores contain Inf/NaN. Training has diverged.")
        from detectron2.modeling.proposal_generator.proposal_utils import \
            find_top_rpn_proposals
        return find_top_rpn_proposals(proposals, pred_objectness_logits, image_sizes,
                                      nms_thresh, pre_nms_topk, post_nms_topk, min_box_size,
                                      training)
    kept = stats[1:]
    n = boxes.shape[1]
    if all(c == n for c in kept):
        per_image = [(boxes[i], scores[i], levels) for i in range(num_images)]
    else:  # one nonzero for the batch; each image's boxes in their order
        flat = keep.view(-1).nonzero().squeeze(1)
        b_sel = boxes.view(-1, 4)[flat].split(kept)
        s_sel = scores.view(-1)[flat].split(kept)
        l_sel = levels.repeat(num_images)[flat].split(kept)
        per_image = list(zip(b_sel, s_sel, l_sel))
    results = []
    for (b, sc, lv), k, size in zip(per_image, _nms_per_image(per_image, nms_thresh,
                                                               post_nms_topk), image_sizes):
        res = Instances(size)
        res.proposal_boxes = Boxes(b[k])
        res.objectness_logits = sc[k]
        results.append(res)
    return results


def _nms_per_image(per_image: List[Tuple[Tensor, Tensor, Tensor]], nms_thresh: float,
                   topk: int) -> List[Tensor]:
    """detectron2's ``batched_nms`` (per level) of each image's (boxes, scores, levels), the
    first ``topk`` kept indices each. On a CPU with several intra-op threads the images are
    split into one run of consecutive images per thread and the runs go at once:
    torchvision's CPU ``nms`` runs on one core. The same kept indices either way (each
    image's NMS is unchanged)."""

    def nms(part: Sequence[Tuple[Tensor, Tensor, Tensor]]) -> List[Tensor]:
        return [batched_nms(b, sc, lv, nms_thresh)[:topk] for b, sc, lv in part]

    n, threads = len(per_image), torch.get_num_threads()
    if n < 2 or threads < 2 or per_image[0][0].device.type != "cpu":
        return nms(per_image)
    parts = [per_image[a:b] for a, b in chunk_bounds(n, min(threads, n))]
    return [k for out in run_in_parallel([lambda p=p: nms(p) for p in parts]) for k in out]


def rpn_predict_proposals(self: RPN, anchors: List[Boxes], pred_objectness_logits: List[Tensor],
                          pred_anchor_deltas: List[Tensor],
                          image_sizes: List[Tuple[int, int]]) -> List[Instances]:
    """``RPN.predict_proposals`` through :func:`find_top_proposals` (same proposals;
    detectron2's own code while tracing for export)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return RPN.predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas,
                                     image_sizes)
    with torch.no_grad():
        pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
        return find_top_proposals(pred_proposals, pred_objectness_logits, image_sizes,
                                  self.nms_thresh, self.pre_nms_topk[self.training],
                                  self.post_nms_topk[self.training], self.min_box_size,
                                  self.training)


# ------------------------------------------------------------------------------------------
# ROI heads
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def roi_label_and_sample(self: ROIHeads, proposals: List[Instances],
                         targets: List[Instances]) -> List[Instances]:
    """``ROIHeads.label_and_sample_proposals`` for all images at once.

    Returns per image ``Instances`` with ``proposal_boxes``, ``objectness_logits``,
    ``gt_classes`` (``num_classes`` = background) and every ``gt_*`` field of the targets for
    the matched object (images with ground truth), as detectron2 - each image's foreground
    samples first (their number is kept as ``_d2seg_num_fg`` for :func:`roi_forward_mask`).
    With ``proposal_append_gt`` the ground-truth boxes are candidates too."""
    if any(set(p.get_fields()) - {"proposal_boxes", "objectness_logits"} for p in proposals):
        # proposals with more fields: detectron2's per-image code keeps them all
        return ROIHeads.label_and_sample_proposals(self, proposals, targets)
    dev = proposals[0].proposal_boxes.tensor.device
    like = proposals[0].proposal_boxes.tensor
    boxes = [p.proposal_boxes.tensor for p in proposals]
    logits = [p.objectness_logits for p in proposals]
    if self.proposal_append_gt:
        boxes = [torch.cat([b, t.gt_boxes.tensor.to(b.dtype)]) for b, t in zip(boxes, targets)]
        gt_logits = [_GT_LOGIT * torch.ones(len(t), device=lg.device)
                     for lg, t in zip(logits, targets)]
        # dtype promoted as detectron2's Instances.cat does
        logits = [torch.cat([lg, g]) for lg, g in zip(logits, gt_logits)]
    cand, cand_valid, n = _padded(boxes, like)
    cand_logits = _padded(logits, like)[0]
    gt, gt_valid, _ = _padded([t.gt_boxes.tensor for t in targets], like)
    gt_cls = _padded([t.gt_classes for t in targets], like)[0]
    matches, mlabels = _match_in_chunks(self.proposal_matcher, gt, gt_valid, cand)
    classes = gt_cls.gather(1, matches)
    classes = torch.where(mlabels == 0, self.num_classes, classes)
    classes = torch.where(mlabels == -1, -1, classes)
    fg_idx, fg_taken, num_fg, bg_idx, bg_taken, num_bg = _subsample(
        classes, cand_valid, self.num_classes, self.batch_size_per_image,
        self.positive_fraction)
    counts = torch.stack([num_fg, num_bg]).tolist()  # the one host wait
    offsets = torch.arange(len(proposals), device=dev)[:, None] * n
    flat_fg, flat_bg = (fg_idx + offsets).view(-1), (bg_idx + offsets).view(-1)
    kf, kb = fg_idx.shape[1], bg_idx.shape[1]
    picks = []
    for i, (nf, nb) in enumerate(zip(*counts)):
        picks.append(flat_fg[i * kf:i * kf + nf])
        picks.append(flat_bg[i * kb:i * kb + nb])
    flat = torch.cat(picks)
    sizes = [nf + nb for nf, nb in zip(*counts)]
    sel_boxes = cand.view(-1, 4)[flat].split(sizes)
    sel_logits = cand_logits.view(-1)[flat].split(sizes)
    sel_classes = classes.view(-1)[flat].split(sizes)
    sel_matches = matches.view(-1)[flat].split(sizes)

    out = []
    for i, (p, t) in enumerate(zip(proposals, targets)):
        inst = Instances(p.image_size)
        inst.proposal_boxes = Boxes(sel_boxes[i])
        inst.objectness_logits = sel_logits[i]
        inst.gt_classes = sel_classes[i]
        if len(t) > 0:
            for name, value in t.get_fields().items():
                if name.startswith("gt_") and not inst.has(name):
                    inst.set(name, value[sel_matches[i]])
        inst._d2seg_num_fg = counts[0][i]
        out.append(inst)
    storage = get_event_storage()
    storage.put_scalar("roi_head/num_fg_samples", sum(counts[0]) / len(counts[0]))
    storage.put_scalar("roi_head/num_bg_samples", sum(counts[1]) / len(counts[1]))
    return out


def roi_forward_mask(self: StandardROIHeads, features: Dict[str, Tensor],
                     instances: List[Instances]):
    """``StandardROIHeads._forward_mask``; in training, proposals sampled by
    :func:`roi_label_and_sample` give their foreground as their first rows (no ``nonzero``).
    Returns the mask losses in training, the instances with ``pred_masks`` in inference."""
    if not self.mask_on:
        return {} if self.training else instances
    if self.training:
        if all(hasattr(x, "_d2seg_num_fg") for x in instances):
            instances = [x[:x._d2seg_num_fg] for x in instances]
        else:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
    if self.mask_pooler is not None:
        feats = [features[f] for f in self.mask_in_features]
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        feats = self.mask_pooler(feats, boxes)
    else:
        feats = {f: features[f] for f in self.mask_in_features}
    return self.mask_head(feats, instances)


def _plain_matcher(m) -> bool:
    from .sync_free_rcnn import SyncFreeMatcher

    return type(m) in (Matcher, SyncFreeMatcher)


def make_batched(model: nn.Module) -> int:
    """Swap the batched target code into every plain detectron2 ``RPN`` (anchors inside the
    image not required, smooth-L1 box loss) and every ``ROIHeads`` whose sampling is
    detectron2's (single matcher), and the mask-head foreground selection into
    ``StandardROIHeads`` that keep detectron2's ``_forward_mask``. Returns how many methods
    were swapped."""
    swapped = 0
    for mod in model.modules():
        if type(mod) is RPN and mod.anchor_boundary_thresh < 0 and \
                _plain_matcher(mod.anchor_matcher) and mod.box_reg_loss_type == "smooth_l1" \
                and mod.anchor_generator.box_dim == 4:
            mod.label_and_sample_anchors = types.MethodType(rpn_label_and_sample, mod)
            mod.losses = types.MethodType(rpn_losses, mod)
            mod.predict_proposals = types.MethodType(rpn_predict_proposals, mod)
            swapped += 3
        if isinstance(mod, ROIHeads) and _plain_matcher(getattr(mod, "proposal_matcher", None)) \
                and type(mod).label_and_sample_proposals is ROIHeads.label_and_sample_proposals:
            mod.label_and_sample_proposals = types.MethodType(roi_label_and_sample, mod)
            swapped += 1
            if isinstance(mod, StandardROIHeads) and \
                    type(mod)._forward_mask is StandardROIHeads._forward_mask:
                mod._forward_mask = types.MethodType(roi_forward_mask, mod)
                swapped += 1
    return swapped
