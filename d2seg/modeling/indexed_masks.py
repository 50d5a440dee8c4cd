"""Mask R-CNN mask targets without per-proposal copies of full-image masks
(``D2SEG.SPEED.RCNN_INDEXED_MASKS``).

With ``INPUT.MASK_FORMAT: bitmask`` (RLE annotations, mask images), detectron2's ROI heads
give every sampled proposal its own copy of its ground-truth object's full-image mask
(``targets.gt_masks[matched_idxs[sampled]]``: 512 proposals x H x W per image), index them
again for the foreground proposals, and convert those to float32 to crop the targets with
ROIAlign. At batch 16 and 800x1216 that is about 8 GB of bool copies held from proposal
sampling until the mask loss, and 8 GB of float copies per step; the image itself has a few
objects.

:class:`IndexedBitMasks` is a ``BitMasks`` that stores the image's object masks once plus,
per row, the index of its object. Indexing composes indices; ``crop_and_resize`` runs
ROIAlign on the object masks with each proposal's object index as its batch index - the same
targets, element for element, as cropping the copied masks. Anything else that reads
``.tensor`` gets the copied masks as before. :func:`index_gt_masks` wraps the targets the
ROI heads receive (a forward pre-hook installed by :func:`make_mask_targets_indexed`);
polygon masks (detectron2's default format) are left alone.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from detectron2.layers import ROIAlign
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.structures import BitMasks, Instances

__all__ = ["IndexedBitMasks", "index_gt_masks", "make_mask_targets_indexed"]


class IndexedBitMasks(BitMasks):
    """``len(index)`` bit masks, row ``i`` being ``masks[index[i]]``, without copying them.

    Args:
        masks: (M, H, W) bool or uint8 object masks of one image.
        index: (N,) int64 indices into ``masks`` (on ``masks``' device).
    """

    def __init__(self, masks: Tensor, index: Tensor):  # noqa: super().__init__ would copy
        self._masks = masks
        self._index = index
        self.image_size = tuple(masks.shape[1:])

    @classmethod
    def of(cls, masks: BitMasks) -> "IndexedBitMasks":
        """The same masks as ``masks``, one row per object (no copy)."""
        t = masks.tensor
        return cls(t, torch.arange(t.shape[0], device=t.device))

    @property
    def tensor(self) -> Tensor:  # type: ignore[override]
        """(N, H, W): the rows materialised (a copy), for code that reads masks directly."""
        return self._masks[self._index]

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._masks.device

    def to(self, *args: Any, **kwargs: Any) -> "IndexedBitMasks":
        masks = self._masks.to(*args, **kwargs)
        return IndexedBitMasks(masks, self._index.to(device=masks.device))

    def __len__(self) -> int:
        return self._index.shape[0]

    def __getitem__(self, item: Union[int, slice, Tensor]) -> "IndexedBitMasks":
        if isinstance(item, int):
            return IndexedBitMasks(self._masks, self._index[item].reshape(1))
        index = self._index[item]
        assert index.dim() == 1, f"Indexing IndexedBitMasks with {item} gives {index.shape}"
        return IndexedBitMasks(self._masks, index)

    def __repr__(self) -> str:
        return (f"IndexedBitMasks(num_instances={len(self)}, objects={self._masks.shape[0]}, "
                f"image_size={self.image_size})")

    def crop_and_resize(self, boxes: Tensor, mask_size: int) -> Tensor:
        """Like ``BitMasks.crop_and_resize``: (N, 4) boxes -> (N, mask_size, mask_size) bool
        masks, ``mask_size`` samples of row ``i``'s mask inside ``boxes[i]``, thresholded at
        0.5. ROIAlign reads each box from its object's mask directly (same values)."""
        assert len(boxes) == len(self), f"{len(boxes)} != {len(self)}"
        device = self._masks.device
        rois = torch.cat([self._index.to(device=device, dtype=boxes.dtype)[:, None],
                          boxes.to(device=device)], dim=1)  # (N, 5): object index, box
        masks = self._masks.to(dtype=torch.float32)[:, None]
        out = ROIAlign((mask_size, mask_size), 1.0, 0, aligned=True).forward(masks, rois)
        return out.squeeze(1) >= 0.5

    @staticmethod
    def cat(masks_list: List["BitMasks"]) -> "BitMasks":  # type: ignore[override]
        return BitMasks.cat([BitMasks(m.tensor) for m in masks_list])


def index_gt_masks(targets: Optional[List[Instances]]) -> Optional[List[Instances]]:
    """Copies of ``targets`` whose ``gt_masks`` (exactly ``BitMasks``) are
    :class:`IndexedBitMasks`; other fields are shared. Polygon masks stay as they are."""
    if not targets:
        return targets
    out = []
    for t in targets:
        if t.has("gt_masks") and type(t.gt_masks) is BitMasks:
            new = Instances(t.image_size)
            for k, v in t.get_fields().items():
                new.set(k, IndexedBitMasks.of(v) if k == "gt_masks" else v)
            t = new
        out.append(t)
    return out


def _pre_hook(module: nn.Module, args: Tuple, kwargs: dict) -> Optional[Tuple[Tuple, dict]]:
    if not module.training:
        return None
    if "targets" in kwargs:
        kwargs = dict(kwargs, targets=index_gt_masks(kwargs["targets"]))
    elif len(args) >= 4:
        args = (*args[:3], index_gt_masks(args[3]), *args[4:])
    return args, kwargs


def make_mask_targets_indexed(model: nn.Module) -> int:
    """Install the target wrapping on every ``ROIHeads`` of ``model`` that has a mask head
    (``forward(images, features, proposals, targets)``). Returns how many; idempotent."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, ROIHeads) and getattr(mod, "mask_on", False) \
                and not getattr(mod, "_d2seg_indexed_masks", False):
            mod.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            mod._d2seg_indexed_masks = True
            n += 1
    return n
