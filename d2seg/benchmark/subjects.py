"""What the benchmark measures: "subjects", each one model with its own training step.

* :class:`D2SegSubject`: d2seg as a user gets it: ``d2seg.engine.Trainer`` built by train_net's
  ``setup`` from a config (+ ``KEY VALUE`` opts, so fast paths can be toggled), its model,
  optimizer and inner trainer (detectron2's step loop with d2seg's guard and whatever fast
  paths the config turns on); also runs the real ``Trainer.train()`` loop with data loading.
* :class:`PlainD2Subject`: "plain detectron2": detectron2's ``build_model`` +
  ``build_optimizer`` for the same config, stepped by detectron2's ``SimpleTrainer`` /
  ``AMPTrainer``.
* :class:`TorchSemanticSubject` / :class:`TorchMaskRCNNSubject`: the plain-PyTorch references
  of :mod:`d2seg.benchmark.references` in the tightest plain loop (forward, loss, backward,
  optimizer step; no per-step host synchronisation).

Every subject trains on the same :class:`SyntheticBatch` (made on the device before timing)
and runs inference on the same images. ``train_steps(k)`` / ``infer()`` do not synchronise;
the harness times blocks of them with :class:`~d2seg.benchmark.measure.Timer`.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence, TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .measure import (DTYPES, autocast, capture_backend_flags, sync, thread_cpu_delta,
                      thread_cpu_per_iter, thread_cpu_snapshot)
from .references import (REFERENCES, build_plain_detectron2, build_reference,
                         semantic_logits)

if TYPE_CHECKING:  # for annotations only
    from detectron2.config import CfgNode

logger = logging.getLogger(__name__)

__all__ = ["SyntheticBatch", "Subject", "D2SegSubject", "PlainD2Subject",
           "TorchSemanticSubject", "TorchMaskRCNNSubject", "task_of", "build_reference_subject"]

def task_of(cfg: CfgNode) -> str:
    """"semantic", "instance" or "panoptic" for ``MODEL.META_ARCHITECTURE``, by its registered
    class (subclasses included; see :func:`d2seg.engine.fast_paths.model_family`).

    Raises:
        ValueError: an architecture of none of these families (e.g. RetinaNet).
    """
    from ..engine.fast_paths import model_family

    family = model_family(cfg)
    task = {"semantic": "semantic", "rcnn": "instance", "panoptic": "panoptic"}.get(family)
    if task is None:
        raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}: the "
                         f"benchmark measures semantic, R-CNN and Panoptic FPN models only")
    return task


class SyntheticBatch:
    """A random batch on ``device``, identical for every subject of a case (seeded).

    Attributes: ``images`` (N, 3, H, W) float in [0, 255]; ``sem_seg`` (N, H, W) long in
    [0, ``num_sem_classes``) (semantic, panoptic); ``instances``: per image a dict with
    "boxes" (k, 4) float XYXY, "classes" (k,) long in [0, ``num_thing_classes``), "masks"
    (k, H, W) bool, the box interiors (instance, panoptic).
    """

    def __init__(self, task: str, n: int, h: int, w: int, device: torch.device, *,
                 num_sem_classes: int = 2, num_thing_classes: int = 1,
                 instances_per_image: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.task, self.n, self.h, self.w = task, n, h, w
        self.images = (torch.rand(n, 3, h, w, generator=g) * 255).to(device)
        self.sem_seg = None
        if task in ("semantic", "panoptic"):
            self.sem_seg = torch.randint(0, max(num_sem_classes, 2), (n, h, w), generator=g)
            self.sem_seg = self.sem_seg.to(device)
        self.instances: List[Dict[str, Tensor]] = []
        if task in ("instance", "panoptic"):
            for _ in range(n):
                k = instances_per_image
                wh = torch.rand(k, 2, generator=g) * 0.3 + 0.1  # 10-40 % of the side
                xy = torch.rand(k, 2, generator=g) * (1 - wh)
                boxes = torch.cat([xy, xy + wh], 1) * torch.tensor([w, h, w, h])
                boxes = boxes.round()
                masks = torch.zeros(k, h, w, dtype=torch.bool)
                for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                    masks[j, y0:y1, x0:x1] = True
                self.instances.append({
                    "boxes": boxes.to(device),
                    "classes": torch.randint(0, max(num_thing_classes, 1), (k,),
                                             generator=g).to(device),
                    "masks": masks.to(device)})

    def d2_inputs(self, train: bool = True) -> List[Dict]:
        """detectron2's list-of-dicts format ("image", "height", "width", and in training
        "sem_seg" / "instances" with gt_boxes, gt_classes, gt_masks as BitMasks)."""
        from detectron2.structures import BitMasks, Boxes, Instances

        out = []
        for i in range(self.n):
            d = {"image": self.images[i], "height": self.h, "width": self.w}
            if train and self.sem_seg is not None:
                d["sem_seg"] = self.sem_seg[i]
            if train and self.instances:
                t = self.instances[i]
                inst = Instances((self.h, self.w))
                inst.gt_boxes = Boxes(t["boxes"])
                inst.gt_classes = t["classes"]
                inst.gt_masks = BitMasks(t["masks"])
                d["instances"] = inst
            out.append(d)
        return out


class _Repeat:
    """A data loader that yields the same batch forever (the model step alone)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class _RecordSizes:
    """Wraps a data loader; remembers the (H, W) of the first image of each batch."""

    def __init__(self, loader, keep: int = 1000):
        self.loader, self.keep, self.sizes = loader, keep, []

    def __iter__(self):
        for batch in self.loader:
            if len(self.sizes) < self.keep and isinstance(batch, (list, tuple)) and batch:
                img = batch[0].get("image") if isinstance(batch[0], dict) else None
                if img is not None:
                    self.sizes.append(tuple(int(s) for s in img.shape[-2:]))
            yield batch

    def __len__(self):  # pragma: no cover - detectron2 loaders are infinite
        return len(self.loader)


