"""One process-wide thread pool for CPU kernels that run on a single core (torchvision's CPU
``roi_align`` and ``nms``): d2seg splits such work into independent parts and runs them at
once, the kernels releasing the GIL. Used by :mod:`d2seg.modeling.layers.roi_align` and the
RPN's per-image NMS in :mod:`d2seg.modeling.batched_rcnn`.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch

__all__ = ["run_in_parallel", "chunk_bounds"]

T = TypeVar("T")

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d2seg_cpu")
            _POOL_SIZE = workers
        return _POOL


def chunk_bounds(length: int, chunks: int) -> List[Tuple[int, int]]:
    """``[0, length)`` split into at most ``chunks`` runs of consecutive indices ``(a, b)``,
    all of ``ceil(length / chunks)`` except the last."""
    step = -(-length // chunks)
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def run_in_parallel(tasks: Sequence[Callable[[], T]]) -> List[T]:
    """``[task() for task in tasks]``, the first on this thread and the others on the pool at
    the same time, each under ``torch.no_grad()`` (grad mode is per thread: nothing is
    recorded for autograd in any of them) and under the calling thread's CPU autocast state
    (also per thread: torchvision's ``nms`` and ``roi_align`` have autocast kernels that cast
    to fp32). Exceptions propagate."""
    amp = torch.is_autocast_enabled("cpu")
    amp_dtype = torch.get_autocast_dtype("cpu")

    def run(task: Callable[[], T]) -> T:
        with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
            return task()

    if len(tasks) <= 1:
        return [run(t) for t in tasks]
    futures = [_pool(len(tasks) - 1).submit(run, t) for t in tasks[1:]]
    first = run(tasks[0])
    return [first] + [f.result() for f in futures]
