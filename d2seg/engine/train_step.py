"""detectron2's ``SimpleTrainer`` / ``AMPTrainer`` with a guard against non-finite losses.

detectron2 stops on a NaN/inf total loss with the loss dict of the main process only. d2seg's
guard runs on every rank after ``backward`` and before ``optimizer.step`` (so a bad batch never
reaches the weights), agrees across ranks, and either

* raises ``FloatingPointError`` naming each non-finite loss, the iteration and (optionally)
  the images of the batch, or
* with ``D2SEG.NONFINITE.MAX_SKIPS = N > 0``, drops the step (gradients zeroed, no optimizer or
  grad-scaler update), counts it (``nonfinite_skips`` in the event storage), and raises only
  once more than N steps have been skipped.

When (``D2SEG.NONFINITE.CHECK``):

* "step": every step, before ``optimizer.step``. Reading the losses back makes the host wait
  for the GPU once per step: the device idles while the host fetches the next batch, runs the
  hooks and queues the next forward.
* "lagged" (what "auto" picks on CUDA when MAX_SKIPS is 0): the losses (and, in distributed
  runs, the all-reduced non-finite flag) are copied to pinned host memory without waiting
  (a CUDA event marks when they are there) and checked while the *next* step is queued. The
  host never waits for the step it has just queued, so the GPU stays busy. A non-finite loss
  then raises one iteration later (its weight update has been applied; training stops all the
  same); iterations that save a checkpoint, evaluate, write metrics (every 20) or end
  training are checked in "step" fashion, so no checkpoint holds weights from a non-finite
  step and the logged metrics are up to date. Skipping (MAX_SKIPS > 0) needs "step".
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..modeling.losses import TargetValueError
from ..utils.deferred_scalars import (Deferred, collect_scalars, packed_counts, resolve_scalars,
                                      stop_collecting, take_scalars)

logger = logging.getLogger(__name__)

__all__ = ["GuardedSimpleTrainer", "GuardedAMPTrainer", "NonFiniteLossError", "CHECK_MODES"]

CHECK_MODES = ("auto", "step", "lagged")


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite."""


class _SkipStep(Exception):
    pass


class _RecordingIterator:
    """Iterates a data loader and remembers the last batch (for error reports)."""

    def __init__(self, it, owner):
        self._it, self._owner = it, owner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._owner._last_batch = batch
        callback, self._owner._after_next_batch = self._owner._after_next_batch, None
        if callback is not None:
            callback()
        return batch


@dataclass
class _Staged:
    """One step's losses on their way to the host (see "lagged" in the module docstring)."""

    iter: int
    keys: List[str]
    host: torch.Tensor  # (len(keys) + 1 + counts,) float64: the losses, the non-finite flag,
    #                     then the counts of the statistics queued during the step
    event: Optional["torch.cuda.Event"]  # recorded after the copy (CUDA), else None
    data_time: float
    files: List[str]
    deferred: List[Deferred]  # d2seg.utils.deferred_scalars: their counts follow the flag


def _batch_files(batch) -> List[str]:
    out = []
    for d in batch if isinstance(batch, (list, tuple)) else []:
        if isinstance(d, dict):
            out.append(str(d.get("file_name", d.get("image_id", "?"))))
    return out