_RUN_DIR: Optional[str] = None
_AMP_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def _has_speed_config() -> bool:
    """Whether this d2seg has the fast-path config block (``D2SEG.SPEED``)."""
    from ..config import get_cfg

    return "SPEED" in get_cfg().D2SEG


def _run_dir() -> str:
    """One temporary OUTPUT_DIR for every d2seg subject of the process (detectron2's
    ``setup_logger`` is cached per folder: one folder = one set of log handlers), removed at
    exit."""
    global _RUN_DIR
    if _RUN_DIR is None or not os.path.isdir(_RUN_DIR):
        import atexit
        import shutil

        _RUN_DIR = tempfile.mkdtemp(prefix="d2seg-bench-")
        atexit.register(shutil.rmtree, _RUN_DIR, True)
    return _RUN_DIR


class Subject:
    """One model to measure. Subclasses implement ``set_batch``, ``train_steps``,
    ``set_infer_batch`` and ``infer``.

    Attributes: ``name``; ``kind`` ("d2seg" or "reference"); ``description``; ``task``;
    ``device``; ``precision`` ("fp32", "bf16", "fp16"); ``backend_flags`` (cuDNN / TF32
    switches this subject runs with, see :func:`~d2seg.benchmark.measure.backend_flags`).
    """

    kind = "reference"

    def __init__(self, name: str, description: str, task: str, device: torch.device,
                 precision: str):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got '{precision}'")
        self.name, self.description, self.task = name, description, task
        self.device, self.precision = device, precision
        self.backend_flags = capture_backend_flags()
        self.notes: List[str] = []

    @property
    def model(self) -> nn.Module:
        raise NotImplementedError

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def set_batch(self, data: SyntheticBatch) -> None:
        """Use ``data`` (already on the device) for the following training steps."""
        raise NotImplementedError

    def train_steps(self, k: int) -> None:
        """``k`` training steps (forward, loss, backward, optimizer step) on the batch."""
        raise NotImplementedError

    def set_infer_batch(self, data: SyntheticBatch) -> None:
        raise NotImplementedError

    def infer(self) -> object:
        """One inference call (eval mode, no gradients) on the inference batch; returns the
        model's outputs (for :meth:`detections`)."""
        raise NotImplementedError

    def detections(self, outputs: object) -> Optional[List[int]]:
        """Instances per image in ``outputs`` (of :meth:`infer`), or None for a model that
        predicts no instances. A detector's inference time grows with it (the mask head
        and the mask pasting run per detection)."""
        return None

    def weights_module(self) -> nn.Module:
        """The module whose ``state_dict`` holds the weights (without DDP or compile
        wrappers): what the harness loads d2seg's trained weights into before a
        reference's inference when the layouts agree (the same detections, the same work)."""
        return self.model

    def close(self) -> None:
        """Release what the subject holds (data loader workers, temporary folders)."""

    def batch_tensors(self) -> list:
        """The tensors of the training batch (what the CPU sync audit follows)."""
        return []

    def audit_roots(self) -> list:
        """Parameters, buffers and batch tensors: what lives on the GPU in a CUDA run (see
        :class:`d2seg.benchmark.syncs.HostSyncAudit`)."""
        from .syncs import tensors_in

        m = self.model
        return list(m.parameters()) + list(m.buffers()) + list(tensors_in(self.batch_tensors()))


