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
* :func:`sample_proposals` - ``ROIHeads._sample_proposals`` relabels background and ignored
  proposals with boolean-mask writes (2 waits per image); here with ``torch.where``. The
  sampling itself (``subsample_labels``) is detectron2's, unchanged.

:func:`make_sync_free` swaps them into a built model (``D2SEG.SPEED.RCNN_SYNC_FREE``, applied
by ``d2seg.engine.fast_paths.prepare_model``). What stays: sampling (``nonzero`` +
``randperm`` on value-dependent sizes), proposal filtering and NMS (value-dependent output
sizes), detectron2's logging reads.
"""
from __future__ import annotations

import types
from typing import Tuple

import torch
from torch import Tensor, nn

from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.sampling import subsample_labels

__all__ = ["SyncFreeMatcher", "sample_proposals", "make_sync_free"]


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


def make_sync_free(model: nn.Module) -> int:
    """Swap :class:`SyncFreeMatcher` for every ``Matcher`` held by a sub-module
    (``anchor_matcher``, ``proposal_matcher``, cascade ``proposal_matchers``) and
    :func:`sample_proposals` into every ``ROIHeads``. Returns how many were swapped."""
    swapped = 0
    for mod in model.modules():
        for name, value in list(vars(mod).items()):
            if type(value) is Matcher:
                setattr(mod, name, SyncFreeMatcher.from_matcher(value))
                swapped += 1
            elif isinstance(value, list) and value and all(type(v) is Matcher for v in value):
                setattr(mod, name, [SyncFreeMatcher.from_matcher(v) for v in value])
                swapped += len(value)
        if isinstance(mod, ROIHeads) and \
                type(mod)._sample_proposals is ROIHeads._sample_proposals:
            mod._sample_proposals = types.MethodType(sample_proposals, mod)
            swapped += 1
    return swapped
