"""Training statistics computed on the device and read back together with the losses.

detectron2's R-CNN heads log statistics every step (the box classifier's accuracy, the mask
head's accuracy and false positive / negative rates, the RPN's anchor counts) by reading each
count back with ``.item()`` or ``nonzero`` in the middle of the forward pass. On a GPU every
read makes the host wait for the device: 11 of the 60 waits of a Mask R-CNN step on an H100
(``docs/benchmarks.md``). Here such a statistic is queued as a device tensor of counts plus a
function that turns the counts into the logged values; d2seg's trainer
(``d2seg/engine/train_step.py``) reads all queued counts in the transfer that already brings
the losses to the host (with ``D2SEG.NONFINITE.CHECK`` "lagged": while the next step is
queued) and puts the values into the event storage for the iteration they belong to. The
values are the same numbers detectron2 logs.

Outside d2seg's trainer (a user's own loop, inference, tests) nobody collects: the counts are
read at once and put into the storage, as detectron2 does.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.utils.events import EventStorage, get_event_storage

__all__ = ["put_scalars_later", "collect_scalars", "take_scalars", "stop_collecting",
           "packed_counts", "resolve_scalars", "Deferred"]

#: counts (host numbers, in the order queued) -> {scalar name: value}
Compute = Callable[[Sequence[float]], Dict[str, float]]
#: one queued statistic: its counts (1-D device tensor) and how they become logged values
Deferred = Tuple[Tensor, Compute]

_ATTR = "_d2seg_deferred_scalars"


def put_scalars_later(counts: Tensor, compute: Compute) -> None:
    """Log ``compute(counts as host numbers)`` in the current event storage.

    Args:
        counts: a tensor of numbers (any device and numeric dtype; flattened), e.g. the
            numerator and denominator of an accuracy. Integers up to 2**53 come back exactly.
        compute: maps the host numbers to ``{name: value}`` for ``EventStorage.put_scalar``;
            it may leave a name out (detectron2 logs some statistics only when a count is
            positive).

    Under d2seg's trainer the counts are read later, with the step's losses; otherwise now.
    """
    storage = get_event_storage()
    pending: Optional[List[Deferred]] = getattr(storage, _ATTR, None)
    if pending is None or getattr(storage, "_current_prefix", ""):
        resolve_scalars(storage, [(counts, compute)], None, storage.iter)
    else:
        pending.append((counts.detach().reshape(-1), compute))


def collect_scalars(storage: EventStorage) -> None:
    """From now on queue :func:`put_scalars_later` in ``storage`` (dropping anything queued
    before: a step that failed half-way)."""
    setattr(storage, _ATTR, [])


def take_scalars(storage: EventStorage) -> List[Deferred]:
    """The statistics queued since the last call (collection goes on)."""
    pending = getattr(storage, _ATTR, None)
    if not pending:
        return []
    setattr(storage, _ATTR, [])
    return pending


def stop_collecting(storage: EventStorage) -> List[Deferred]:
    """Stop queueing; return what is still queued."""
    pending = getattr(storage, _ATTR, None) or []
    setattr(storage, _ATTR, None)
    return pending


def packed_counts(deferred: Sequence[Deferred], dtype: torch.dtype = torch.float64
                  ) -> Optional[Tensor]:
    """All queued counts in one 1-D tensor of ``dtype`` (None when nothing is queued)."""
    if not deferred:
        return None
    return torch.cat([c.to(dtype) for c, _ in deferred])


def resolve_scalars(storage: EventStorage, deferred: Sequence[Deferred],
                    host: Optional[Sequence[float]], iteration: int) -> None:
    """Put the values of ``deferred`` into ``storage`` for ``iteration``.

    ``host``: the counts of all entries, in order, already on the host (as
    :func:`packed_counts` packed them); None reads each entry's counts now."""
    offset = 0
    for counts, compute in deferred:
        n = counts.numel()
        if host is None:
            values = counts.tolist()
        else:
            values = list(host[offset:offset + n])
            offset += n
        for name, value in compute(values).items():
            storage.put_scalar(name, value, cur_iter=iteration)