# -------------------------------------------------------------------------------------------
# detectron2-stepped subjects (d2seg's Trainer and plain detectron2)
# -------------------------------------------------------------------------------------------
class _D2Stepped(Subject):
    """A detectron2 ``SimpleTrainer``-like ``inner`` stepped on a repeated synthetic batch."""

    inner = None
    _model: nn.Module = None
    outer_autocast = False  # wrap run_step in the harness's autocast (no AMP trainer)

    @property
    def model(self) -> nn.Module:
        return self._model

    def _unwrapped(self) -> nn.Module:
        m = self._model
        m = getattr(m, "module", m)  # DDP
        return getattr(m, "_orig_mod", m)  # torch.compile

    def params(self) -> int:
        return sum(p.numel() for p in self._unwrapped().parameters())

    def weights_module(self) -> nn.Module:
        return self._unwrapped()

    def detections(self, outputs: object) -> Optional[List[int]]:
        if isinstance(outputs, list) and outputs and isinstance(outputs[0], dict) \
                and "instances" in outputs[0]:
            return [len(o["instances"]) for o in outputs]
        return None

    def set_batch(self, data: SyntheticBatch) -> None:
        self._model.train()
        self.inner.data_loader = _Repeat(data.d2_inputs(train=True))
        self.inner._data_loader_iter_obj = None
        self._it = getattr(self, "_it", 0)

    def batch_tensors(self) -> list:
        loader = getattr(self.inner, "data_loader", None)
        return list(getattr(loader, "batch", []) or [])

    def train_steps(self, k: int) -> None:
        from detectron2.utils.events import EventStorage

        with EventStorage(self._it) as storage:
            self.inner.storage = storage
            for _ in range(k):
                self.inner.iter = self._it
                if not self.outer_autocast:  # fp32, or the AMP trainer's own autocast
                    self.inner.run_step()
                else:
                    with autocast(self.device, self.precision):
                        self.inner.run_step()
                self._it += 1

    def set_infer_batch(self, data: SyntheticBatch) -> None:
        self._infer_inputs = data.d2_inputs(train=False)

    def infer(self) -> object:
        m = self._model
        was = m.training
        m.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                return m(self._infer_inputs)
        finally:
            m.train(was)


class _LoopTimer:
    """A detectron2 hook timing iterations [start, end) of ``Trainer.train()`` (everything
    between two ``before_step`` calls: data loading, the step and every hook)."""

    def __init__(self, device: torch.device, start: int, end: int):
        from detectron2.engine import HookBase

        timer = self

        class _Hook(HookBase):
            def before_step(self):
                it = self.trainer.iter
                if it in (timer.start, timer.end):
                    sync(timer.device)
                if timer.start <= it <= timer.end:  # host time only between the ends
                    timer.stamps[it] = time.perf_counter()
                if it == timer.start:
                    timer.cpu_before = thread_cpu_snapshot()
                elif it == timer.end:
                    timer.thread_cpu_s = thread_cpu_delta(timer.cpu_before,
                                                          thread_cpu_snapshot())

        self.device, self.start, self.end = device, start, end
        self.stamps: Dict[int, float] = {}
        self.cpu_before: Dict[int, tuple] = {}
        self.thread_cpu_s: Dict[str, float] = {}  # CPU seconds per thread over the window
        self.hook = _Hook()

    @property
    def seconds(self) -> float:
        return self.stamps[self.end] - self.stamps[self.start]

    @property
    def iteration_seconds(self) -> List[float]:
        """Host time from one ``before_step`` to the next, per timed iteration (everything
        the loop did in it: hooks too); unsynchronised except at the window's ends."""
        return [self.stamps[i + 1] - self.stamps[i] for i in range(self.start, self.end)]