class _NonFiniteGuard:
    """Mixin for detectron2's trainers; see the module docstring."""

    max_skips: int = 0
    report_images: bool = True
    num_skipped: int = 0
    lagged: bool = False
    check_now: Optional[Callable[[int], bool]] = None
    _pending: Optional[_Staged] = None
    _last_batch = None
    _after_next_batch = None

    def after_next_batch_once(self, fn) -> None:
        """Call ``fn()`` once, right after the next batch is fetched (before the step uses it)."""
        self._after_next_batch = fn

    def configure_guard(self, max_skips: int = 0, report_images: bool = True,
                        lagged: bool = False,
                        check_now: Optional[Callable[[int], bool]] = None) -> None:
        """``lagged``: check each step's losses during the next step (no host wait per step);
        ``check_now(iter)``: iterations checked before their update all the same (the
        trainer passes checkpoint, evaluation, writer and last iterations)."""
        if lagged and int(max_skips) > 0:
            raise ValueError(f"D2SEG.NONFINITE.CHECK 'lagged' cannot skip steps (MAX_SKIPS="
                             f"{max_skips}): a step is checked after its update; use 'step'")
        self.max_skips = int(max_skips)
        self.report_images = bool(report_images)
        self.num_skipped = 0
        self.lagged = bool(lagged)
        self.check_now = check_now
        self._pending = None

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = _RecordingIterator(iter(self.data_loader), self)
        return self._data_loader_iter_obj

    def _check_losses(self, loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Raise or skip on non-finite losses; return the losses as 0-dim CPU float tensors.

        All losses come to the host in one transfer, with the counts of the statistics the
        model queued (``d2seg.utils.deferred_scalars``): one device synchronisation per step,
        instead of one per loss here, one more per loss in detectron2's ``write_metrics``
        (which then reads the returned CPU copies) and one per logged count."""
        keys = list(loss_dict)
        storage = get_event_storage()
        deferred = take_scalars(storage)
        if not keys and not deferred:
            return {}
        packed = self._pack(loss_dict, keys, deferred, flag=False).cpu()
        values = packed[:len(keys)]
        resolve_scalars(storage, deferred, packed[len(keys):].tolist(), int(self.iter))
        if not keys:
            return {}
        host = dict(zip(keys, values.unbind(0)))
        finite = torch.isfinite(values).tolist()
        bad: Dict[str, float] = {k: float(values[i]) for i, k in enumerate(keys) if not finite[i]}
        any_bad = bool(bad)
        if comm.get_world_size() > 1:  # every rank must take the same decision
            flag = torch.tensor([1.0 if any_bad else 0.0], device=next(iter(loss_dict.values())).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            any_bad = bool(flag.item() > 0)
        if not any_bad:
            return host
        where = self._where(self.iter)
        what = (", ".join(f"{k}={v}" for k, v in bad.items()) if bad
                else "a loss on another rank")
        imgs = ""
        if self.report_images and self._last_batch is not None:
            imgs = f"; images in this rank's batch: {_batch_files(self._last_batch)}"
        msg = f"Non-finite loss at {where}: {what}{imgs}"
        if self.num_skipped < self.max_skips:
            self.num_skipped += 1
            logger.warning(f"{msg}. Step skipped ({self.num_skipped}/{self.max_skips} allowed "
                           f"by D2SEG.NONFINITE.MAX_SKIPS).")
            get_event_storage().put_scalar("nonfinite_skips", self.num_skipped, smoothing_hint=False)
            raise _SkipStep()
        if self.max_skips > 0:
            msg += f". More than D2SEG.NONFINITE.MAX_SKIPS={self.max_skips} steps were non-finite"
        raise NonFiniteLossError(msg + ". Lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, set "
                                       "SOLVER.CLIP_GRADIENTS, or check these images.")

    def _where(self, it: int) -> str:
        where = f"iteration {it}"
        if comm.get_world_size() > 1:
            where += f" (rank {comm.get_rank()})"
        return where

    @staticmethod
    def _pack(loss_dict: Mapping[str, torch.Tensor], keys: List[str],
              deferred: List[Deferred], flag: bool) -> torch.Tensor:
        """One float64 vector on the losses' device: the summed losses, (``flag``) 1.0 if one
        is non-finite, on every rank if any rank's is (an all-reduce), then the queued
        counts. float64 holds the float32 losses and integer counts up to 2**53 exactly."""
        parts = []
        if keys:
            vals = torch.stack([loss_dict[k].detach().float().sum() for k in keys]).double()
            parts.append(vals)
            if flag:
                bad = (~torch.isfinite(vals)).any().double().reshape(1)
                if comm.get_world_size() > 1:  # every rank must take the same decision
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                parts.append(bad)
        elif flag:
            parts.append(torch.zeros(1, dtype=torch.float64))
        counts = packed_counts(deferred)
        if counts is not None:
            parts.append(counts.to(parts[0].device) if parts else counts)
        return torch.cat(parts)

    # -- "lagged" ----------------------------------------------------------------------------
    def _stage(self, loss_dict: Mapping[str, torch.Tensor], data_time: float) -> _Staged:
        """Queue the losses, their non-finite flag and the step's logged counts for the
        host; no waiting."""
        keys = list(loss_dict)
        files = _batch_files(self._last_batch) if self.report_images else []
        deferred = take_scalars(get_event_storage())
        packed = self._pack(loss_dict, keys, deferred, flag=True)
        event = None
        if packed.is_cuda:
            try:
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            except RuntimeError:  # no page-locked memory to be had: a waiting copy instead
                host = None
            if host is None:
                host = packed.cpu()
            else:
                host.copy_(packed, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        else:
            host = packed
        return _Staged(int(self.iter), keys, host, event, data_time, files, deferred)

    def _resolve(self, st: _Staged, late: bool = True) -> None:
        """Wait for ``st``'s copy; raise on a non-finite loss, else write its metrics.
        ``late``: ``st`` is the previous step's (its update was applied)."""
        if st.event is not None:
            st.event.synchronize()
        n = len(st.keys)
        values, flag = st.host[:n], float(st.host[n])
        resolve_scalars(get_event_storage(), st.deferred, st.host[n + 1:].tolist(), st.iter)
        if flag > 0:
            bad = {k: float(v) for k, v in zip(st.keys, values.tolist()) if not math.isfinite(v)}
            what = (", ".join(f"{k}={v}" for k, v in bad.items()) if bad
                    else "a loss on another rank")
            imgs = f"; images in this rank's batch: {st.files}" if st.files else ""
            when = (" Found while the next step was queued (D2SEG.NONFINITE.CHECK 'lagged'): "
                    "its weight update was applied; no checkpoint holds it." if late else "")
            raise NonFiniteLossError(
                f"Non-finite loss at {self._where(st.iter)}: {what}{imgs}.{when} Lower "
                f"SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, set SOLVER.CLIP_GRADIENTS, or check "
                f"these images.")
        super()._write_metrics(dict(zip(st.keys, values.unbind(0))), st.data_time,
                               iter=st.iter)

    def flush_pending(self) -> None:
        """Check the staged losses of the last step now (no-op when nothing is staged)."""
        st, self._pending = self._pending, None
        if st is not None:
            self._resolve(st)

    # -- detectron2's hook points --------------------------------------------------------------
    def _write_metrics(self, loss_dict, data_time: float, prefix: str = "",
                       iter: Optional[int] = None) -> None:
        # called by detectron2's run_step after backward and before optimizer.step
        if prefix:  # other metric groups: detectron2's
            super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)
            return
        if not self.lagged:
            super()._write_metrics(self._check_losses(loss_dict), data_time, iter=iter)
            return
        staged = self._stage(loss_dict, data_time)
        self.flush_pending()  # the previous step: long done, or nearly, on the device
        if self.check_now is not None and self.check_now(int(self.iter)):
            self._resolve(staged, late=False)  # before this step's update
        else:
            self._pending = staged

    def after_train(self) -> None:
        try:
            self.flush_pending()
        finally:
            super().after_train()

    def run_step(self) -> None:
        if self.async_write_metrics:
            raise ValueError("D2SEG's non-finite guard needs async_write_metrics=False")
        storage = get_event_storage()
        collect_scalars(storage)  # statistics the model logs come with the losses
        try:
            super().run_step()
        except _SkipStep:
            self.optimizer.zero_grad(set_to_none=True)
        except TargetValueError as e:  # name the files (D2SEG.DATASETS.CHECK 'warn' or 'off')
            if self._last_batch is None:
                raise
            labels = [str(d.get("sem_seg_file_name")) for d in self._last_batch
                      if isinstance(d, dict) and d.get("sem_seg_file_name")]
            raise TargetValueError(
                f"{e} at iteration {self.iter}; images in this rank's batch: "
                f"{_batch_files(self._last_batch)}" +
                (f", label maps: {labels}" if labels else "") +
                "; tools/check_dataset.py names the file (label_out_of_range)") from e
        finally:
            left = stop_collecting(storage)  # queued after _write_metrics, or a failed step
            if left:
                resolve_scalars(storage, left, None, int(self.iter))


