"""Moving training batches to the device ahead of the step (``D2SEG.SPEED.DEVICE_PREFETCH``).

detectron2's models copy each image (and label) to the GPU inside ``forward``: the copies sit
on the training step's critical path, and the host waits for the next batch from the loader
while the GPU has nothing queued. :class:`DevicePrefetcher` wraps a training data loader: a
background thread takes batch k+1 (and k+2, ``depth``) from the loader while step k runs and
copies its tensors to the device on a separate CUDA stream (``non_blocking``, from the
loader's pinned memory); ``next()`` hands over a batch whose tensors are already on the
device, after making the consumer's stream wait for the copy. The model's own ``.to(device)``
calls are then no-ops.

What moves: the ``torch.Tensor`` values of each dataset dict of a batch (``"image"``,
``"sem_seg"``, ...) and tensors nested in lists / tuples / dicts. Other objects (detectron2
``Instances``, file names) are left as they are; the models move those as before. On CPU
nothing is copied; the thread still fetches ahead.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, List, Optional, Union

import torch

__all__ = ["DevicePrefetcher", "move_to_device"]


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """``obj`` with every tensor inside (nested lists, tuples and dicts) moved to ``device``.

    Containers are copied (the loader's dicts are not modified); other objects are returned
    as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device, non_blocking) for v in obj]
    if isinstance(obj, tuple):
        return tuple(move_to_device(v, device, non_blocking) for v in obj)
    return obj


def _tensors(obj: Any, out: List[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


_BATCH, _END, _ERROR = "batch", "end", "error"


def _produce(it: Iterator, device: torch.device, stream, q: "queue.Queue", stop: threading.Event
             ) -> None:
    """The background thread: fetch, copy (on ``stream``), queue; until ``stop`` or the end."""
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        for batch in it:
            if stop.is_set():
                return
            event = None
            if stream is not None:
                with torch.cuda.stream(stream):
                    batch = move_to_device(batch, device)
                    event = torch.cuda.Event()
                    event.record(stream)
            else:
                batch = move_to_device(batch, device)
            while not stop.is_set():
                try:
                    q.put((_BATCH, batch, event), timeout=0.2)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        q.put((_END, None, None))
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
        q.put((_ERROR, e, None))


class _PrefetchIterator:
    def __init__(self, loader: Iterable, device: torch.device, depth: int):
        self._device = device
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(
            target=_produce, args=(iter(loader), device, stream, self._queue, self._stop),
            name="d2seg-device-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> "_PrefetchIterator":
        return self

    def __next__(self):
        while True:
            try:
                kind, payload, event = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self.close()
                    raise RuntimeError("d2seg DevicePrefetcher: the prefetch thread stopped "
                                       "without a batch, an error or the end of the loader")
        if kind == _END:
            self.close()
            raise StopIteration
        if kind == _ERROR:
            self.close()
            raise payload
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            # the tensors were allocated on the copy stream: tell the caching allocator they
            # are used on this one, so their memory is not reused before this stream is done
            for t in _tensors(payload, []):
                t.record_stream(current)
        return payload

    def close(self) -> None:
        """Stop the thread (it ends at its next queue operation) and drop queued batches."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __del__(self):  # pragma: no cover - garbage collection timing
        self.close()


class DevicePrefetcher:
    """An iterable over ``loader`` whose batches arrive with their tensors on ``device``.

    Args:
        loader: any iterable of batches (detectron2's training loader: lists of dataset
            dicts, each with an "image" (C, H, W) uint8 tensor and for semantic models a
            "sem_seg" (H, W) int64 tensor).
        device: where the tensors go ("cuda" = the current CUDA device, "cuda:1", "cpu").
        depth: batches fetched and copied ahead (>= 1); each costs one batch of device memory.

    Each ``iter()`` starts a background thread over a new iterator of ``loader``; the thread
    ends with the loader, at ``close()``, or when the iterator is garbage collected. Errors
    raised by the loader (or the copies) are raised by ``next()`` in the training thread.
    """

    def __init__(self, loader: Iterable, device: Union[str, torch.device] = "cuda",
                 depth: int = 2):
        if int(depth) < 1:
            raise ValueError(f"DevicePrefetcher depth must be >= 1, got {depth} "
                             "(D2SEG.SPEED.DEVICE_PREFETCH_DEPTH)")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.loader = loader
        self.device = device
        self.depth = int(depth)
        self._last: Optional[_PrefetchIterator] = None

    def __iter__(self) -> _PrefetchIterator:
        if self._last is not None:
            self._last.close()
        self._last = _PrefetchIterator(self.loader, self.device, self.depth)
        return self._last

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._last is not None:
            self._last.close()
            self._last = None

    @property
    def dataset(self):
        """The wrapped loader's dataset (detectron2 code reads ``data_loader.dataset``)."""
        return getattr(self.loader, "dataset", None)