class _LoopProfiler:
    """A detectron2 hook running iterations [start, end) of ``Trainer.train()`` under
    ``torch.profiler``; ``result``: the summary (or {"error"})."""

    def __init__(self, device: torch.device, start: int, end: int):
        from detectron2.engine import HookBase

        from .harness import profiler_activities, summarize_profile

        lp = self
        self.result: Dict[str, object] = {"error": "not reached"}

        class _Hook(HookBase):
            def before_step(self):
                it = self.trainer.iter
                try:
                    if it == lp.start:
                        sync(lp.device)
                        lp.prof = torch.profiler.profile(activities=profiler_activities(device))
                        lp.prof.__enter__()
                        lp.t0 = time.perf_counter()
                    elif it == lp.end and lp.prof is not None:
                        sync(lp.device)
                        wall = time.perf_counter() - lp.t0
                        lp.prof.__exit__(None, None, None)
                        lp.result = summarize_profile(lp.prof, wall, lp.end - lp.start,
                                                      lp.device.type == "cuda")
                        lp.prof = None
                except Exception as e:  # noqa: BLE001 - a diagnostic
                    lp.result = {"error": f"{type(e).__name__}: {e}"[:500]}

        self.device, self.start, self.end, self.prof, self.t0 = device, start, end, None, 0.0
        self.hook = _Hook()