class GuardedSimpleTrainer(_NonFiniteGuard, SimpleTrainer):
    """``SimpleTrainer`` with the non-finite-loss guard."""


class _AnyDeviceAMPTrainer(AMPTrainer):
    """detectron2's ``AMPTrainer.run_step`` for any autocast device and dtype.

    detectron2 0.7 asserts CUDA and uses ``torch.cuda.amp.autocast``; this step autocasts on
    the model's device (CUDA, or CPU with bfloat16) with ``self.precision``. A disabled grad
    scaler (bfloat16: see ``d2seg.engine.fast_paths.make_grad_scaler``) makes ``scale`` /
    ``step`` / ``update`` plain backward / ``optimizer.step()``.

    ``unscale_before_step`` (``SOLVER.CLIP_GRADIENTS.ENABLED``): the gradients are unscaled
    before ``optimizer.step``, where detectron2's clipping runs. A fused optimizer otherwise
    takes the scale into its kernel and unscales after the clipping, which then clips
    gradients still multiplied by the fp16 loss scale (65536 at first).
    """

    unscale_before_step: bool = False

    def run_step(self) -> None:
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        param = next(self.model.parameters(), None)
        device_type = param.device.type if param is not None else "cuda"
        with torch.autocast(device_type=device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time,
                                            iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        if self.unscale_before_step and self.grad_scaler.is_enabled():
            self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict) -> None:
        # a checkpoint of another precision (no scaler state, or an empty one from a disabled
        # bfloat16 scaler) resumes with a fresh scaler instead of failing
        scaler_state = state_dict.get("grad_scaler") or None
        SimpleTrainer.load_state_dict(self, state_dict)
        if scaler_state is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(scaler_state)


class GuardedAMPTrainer(_NonFiniteGuard, _AnyDeviceAMPTrainer):
    """``AMPTrainer`` with the non-finite-loss guard (skipped steps also skip the scaler);
    autocasts on CUDA or, with bfloat16, on CPU."""
