"""Where a training step makes the host wait for the GPU.

A CUDA step is fast only while the host stays ahead of the device, queueing kernels. Every
value read back to the host (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``) and every
operation whose output size depends on tensor values (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) waits until the device has finished all queued work: the GPU then
idles while the host prepares the next kernels, the next batch and the hooks.

:class:`HostSyncAudit` lists those points in a block of code, with the source line that caused
each:

* on CUDA, authoritatively, with ``torch.cuda.set_sync_debug_mode("warn")`` (every
  synchronising call warns; the warnings are collected);
* on CPU, by emulation: a dispatch mode follows which tensors derive from the ``roots`` (the
  model's parameters and the batch: what would be on the GPU) and records the operations above
  applied to them. Reads of tensors unrelated to the roots (shape arithmetic on host tensors,
  as ``ImageList.from_tensors`` does) are not counted; reads that a CPU-only code path makes
  (a check d2seg skips on GPUs) are, and show their source line.

Used by ``tools/benchmark.py`` (``host_syncs`` per case) and the tests of the sync-free
training step.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["SyncEvent", "HostSyncAudit", "tensors_in"]

# aten ops that read values back or whose output size depends on values (CUDA syncs)
_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
                       "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
                       "bincount", "histc"})
# Tensor methods that copy to the host (not seen by the dispatcher on CPU tensors)
_HOST_COPIES = frozenset({"cpu", "tolist", "numpy"})
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SKIP_FILES = ("/torch/", "/d2seg/benchmark/syncs.py", "/contextlib.py", "/warnings.py")


@dataclass
class SyncEvent:
    """One host synchronisation: ``what`` (op or method), ``where`` (file:line of the first
    frame outside torch), ``stack`` (the function names of the frames outside torch,
    innermost first) and ``inner`` (file:line of the three innermost Python frames, torch's
    included, innermost first: where ``where`` names only the caller of a torch function -
    the autograd engine, a CUDA-graph tree - this names the torch code that waited)."""

    what: str
    where: str
    stack: List[str]
    inner: str = "?"
    phase: str = "block"  # "enter" / "exit": in the audit's own set-up or tear-down
    in_gc: bool = False  # while Python's garbage collector ran (a finalizer synchronised)

    def tags(self) -> str:
        """" [exit, gc]" for an event outside the block or during a collection, else ""."""
        t = ([self.phase] if self.phase != "block" else []) + (["gc"] if self.in_gc else [])
        return f" [{', '.join(t)}]" if t else ""


# the audit's own frames and torch's wrappers around a dispatch mode's handler
_AUDIT_FILES = ("/d2seg/benchmark/syncs.py", "/contextlib.py", "/warnings.py",
                "/torch/_dynamo/eval_frame.py", "/torch/_compile.py",
                "/torch/utils/_python_dispatch.py", "/torch/overrides.py")


def _short(f) -> str:
    name = f.filename  # shortened: relative to site-packages or to this repository
    if "site-packages/" in name:
        name = name.split("site-packages/", 1)[1]
    elif name.startswith(_REPO + os.sep):
        name = os.path.relpath(name, _REPO)
    return f"{name}:{f.lineno}"


def _call_site() -> tuple:
    """(where, stack, inner) of the current call: see :class:`SyncEvent`."""
    all_frames = traceback.extract_stack()[:-1]
    frames = [f for f in all_frames if not any(s in f.filename for s in _SKIP_FILES)]
    own = [f for f in all_frames if not any(s in f.filename for s in _AUDIT_FILES)]
    inner = " < ".join(_short(f) for f in reversed(own[-3:])) if own else "?"
    if not frames:
        return "?", [], inner
    return _short(frames[-1]), [fr.name for fr in reversed(frames)][:8], inner


def tensors_in(obj) -> Iterator[Tensor]:
    """Every tensor in nested dicts / lists / tuples and detectron2 ``Instances`` / ``Boxes`` /
    ``BitMasks`` (their ``tensor`` fields)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
    elif hasattr(obj, "get_fields"):  # detectron2 Instances
        yield from tensors_in(obj.get_fields())
    elif isinstance(getattr(obj, "tensor", None), Tensor):  # Boxes, BitMasks
        yield obj.tensor