class D2SegSubject(_D2Stepped):
    """d2seg's ``Trainer`` for ``config_file`` + ``opts``, set up by train_net's ``setup``.

    The harness adds (before the user's opts, which win): ``OUTPUT_DIR`` (a temporary
    folder), ``MODEL.DEVICE``, ``SOLVER.IMS_PER_BATCH`` = batch, ``SOLVER.AMP.ENABLED`` (CUDA
    and precision != fp32; with fp32 also ``D2SEG.SPEED.INFERENCE_AMP off``),
    ``SOLVER.MAX_ITER`` (for the loop), no evaluation
    (``DATASETS.TEST`` empty, ``TEST.EVAL_PERIOD 0``), no curve plot, no periodic checkpoint.
    """

    kind = "d2seg"

    def __init__(self, config_file: str, opts: Sequence[str], device: torch.device,
                 precision: str, batch: int, max_iter: int = 1000, name: str = "",
                 output_dir: Optional[str] = None):
        from ..engine.train_loop import setup
        from ..engine.trainer import Trainer

        if output_dir is None:
            output_dir = _run_dir()
        # Reduced precision through d2seg's own AMP trainer where it has one for this device
        # and dtype (CUDA: fp16/bf16 with D2SEG.SPEED.AMP_DTYPE; CPU: bf16); otherwise (CPU
        # fp16, or a d2seg without D2SEG.SPEED) AMP stays off and the harness wraps the step
        # in the same autocast as the references'.
        speed = _has_speed_config()
        amp = precision != "fp32" and (device.type == "cuda"
                                       or (speed and precision == "bf16"))
        harness_opts = ["OUTPUT_DIR", output_dir, "MODEL.DEVICE", str(device),
                        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.AMP.ENABLED", str(amp),
                        "SOLVER.MAX_ITER", str(max_iter), "DATASETS.TEST", "()",
                        "TEST.EVAL_PERIOD", "0", "D2SEG.PLOT_CURVES", "False",
                        "SOLVER.CHECKPOINT_PERIOD", str(10 ** 9), "TEST.NUM_VIS", "0"]
        if amp and speed:
            harness_opts += ["D2SEG.SPEED.AMP_DTYPE", _AMP_NAMES[precision]]
        if speed and precision == "fp32":  # inference in the harness's precision too
            harness_opts += ["D2SEG.SPEED.INFERENCE_AMP", "off"]
        self.opts = list(opts)
        pairs = dict(zip(self.opts[0::2], self.opts[1::2]))
        if str(pairs.get("SOLVER.AMP.ENABLED", "")).lower() == "true" and precision == "fp32":
            raise ValueError("SOLVER.AMP.ENABLED True with the harness's fp32: give "
                             "--precision bf16 (or fp16 on CUDA) instead; the harness sets AMP "
                             "for d2seg and the references alike")
        args = argparse.Namespace(config_file=config_file, opts=harness_opts + self.opts,
                                  resume=False, eval_only=False, num_gpus=1, num_machines=1,
                                  machine_rank=0, dist_url="auto")
        self.cfg = setup(args)
        self.trainer = Trainer(self.cfg)
        self.trainer.resume_or_load(resume=False)
        cfg = self.cfg
        super().__init__(name or f"d2seg {cfg.MODEL.META_ARCHITECTURE}",
                         f"d2seg Trainer: {os.path.basename(config_file)}", task_of(cfg),
                         device, precision)
        self.config_file = config_file
        self.inner = self.trainer._trainer
        self._model = self.trainer.model
        self._real_loader = self.inner.data_loader
        dtype = DTYPES[precision]
        from detectron2.engine import AMPTrainer

        if isinstance(self.inner, AMPTrainer):
            if self.inner.precision != dtype:
                self.notes.append(f"harness set AMPTrainer.precision = {precision}")
                self.inner.precision = dtype
        elif precision != "fp32":
            self.outer_autocast = True
            self.notes.append(f"{precision} by the harness's autocast around the step (d2seg "
                              f"has no AMP trainer for it on {device.type})")
        self.backend_flags = capture_backend_flags()  # after whatever the Trainer switched on
        self.speed_plan = None
        if speed:
            from ..engine import fast_paths

            self.speed_plan = fast_paths.resolve(self.cfg).as_dict()

    def train_steps(self, k: int) -> None:
        # steps in the middle of a long training: the "lagged" non-finite check treats the
        # last iteration (and checkpoint / evaluation / writer ones) as strict, so the step
        # alone must not run at or past the trainer's max_iter
        saved, self.trainer.max_iter = self.trainer.max_iter, 10 ** 9
        try:
            super().train_steps(k)
        finally:
            self.trainer.max_iter = saved

    def run_loop(self, warmup: int, iters: int, profile: int = 0) -> Dict[str, object]:
        """``Trainer.train()`` (train_net's loop, real data loading, every hook) for
        ``warmup + iters + profile + 1`` iterations; times iterations [warmup, warmup + iters)
        and, with ``profile > 0``, runs the next ``profile`` iterations under
        ``torch.profiler`` (outside the timed window).

        Returns {"seconds", "iters", "batch", "img_per_s", "s_per_iter", "data_time_s" (mean
        of detectron2's data_time over the window), "input_sizes" (distinct (H, W) seen),
        "profile" (with ``profile > 0``: :func:`~d2seg.benchmark.harness.summarize_profile`'s
        dict per loop iteration)}. The last iteration (final checkpoint) and ``after_train``
        are outside the window.
        """
        tr = self.trainer
        flush = getattr(self.inner, "flush_pending", None)
        if callable(flush):  # the step alone's last losses ("lagged" check) stay out of the loop
            from detectron2.utils.events import EventStorage

            with EventStorage(self._it):
                flush()
        need = warmup + iters + profile + 1
        if tr.max_iter < need:
            raise ValueError(f"SOLVER.MAX_ITER={tr.max_iter} < {need} iterations the loop needs")
        tr.max_iter = need
        rec = _RecordSizes(self._real_loader)
        self.inner.data_loader = rec
        self.inner._data_loader_iter_obj = None
        timer = _LoopTimer(self.device, warmup, warmup + iters)
        prof = _LoopProfiler(self.device, warmup + iters, warmup + iters + profile) \
            if profile > 0 else None
        tr.register_hooks([timer.hook] + ([prof.hook] if prof else []))
        from detectron2.engine.hooks import IterationTimer

        for h in tr._hooks:  # its "time" from the first iteration on (default: after 3), so
            if isinstance(h, IterationTimer):  # that every timed iteration has a run_step time
                h._warmup_iter = 0
        tr.start_iter = 0
        self._model.train()
        if self.outer_autocast:  # the same precision as the step alone (no AMP trainer)
            with autocast(self.device, self.precision):
                tr.train()
        else:
            tr.train()
        hist = tr.storage.history("data_time").values() if "data_time" in \
            tr.storage.histories() else []
        data_times = [v for v, it in hist if warmup <= it < warmup + iters]
        # detectron2's IterationTimer: each run_step (data wait included), other hooks not
        step_hist = tr.storage.history("time").values() if "time" in \
            tr.storage.histories() else []
        step_times = [v for v, it in step_hist if warmup <= it < warmup + iters]
        batch = self.cfg.SOLVER.IMS_PER_BATCH
        sec = timer.seconds
        self.inner._data_loader_iter_obj = None  # stop the loader workers
        close = getattr(self._real_loader, "close", None)
        if callable(close):  # d2seg's DevicePrefetcher: stop its thread
            close()
        out = {"profile": prof.result} if prof else {}
        return {**out, "seconds": sec, "iters": iters, "batch": batch,
                "img_per_s": iters * batch / sec, "s_per_iter": sec / iters,
                "data_time_s": (sum(data_times) / len(data_times)) if data_times else None,
                # where a gap to the step alone comes from: a uniform cost per iteration
                # (median run_step time close to s_per_iter) or a few slow iterations (max)
                "run_step_median_s": statistics.median(step_times) if step_times else None,
                "run_step_max_s": max(step_times) if step_times else None,
                "run_step_times_s": [round(v, 5) for v in step_times],
                # per iteration with every hook: a one-time cost (a first write, say) shows
                # as one slow iteration that run_step_times_s does not have
                "iteration_times_s": [round(v, 5) for v in timer.iteration_seconds],
                # host CPU per iteration by thread (the training process's: loader workers
                # are other processes); against s_per_iter, how busy each thread was
                "thread_cpu_s_per_iter": thread_cpu_per_iter(timer.thread_cpu_s, iters),
                "input_sizes": sorted(set(rec.sizes)),
                # mean pixels of an image (the first of each batch loaded): the loop's work
                # per image when its images are not the step's size
                "mean_pixels": (sum(h * w for h, w in rec.sizes) / len(rec.sizes))
                if rec.sizes else None}

    def close(self) -> None:
        self.inner._data_loader_iter_obj = None


