"""One shared-memory block per training sample (``D2SEG.SPEED.PACK_SAMPLES``).

A data-loader worker hands each mapped sample to the training process through shared memory,
one block per tensor storage. With PyTorch's default sharing strategy on Linux
("file_descriptor") each block costs the receiving process a socket connection to the worker,
an authentication handshake and a file-descriptor transfer: measured on 2 CPU cores, about
0.5 ms of the training process's CPU per tensor, plus waits for the worker, which answers
only when its mapper lets go of the GIL. A semantic sample has two tensors ("image",
"sem_seg"); an instance sample three or four ("image", and the ``Instances``' boxes, classes,
bit masks).

:func:`pack_sample` copies every tensor of a mapped sample into one buffer and replaces it by a
view of that buffer, with the same dtype, shape and values: the sample then crosses the
process boundary as one block. :class:`PackedMapper` applies it after a mapper, in the
workers.

Where the workers assemble whole batches (``DATALOADER.ASPECT_RATIO_GROUPING: False``, as in
d2seg's semantic configs: detectron2 then collates each batch in a worker instead of grouping
single samples in the training process), :func:`pack_batch` goes one step further: every
tensor of the batch in one buffer, one block per batch (:class:`PackedBatchCollator`, the
loader's ``collate_fn``).
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

__all__ = ["pack_sample", "pack_batch", "PackedMapper", "PackedBatchCollator"]

_ALIGN = 64  # bytes: every view starts on a cache line (and any dtype's alignment)


def _slots(sample: Any) -> List[Tuple[Any, Any, torch.Tensor]]:
    """(container, key, tensor) for every packable tensor of a mapped sample: the dict's
    tensor values, the tensor fields of an ``Instances`` in it, and the ``tensor`` of its
    ``Boxes`` / ``BitMasks`` fields. Key ``None`` = the container's ``tensor`` attribute."""
    out: List[Tuple[Any, Any, torch.Tensor]] = []

    def visit_fields(inst) -> None:
        for name, v in inst.get_fields().items():
            if isinstance(v, torch.Tensor):
                out.append((inst, name, v))
            elif isinstance(getattr(v, "tensor", None), torch.Tensor):
                out.append((v, None, v.tensor))

    if isinstance(sample, dict):
        for k, v in sample.items():
            if isinstance(v, torch.Tensor):
                out.append((sample, k, v))
            elif hasattr(v, "get_fields"):
                visit_fields(v)
    return out


def _pack(slots: List[Tuple[Any, Any, torch.Tensor]]) -> None:
    """Replace each slot's tensor by a view of one new buffer holding all their values."""
    slots = [s for s in slots if s[2].numel() > 0 and s[2].device.type == "cpu"]
    if len(slots) < 2 or len({t.untyped_storage().data_ptr() for _, _, t in slots}) == 1:
        return  # nothing to gain, or already one block
    offsets, total = [], 0
    for _, _, t in slots:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    buf = torch.empty(total, dtype=torch.uint8)
    for (owner, key, t), off in zip(slots, offsets):
        n = t.numel() * t.element_size()
        view = buf[off:off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        if key is None:
            owner.tensor = view
        elif isinstance(owner, dict):
            owner[key] = view
        else:  # Instances
            owner.set(key, view)


def pack_sample(sample: Any) -> Any:
    """Make the tensors of ``sample`` (a mapped dataset dict) views of one uint8 buffer.

    Packed: the dict's tensor values ("image", "sem_seg", ...) and the tensors of an
    ``Instances`` value (its tensor fields, ``Boxes.tensor``, ``BitMasks.tensor``). Each view
    has the original dtype, shape and values, and is contiguous. Empty tensors and tensors
    not on the CPU are left alone; a sample with fewer than two packable tensors, or whose
    tensors already share one storage, is returned unchanged. Modifies ``sample`` in place
    and returns it.
    """
    _pack(_slots(sample))  # (d2seg's semantic mapper's samples are one block already)
    return sample


def pack_batch(batch: List[Any]) -> List[Any]:
    """Make the tensors of every sample of ``batch`` (a list of mapped dataset dicts) views of
    one uint8 buffer, as :func:`pack_sample` does for one sample: the batch then crosses the
    process boundary as one shared-memory block. Modifies the samples in place and returns
    ``batch``."""
    _pack([slot for sample in batch for slot in _slots(sample)])
    return batch


class PackedMapper:
    """``mapper`` followed by :func:`pack_sample` (``None`` results, skipped samples, pass
    through)."""

    def __init__(self, mapper: Callable):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        out = self.mapper(dataset_dict)
        return pack_sample(out) if out is not None else out


class PackedBatchCollator:
    """A ``collate_fn`` for detectron2's batched loader: the batch stays a list of dicts
    (detectron2's ``trivial_batch_collator``), packed into one block (:func:`pack_batch`)."""

    def __call__(self, batch: List[Any]) -> List[Any]:
        return pack_batch(list(batch))