class _Taint:
    def __init__(self, roots: Iterable[Tensor]):
        self.marked = WeakTensorKeyDictionary()
        for t in roots:
            self.marked[t] = True

    def any(self, args, kwargs) -> bool:
        for t in tensors_in((list(args), kwargs or {})):
            if t in self.marked:
                return True
        return False

    def mark(self, out) -> None:
        for t in tensors_in(out if isinstance(out, (list, tuple)) else [out]):
            self.marked[t] = True


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: "HostSyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        taint = self.audit._taint
        if taint.any(args, kwargs):
            self.audit.device_ops += 1
            name = func._schema.name.split("::", 1)[-1]
            if name in _SYNC_OPS or (name in ("index", "index_put", "index_put_")
                                     and _bool_index(args)):
                self.audit._record(name)
            taint.mark(out)
            if name.endswith("_") and args and isinstance(args[0], Tensor):
                # an in-place write (copy_ into a slice: pad_sequence, torch.stack(out=)):
                # the written tensor and the one it views now hold followed values
                taint.mark([args[0]] + ([args[0]._base] if args[0]._base is not None else []))
        return out


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    return isinstance(idx, (list, tuple)) and any(
        isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx)


class _CountDeviceOps(TorchDispatchMode):
    """Counts the aten operations with a tensor on ``device`` among their arguments."""

    def __init__(self, audit: "HostSyncAudit", device: torch.device):
        super().__init__()
        self.audit, self.device_type = audit, device.type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t.device.type == self.device_type for t in tensors_in((list(args), kwargs or {}))):
            self.audit.device_ops += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, audit: "HostSyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        out = func(*args, **(kwargs or {}))
        if name in _HOST_COPIES and args and isinstance(args[0], Tensor) \
                and args[0] in self.audit._taint.marked:
            self.audit._record(name)
            if isinstance(out, Tensor):
                # on a GPU, .cpu() makes a host tensor: reading it later costs nothing. On the
                # CPU it returns the tensor itself: give back an untracked copy instead.
                if out is args[0]:
                    out = out.clone()
                self.audit._taint.marked.pop(out, None)
        return out


class HostSyncAudit(contextlib.AbstractContextManager):
    """Records the host synchronisations of a block (see the module docstring).

    Args:
        device: where the block runs. CUDA: ``torch.cuda.set_sync_debug_mode("warn")``; other
            devices: the CPU emulation.
        roots: CPU emulation only: the tensors that would live on the GPU (model parameters
            and buffers, the batch's tensors); everything computed from them is followed.

    After the block: ``events`` (list of :class:`SyncEvent`), ``count``, ``by_site()``, and
    ``device_ops``: how many aten operations ran on device tensors (CPU emulation: on tensors
    followed from the roots) - views and in-place ops included, so an upper bound of the
    kernels a GPU would launch; each costs host time (Python, dispatch, launch) that the GPU
    hides only while the host is ahead of it.
    """

    def __init__(self, device: torch.device, roots: Iterable[Tensor] = ()):
        self.device = torch.device(device)
        self._phase, self._in_gc = "block", False
        self.events: List[SyncEvent] = []
        self.device_ops = 0
        self._roots = list(roots)
        self._stack = contextlib.ExitStack()

    def _record(self, what: str) -> None:
        where, stack, inner = _call_site()
        self.events.append(SyncEvent(what, where, stack, inner, self._phase, self._in_gc))

    def _gc_callback(self, phase: str, info) -> None:
        self._in_gc = phase == "start"

    def __enter__(self) -> "HostSyncAudit":
        # a synchronisation inside the audit's own set-up / tear-down (or in a finalizer run
        # by a garbage collection) is recorded with that tag: the H100 audits of 2026-11-27
        # had one attributed only to the `with` line that opened the audit
        self._phase, self._in_gc = "enter", False
        gc.callbacks.append(self._gc_callback)
        self._stack.callback(gc.callbacks.remove, self._gc_callback)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                # called while the synchronising op is on the stack: record its call site
                if "synchroniz" in str(message).lower():
                    self._record("cuda sync")
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, prev)
            self._stack.enter_context(_CountDeviceOps(self, self.device))
        else:
            self._taint = _Taint(self._roots)
            self._stack.enter_context(_Function(self))
            self._stack.enter_context(_Dispatch(self))
        self._phase = "block"
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self._phase = "exit"
        self._stack.close()  # restores the sync debug mode and warnings.showwarning
        return None

    @property
    def count(self) -> int:
        return len(self.events)

    def by_site(self) -> Dict[str, int]:
        """{"what @ file:line": count}, most frequent first."""
        c = collections.Counter(f"{e.what} @ {e.where}{e.tags()}" for e in self.events)
        return dict(c.most_common())

    def by_inner_site(self) -> Dict[str, int]:
        """{"what @ file:line < ..." of the three innermost frames, torch's included: count}."""
        c = collections.Counter(f"{e.what} @ {e.inner}{e.tags()}" for e in self.events)
        return dict(c.most_common())