class PlainD2Subject(_D2Stepped):
    """"Plain detectron2" for ``cfg``: detectron2's model + optimizer, stepped by its
    ``SimpleTrainer`` (fp32, or reduced precision on CPU with the outer autocast) or
    ``AMPTrainer(precision=...)`` on CUDA (grad scaler enabled for fp16 only)."""

    def __init__(self, cfg, device: torch.device, precision: str):
        from detectron2.engine import AMPTrainer, SimpleTrainer

        super().__init__("plain_d2", "plain detectron2: build_model + SimpleTrainer/"
                         "AMPTrainer step, same config, no d2seg fast paths", task_of(cfg),
                         device, precision)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = str(device)
        model, opt = build_plain_detectron2(cfg)
        self._model = model
        if device.type == "cuda" and precision != "fp32":
            from torch.amp import GradScaler

            self.inner = AMPTrainer(model, None, opt, precision=DTYPES[precision],
                                    grad_scaler=GradScaler("cuda",
                                                           enabled=precision == "fp16"))
        else:  # detectron2's AMPTrainer is CUDA-only: CPU bf16 = the harness's autocast
            self.inner = SimpleTrainer(model, None, opt)
            self.outer_autocast = precision != "fp32"


# -------------------------------------------------------------------------------------------
# plain-PyTorch references
# -------------------------------------------------------------------------------------------
def _optimizer_from_cfg(cfg, params) -> torch.optim.Optimizer:
    """The optimizer type and hyper-parameters of ``cfg.SOLVER`` on a plain parameter list."""
    s = cfg.SOLVER
    name = str(getattr(s, "OPTIMIZER", "SGD")).upper()
    if name == "SGD":
        return torch.optim.SGD(params, lr=s.BASE_LR, momentum=s.MOMENTUM,
                               weight_decay=s.WEIGHT_DECAY)
    cls = {"ADAM": torch.optim.Adam, "ADAMW": torch.optim.AdamW}[name]
    return cls(params, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY)


def _soft_dice(logits: Tensor, target: Tensor, ignore: int, smooth: float = 1.0) -> Tensor:
    probs = logits.float().softmax(1)
    valid = (target != ignore).unsqueeze(1)
    onehot = F.one_hot(target.clamp(0, logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


class _TorchSubject(Subject):
    def __init__(self, name, description, task, device, precision, model: nn.Module, cfg):
        super().__init__(name, description, task, device, precision)
        self._model = model.to(device).train()
        self.opt = _optimizer_from_cfg(cfg, [p for p in self._model.parameters()])
        from torch.amp import GradScaler

        self.scaler = GradScaler(device.type, enabled=precision == "fp16"
                                 and device.type == "cuda")

    @property
    def model(self) -> nn.Module:
        return self._model

    def _loss(self) -> Tensor:
        raise NotImplementedError

    def train_steps(self, k: int) -> None:
        for _ in range(k):
            with autocast(self.device, self.precision):
                loss = self._loss()
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def _forward_eval(self) -> object:
        raise NotImplementedError

    def infer(self) -> object:
        self._model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                return self._forward_eval()
        finally:
            self._model.train()



def _network_differences(name: str, cfg) -> List[str]:
    """Config keys that make d2seg's network other than the plain reference ``name`` builds
    (which follows only the keys it takes): the ratio would then compare two networks."""
    out = []
    if name == "plain_unet":  # BN, transposed-conv up-sampling, biased convs, skip widths
        u = cfg.MODEL.UNET
        for key, want in (("NORM", "BN"), ("UPSAMPLE", "transposed"), ("CONV_BIAS", True)):
            if u.get(key, want) != want:
                out.append(f"MODEL.UNET.{key} {u.get(key)!r} (the reference: {want!r})")
        if list(u.get("DECODER_CHANNELS", [])):
            out.append(f"MODEL.UNET.DECODER_CHANNELS {list(u.DECODER_CHANNELS)} (the "
                       f"reference: the skips' widths)")
    elif name == "plain_deeplabv3plus_r50":  # output stride 16, rates 6/12/18, decoder 256
        r, h = cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD
        if (r.RES4_DILATION, r.RES5_DILATION) != (1, 2):
            out.append(f"MODEL.RESNETS.RES4/RES5_DILATION {r.RES4_DILATION}/{r.RES5_DILATION} "
                       f"(the reference: output stride 16, 1/2)")
        if list(h.get("ASPP_DILATIONS", [6, 12, 18])) != [6, 12, 18]:
            out.append(f"MODEL.SEM_SEG_HEAD.ASPP_DILATIONS {list(h.ASPP_DILATIONS)} (the "
                       f"reference: [6, 12, 18])")
        if h.CONVS_DIM != 256:
            out.append(f"MODEL.SEM_SEG_HEAD.CONVS_DIM {h.CONVS_DIM} (the reference: 256)")
    return out


class TorchSemanticSubject(_TorchSubject):
    """A semantic reference: input normalised with ``MODEL.PIXEL_MEAN/STD`` (done once,
    outside the step), loss = the config's CE (+ a plain soft Dice when
    ``MODEL.SEM_SEG_LOSS.NAMES`` has "Dice"), weights as configured."""

    def __init__(self, name: str, cfg, device: torch.device, precision: str):
        spec = REFERENCES[name]
        k = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        differs = _network_differences(name, cfg)
        if differs:  # reported by the harness as a skipped reference, with this reason
            raise ValueError(f"{name} is not the config's network: {'; '.join(differs)}")
        kw = {}
        if name == "plain_unet":
            kw = {"base": cfg.MODEL.UNET.BASE_CHANNELS, "depth": cfg.MODEL.UNET.DEPTH}
        elif name == "tv_deeplabv3_r50":  # the same output stride and rates as d2seg's
            r = cfg.MODEL.RESNETS
            kw = {"output_stride": 32 // (2 if r.RES4_DILATION > 1 else 1)
                                      // (2 if r.RES5_DILATION > 1 else 1),
                  "atrous_rates": tuple(cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS)}
        self.num_classes = k
        super().__init__(name, spec.description, "semantic", device, precision,
                         build_reference(name, k, **kw), cfg)
        self.ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        self.mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(1, -1, 1, 1)
        names = [n.lower() for n in cfg.MODEL.SEM_SEG_LOSS.NAMES]
        weights = list(cfg.MODEL.SEM_SEG_LOSS.WEIGHTS) or [1.0] * len(names)
        self.losses = {n: w for n, w in zip(names, weights) if n in ("ce", "dice")}
        dropped = sorted(set(names) - set(self.losses))
        if dropped:
            self.notes.append(f"reference loss has no {dropped}; uses {sorted(self.losses)}")
        if not self.losses:
            self.losses = {"ce": 1.0}

    def batch_tensors(self) -> list:
        return [self.x, self.y]

    def set_batch(self, data: SyntheticBatch) -> None:
        self.x = (data.images - self.mean) / self.std
        self.y = data.sem_seg.clamp(max=max(self.num_classes - 1, 1))

    def _loss(self) -> Tensor:
        out = semantic_logits(self._model(self.x))
        if self.num_classes == 1:
            return F.binary_cross_entropy_with_logits(out[:, 0].float(), self.y.float())
        loss = 0.0
        if "ce" in self.losses:
            loss = loss + self.losses["ce"] * F.cross_entropy(out.float(), self.y,
                                                              ignore_index=self.ignore)
        if "dice" in self.losses:
            loss = loss + self.losses["dice"] * _soft_dice(out, self.y, self.ignore)
        return loss

    def set_infer_batch(self, data: SyntheticBatch) -> None:
        self.x_infer = (data.images - self.mean) / self.std

    def _forward_eval(self) -> object:
        return semantic_logits(self._model(self.x_infer))


def configure_tv_maskrcnn(model: nn.Module, cfg) -> nn.Module:
    """Set torchvision Mask R-CNN's proposal, sampling and detection limits from a detectron2
    config, so that it keeps as many proposals and detections as the d2seg model beside it:
    the RPN's pre-NMS top-k per level and post-NMS top-k per image (train / test), its NMS
    threshold and sampled anchors; the ROI heads' sampled proposals, score and NMS thresholds
    and detections per image. torchvision's defaults differ from detectron2's in places (2000
    proposals per training image against detectron2's 1000; 100 detections against a config's
    50). Returns ``model`` (changed in place)."""
    rpn, heads = model.rpn, model.roi_heads
    r, h = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    rpn._pre_nms_top_n = {"training": int(r.PRE_NMS_TOPK_TRAIN),
                          "testing": int(r.PRE_NMS_TOPK_TEST)}
    rpn._post_nms_top_n = {"training": int(r.POST_NMS_TOPK_TRAIN),
                           "testing": int(r.POST_NMS_TOPK_TEST)}
    rpn.nms_thresh = float(r.NMS_THRESH)
    rpn.fg_bg_sampler.batch_size_per_image = int(r.BATCH_SIZE_PER_IMAGE)
    rpn.fg_bg_sampler.positive_fraction = float(r.POSITIVE_FRACTION)
    heads.fg_bg_sampler.batch_size_per_image = int(h.BATCH_SIZE_PER_IMAGE)
    heads.fg_bg_sampler.positive_fraction = float(h.POSITIVE_FRACTION)
    heads.score_thresh = float(h.SCORE_THRESH_TEST)
    heads.nms_thresh = float(h.NMS_THRESH_TEST)
    heads.detections_per_img = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    return model


class TorchMaskRCNNSubject(_TorchSubject):
    """torchvision ``maskrcnn_resnet50_fpn`` (random init), resizing set to keep the
    benchmark's image size (its transform still runs, as for any torchvision user), proposal
    and detection limits from the config (:func:`configure_tv_maskrcnn`)."""

    def __init__(self, cfg, device: torch.device, precision: str):
        name = "tv_maskrcnn_r50_fpn"
        model = configure_tv_maskrcnn(
            build_reference(name, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)), cfg)
        super().__init__(name, REFERENCES[name].description, "instance", device, precision,
                         model, cfg)

    def _resize_to(self, data: SyntheticBatch) -> None:
        self._model.transform.min_size = (min(data.h, data.w),)
        self._model.transform.max_size = max(data.h, data.w)

    def set_batch(self, data: SyntheticBatch) -> None:
        self._resize_to(data)
        self.images = [im / 255.0 for im in data.images]
        self.targets = [{"boxes": t["boxes"], "labels": t["classes"] + 1,
                         "masks": t["masks"].to(torch.uint8)} for t in data.instances]

    def batch_tensors(self) -> list:
        return [self.images, self.targets]

    def _loss(self) -> Tensor:
        return sum(self._model(self.images, self.targets).values())

    def set_infer_batch(self, data: SyntheticBatch) -> None:
        self._resize_to(data)
        self.images_infer = [im / 255.0 for im in data.images]

    def _forward_eval(self) -> object:
        return self._model(self.images_infer)

    def detections(self, outputs: object) -> Optional[List[int]]:
        return [len(o["boxes"]) for o in outputs] if isinstance(outputs, list) else None


def build_reference_subject(name: str, cfg, device: torch.device, precision: str) -> Subject:
    """The subject for reference ``name`` ("plain_d2" or a key of ``REFERENCES``)."""
    if name == "plain_d2":
        return PlainD2Subject(cfg, device, precision)
    if name == "tv_maskrcnn_r50_fpn":
        return TorchMaskRCNNSubject(cfg, device, precision)
    if name in REFERENCES and REFERENCES[name].task == "semantic":
        return TorchSemanticSubject(name, cfg, device, precision)
    raise ValueError(f"unknown reference '{name}'")
