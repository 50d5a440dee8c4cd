"""Training hooks d2seg adds to detectron2's defaults.

* :class:`ValidationLoss` (``D2SEG.VAL_LOSS_PERIOD``): the training losses on
  ``DATASETS.TEST``, logged as ``val_total_loss`` and ``val_<loss>`` (to ``metrics.json``, the
  console and TensorBoard, like every scalar).
* :class:`BestCheckpointer` (``D2SEG.BEST_CHECKPOINT``): detectron2's, keeping
  ``OUTPUT_DIR/model_best.pth`` by a chosen metric without redirecting ``last_checkpoint``.
* :class:`PlotCurves` (``D2SEG.PLOT_CURVES``): losses, learning rate and metrics drawn to
  ``OUTPUT_DIR/curves.png`` after training (:func:`plot_metrics_json` redraws from
  ``metrics.json``).
* :class:`SyncAcrossRanks` (distributed runs only): one BatchNorm state for evaluation and
  checkpoints, every process's RNG states in the checkpoint.

TensorBoard event files come from detectron2's default writers (``TensorboardXWriter`` in
``OUTPUT_DIR``): ``tensorboard --logdir OUTPUT_DIR``.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..config import best_checkpoint_mode

logger = logging.getLogger(__name__)

__all__ = ["extend_hooks", "ValidationLoss", "BestCheckpointer", "PlotCurves", "SyncAcrossRanks",
           "average_norm_statistics", "build_val_loss_loader", "plot_curves", "plot_metrics_json"]


# ----------------------------------------------------------------------------------------
# validation loss
# ----------------------------------------------------------------------------------------
def build_val_loss_loader(cfg: CfgNode, dataset_names: Sequence[str]):
    """Loader of ``dataset_names`` with ground truth and test-time resizing only.

    Semantic mapper ("sem_seg"): ``SemSegDatasetMapper(is_train=False, load_gt_in_eval=True)``;
    otherwise detectron2's ``DatasetMapper`` in training mode (annotations kept) with the
    ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` of inference. Invalid annotations are
    skipped as in training (:func:`d2seg.data.checks.filter_invalid_annotations`).
    """
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.data import get_detection_dataset_dicts
    from detectron2.data import transforms as T

    from ..data.checks import filter_invalid_annotations

    if cfg.INPUT.DATASET_MAPPER_NAME == "sem_seg":
        from ..data.sem_seg_mapper import SemSegDatasetMapper

        mapper = SemSegDatasetMapper(cfg, False, load_gt_in_eval=True)
    else:
        augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)] \
            if cfg.INPUT.MIN_SIZE_TEST > 0 else []
        from ..data.build import _ImageFileMapper

        # (marked as build_mapper marks it: a grey model's 16-bit images scaled as in training)
        mapper = _ImageFileMapper(DatasetMapper(cfg, True, augmentations=augs))
    dicts = get_detection_dataset_dicts(list(dataset_names), filter_empty=False)
    dicts = filter_invalid_annotations(dicts, ",".join(dataset_names))
    return build_detection_test_loader(dataset=dicts, mapper=mapper,
                                       num_workers=cfg.DATALOADER.NUM_WORKERS)


def _eval_in_validation() -> tuple:
    """Module types put in eval mode while the validation loss runs: normalisation (running
    statistics used, not updated) and everything random in training (dropout, torchvision's
    stochastic depth, SegFormer's attention dropout), so that the loss is deterministic."""
    from torchvision.ops import StochasticDepth

    from ..modeling.backbone.mit import EfficientSelfAttention

    return (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, StochasticDepth,
            EfficientSelfAttention)


_EVAL_IN_VALIDATION = _eval_in_validation()


class ValidationLoss(HookBase):
    """Mean training losses over a validation loader, every ``period`` iterations and after the
    last one; stored as ``val_<loss name>`` and ``val_total_loss``.

    The model runs in training mode (so it computes losses) under ``torch.no_grad`` and, with
    AMP, under the training step's autocast dtype, with its
    normalisation, dropout and stochastic-depth layers in eval mode: BatchNorm statistics are
    used, not updated, and the same weights give the same loss.
    In distributed runs every process computes its shard; the means are over all images.
    """

    def __init__(self, period: int, build_loader: Callable[[], Iterable]):
        """
        Args:
            period: iterations between computations; 0 = only after the last iteration.
            build_loader: returns the validation loader (called once, lazily).
        """
        self._period = int(period)
        self._build_loader = build_loader
        self._loader = None

    def _compute(self) -> Dict[str, float]:
        if self._loader is None:
            self._loader = self._build_loader()
        model = self.trainer.model
        was_training = model.training
        model.train()
        for m in model.modules():
            if isinstance(m, _EVAL_IN_VALIDATION):
                m.eval()
        sums: Dict[str, float] = collections.defaultdict(float)
        count = 0
        # the precision the training step runs in (AMP: its autocast dtype), so that the
        # validation loss compares with the training loss
        inner = getattr(self.trainer, "_trainer", None)
        dtype = getattr(inner, "precision", None) if hasattr(inner, "grad_scaler") else None
        param = next(model.parameters(), None)
        amp = torch.autocast(param.device.type, dtype=dtype) \
            if dtype is not None and param is not None else contextlib.nullcontext()
        try:
            # the heads' own statistics (R-CNN accuracies, sample counts) of validation
            # batches go to a storage of their own, not into the training iteration's values
            with torch.no_grad(), EventStorage(self.trainer.iter), amp:
                for batch in self._loader:
                    losses = model(batch)
                    for k, v in losses.items():
                        sums[k] += float(v) * len(batch)
                    count += len(batch)
        finally:
            model.train(was_training)
        gathered = comm.all_gather((dict(sums), count)) if comm.get_world_size() > 1 \
            else [(dict(sums), count)]
        total = sum(c for _, c in gathered)
        if total == 0:
            return {}
        keys = sorted({k for s, _ in gathered for k in s})
        means = {f"val_{k}": sum(s.get(k, 0.0) for s, _ in gathered) / total for k in keys}
        means["val_total_loss"] = sum(means.values())
        return means

    def _do(self) -> None:
        means = self._compute()
        if means:
            self.trainer.storage.put_scalars(**means, smoothing_hint=False)
            logger.info("Validation loss: " + ", ".join(f"{k}={v:.4f}" for k, v in means.items()))

    def after_step(self):
        nxt = self.trainer.iter + 1
        if self._period > 0 and nxt % self._period == 0 and nxt != self.trainer.max_iter:
            self._do()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._do()


# ----------------------------------------------------------------------------------------
# best checkpoint
# ----------------------------------------------------------------------------------------
class BestCheckpointer(hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer`` (saves ``<file_prefix>.pth`` when the metric improves),
    except that ``last_checkpoint`` (what ``--resume`` reads) keeps naming the last periodic
    checkpoint, a missing metric is reported with the metrics that do exist, and the best
    value so far is part of the trainer's checkpoint and of ``<file_prefix>.json`` beside
    ``<file_prefix>.pth`` (a resumed run does not replace ``model_best.pth`` by a worse
    model)."""

    def __init__(self, eval_period: int, checkpointer, val_metric: str, mode: str = "max",
                 file_prefix: str = "model_best"):
        super().__init__(eval_period, checkpointer, val_metric, mode, file_prefix)
        self._mode = mode

    def state_dict(self) -> Dict:
        if self.best_metric is None:
            return {}
        return {"best_metric": float(self.best_metric), "best_iter": int(self.best_iter)}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("best_metric") is not None:
            self.best_metric, self.best_iter = float(state["best_metric"]), int(state["best_iter"])

    def _record_path(self) -> str:
        return os.path.join(self._checkpointer.save_dir, f"{self._file_prefix}.json")

    def before_train(self) -> None:
        """A resumed run also knows the best that ``<file_prefix>.json`` records: a periodic
        checkpoint saved before the same iteration's evaluation, or the one resumed from
        when an evaluation after it improved the best, holds an older best."""
        if getattr(self.trainer, "start_iter", 0) <= 0 or not os.path.isfile(self._record_path()):
            return
        try:
            with open(self._record_path()) as f:
                rec = json.load(f)
            if rec.get("metric") != self._val_metric or rec.get("mode") != self._mode:
                return
            value, it = float(rec["best_metric"]), int(rec["best_iter"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if self.best_metric is None or self._compare(value, self.best_metric):
            self.best_metric, self.best_iter = value, it

    def _best_checking(self):
        latest = self.trainer.storage.latest()
        if self._val_metric not in latest:
            self._logger.warning(
                f"D2SEG.BEST_CHECKPOINT.METRIC '{self._val_metric}' was not computed; metrics "
                f"available: {sorted(k for k in latest if '/' in k or k.startswith('val_'))}")
            return
        value = latest[self._val_metric][0]
        if not math.isfinite(float(value)):  # e.g. AP of a model without detections yet
            self._logger.warning(
                f"D2SEG.BEST_CHECKPOINT.METRIC '{self._val_metric}' is {value} at iteration "
                f"{self.trainer.iter}: no {self._file_prefix}.pth for this evaluation")
            return
        before = (self.best_metric, self.best_iter)
        self._check_and_keep_last()
        if (self.best_metric, self.best_iter) != before and self._checkpointer.save_dir:
            from .checkpoint import atomic_write_bytes

            atomic_write_bytes(self._record_path(), json.dumps(
                {"metric": self._val_metric, "mode": self._mode,
                 "best_metric": float(self.best_metric), "best_iter": int(self.best_iter)},
                indent=1).encode())

    def _check_and_keep_last(self):
        ck = self._checkpointer
        previous = ck.get_checkpoint_file() if ck.has_checkpoint() else None
        super()._best_checking()
        tag = os.path.join(ck.save_dir, "last_checkpoint")
        if previous is not None:
            ck.tag_last_checkpoint(os.path.basename(previous))
        elif os.path.isfile(tag):
            os.remove(tag)


_TASK_METRICS = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "sem_seg": ("mIoU", "fwIoU", "mACC", "pACC"),
    "sem_seg_metrics": ("mIoU", "mDice", "pACC", "mBIoU", "mDiceImg", "mDiceImgSD"),
    "panoptic_seg": tuple(f"{m}{s}" for m in ("PQ", "SQ", "RQ") for s in ("", "_th", "_st")),
}
# per-class metrics: "<task>/<prefix>-<class name>"
_TASK_CLASS_PREFIXES = {"bbox": ("AP",), "segm": ("AP",), "sem_seg": ("IoU", "ACC"),
                        "sem_seg_metrics": ("IoU", "Dice", "BIoU", "DiceImg")}
# with D2SEG.EVAL.SURFACE_DISTANCE
_SURFACE_METRICS, _SURFACE_PREFIXES = ("mHD95", "mASSD"), ("HD95", "ASSD")


def evaluation_metric_names(cfg: CfgNode) -> Tuple[List[str], List[str]]:
    """(metric names, per-class name prefixes) that the evaluators of ``DATASETS.TEST`` report
    in the training storage, as detectron2 flattens them ("segm/AP"; with several test
    datasets "<dataset>/segm/AP")."""
    from .trainer import evaluation_tasks

    names: List[str] = []
    prefixes: List[str] = []
    for d in cfg.DATASETS.TEST:
        tasks = evaluation_tasks(cfg, d)
        lead = f"{d}/" if len(cfg.DATASETS.TEST) > 1 else ""
        surface = bool(cfg.D2SEG.EVAL.SURFACE_DISTANCE)
        names += [f"{lead}{t}/{m}" for t in tasks for m in _TASK_METRICS[t]
                  + (_SURFACE_METRICS if surface and t == "sem_seg_metrics" else ())]
        prefixes += [f"{lead}{t}/{p}-" for t in tasks for p in _TASK_CLASS_PREFIXES.get(t, ())
                     + (_SURFACE_PREFIXES if surface and t == "sem_seg_metrics" else ())]
    return names, prefixes


def _check_best_metric(cfg, metric: str) -> None:
    """Warn at start-up, not at the first evaluation, about a metric the evaluators do not
    report (a custom evaluator's metric may still be fine)."""
    import difflib

    if not metric or metric.startswith("val_") or not len(cfg.DATASETS.TEST):
        return
    try:
        names, prefixes = evaluation_metric_names(cfg)
    except Exception:  # noqa: BLE001 - an advisory check: never stop training over it
        return
    if not names or metric in names or any(metric.startswith(p) and len(metric) > len(p)
                                            for p in prefixes):
        return
    close = difflib.get_close_matches(metric, names, n=3, cutoff=0.6)
    logger.warning(
        f"D2SEG.BEST_CHECKPOINT.METRIC '{metric}' is not among the metrics the evaluators of "
        f"DATASETS.TEST report" + (f"; did you mean {' or '.join(repr(c) for c in close)}?"
                                   if close else f" ({', '.join(names[:8])}, ...)")
        + " model_best.pth is written only when that metric exists.")


# ----------------------------------------------------------------------------------------
# distributed runs: one model state to evaluate and save
# ----------------------------------------------------------------------------------------
def norm_statistics(model: nn.Module) -> List[torch.Tensor]:
    """The running statistics of the model's BatchNorm-like layers that training updates
    (``running_mean`` / ``running_var`` of ``_BatchNorm`` modules that track them)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out: List[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            out += [m.running_mean, m.running_var]
    return out


def average_norm_statistics(model: nn.Module) -> int:
    """Average the BatchNorm running statistics over all processes (in place); returns how
    many tensors. DDP leaves each process its own (``broadcast_buffers=False``, detectron2's
    choice), so without this each process would evaluate its share of the images with other
    statistics than the checkpoint rank 0 saves."""
    import torch.distributed as dist

    stats = norm_statistics(model)
    if not stats or comm.get_world_size() < 2:
        return 0
    with torch.no_grad():
        for dtype in sorted({t.dtype for t in stats}, key=str):  # same order on every rank
            group = [t for t in stats if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat /= comm.get_world_size()
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))
    return len(stats)


class SyncAcrossRanks(HookBase):
    """Distributed runs: before every iteration that saves a checkpoint, evaluates or computes
    the validation loss (and the last one), every process gets the same BatchNorm statistics
    (their mean), so that evaluation, ``model_best.pth`` and the saved checkpoint describe one
    model; at checkpoint iterations each process's RNG states are gathered into the trainer's
    checkpoint, so that ``--resume`` gives every process its own states back. Runs on every
    process, before detectron2's ``PeriodicCheckpointer``."""

    def __init__(self, checkpoint_period: int, other_periods: Sequence[int]):
        self._ckpt = int(checkpoint_period)
        self._periods = [int(p) for p in other_periods if int(p) > 0]

    def after_step(self) -> None:
        if comm.get_world_size() < 2:
            return
        nxt = self.trainer.iter + 1
        last = nxt >= self.trainer.max_iter
        ckpt = last or (self._ckpt > 0 and nxt % self._ckpt == 0)
        if ckpt or any(nxt % p == 0 for p in self._periods):
            model = self.trainer.model
            average_norm_statistics(getattr(model, "module", model))
        if ckpt:
            from .trainer import get_rng_state

            # d2seg's Trainer: the states of the step's end (what its checkpoint records)
            state = getattr(self.trainer, "rng_state", get_rng_state)()
            self.trainer.rank_rng_states = (self.trainer.iter, comm.all_gather(state))


# ----------------------------------------------------------------------------------------
# curves
# ----------------------------------------------------------------------------------------
_MAIN_METRICS = ("AP", "AP50", "mIoU", "fwIoU", "mDice", "mACC", "pACC", "PQ", "SQ", "RQ")


def _pick_metrics(names: Iterable[str], limit: int = 8) -> List[str]:
    names = sorted(n for n in names if "/" in n)
    main = [n for n in names if n.rsplit("/", 1)[1] in _MAIN_METRICS]
    return (main or names)[:limit]


def plot_curves(series: Dict[str, List[Tuple[int, float]]], out_path: str,
                title: str = "") -> Optional[str]:
    """Draw loss, learning-rate and metric curves to a PNG.

    Args:
        series: scalar name -> [(iteration, value)] (detectron2 storage names: "total_loss",
            "loss_*", "val_*", "lr", "bbox/AP", "sem_seg/mIoU", ...).
        out_path: the PNG to write.

    Returns:
        ``out_path``, or None when there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted(k for k in series if k == "total_loss" or k.startswith("loss_"))
    val = sorted(k for k in series if k.startswith("val_"))
    metrics = _pick_metrics(series)
    panels = [p for p in (("losses", losses + val), ("learning rate", ["lr"] if "lr" in series
                                                       else []), ("metrics", metrics)) if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for k in keys:
            pts = sorted(series[k])
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            style = "o-" if len(pts) <= 20 or "/" in k else "-"
            style = style.replace("-", "--") if k.startswith("val_") else style
            lw = 2.0 if k in ("total_loss", "val_total_loss") else 1.0
            ax.plot(xs, ys, style, label=k, linewidth=lw, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("iteration")
        if label == "losses" and all(v > 0 for k in keys for _, v in series[k]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def plot_metrics_json(metrics_json: str, out_path: str) -> Optional[str]:
    """:func:`plot_curves` from detectron2's ``metrics.json`` (one json record per line)."""
    series: Dict[str, List[Tuple[int, float]]] = collections.defaultdict(list)
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            it = rec.get("iteration")
            for k, v in rec.items():
                if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v):
                    series[k].append((it, float(v)))
    return plot_curves(series, out_path, os.path.dirname(os.path.abspath(metrics_json)))


class PlotCurves(HookBase):
    """After training, :func:`plot_curves` of every scalar in the trainer's storage."""

    def __init__(self, out_path: str):
        self._out = out_path

    def after_train(self):
        series = {}
        for name, buf in self.trainer.storage.histories().items():
            pts = [(int(it), float(v)) for v, it in buf.values() if math.isfinite(float(v))]
            if pts:
                series[name] = pts
        try:
            path = plot_curves(series, self._out, os.path.dirname(self._out))
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training
            logger.warning(f"Could not plot training curves to {self._out}: {e}")
            return
        if path:
            logger.info(f"Training curves written to {path}")


# ----------------------------------------------------------------------------------------
def extend_hooks(trainer, hooks_list: List[HookBase]) -> List[HookBase]:
    """Return ``hooks_list`` (detectron2's defaults for ``trainer``) with d2seg's hooks inserted.

    Order: ... ``EvalHook``, :class:`ValidationLoss`, :class:`BestCheckpointer`,
    :class:`PlotCurves`, then detectron2's writer hook (``PeriodicWriter``), which stays last so
    that it sees every metric.
    """
    cfg = trainer.cfg
    metric = cfg.D2SEG.BEST_CHECKPOINT.METRIC
    extra: List[HookBase] = []
    val_period = cfg.D2SEG.VAL_LOSS_PERIOD
    if len(cfg.DATASETS.TEST) and (val_period > 0 or metric.startswith("val_")):
        extra.append(ValidationLoss(
            val_period, lambda: build_val_loss_loader(cfg, cfg.DATASETS.TEST)))
    if comm.is_main_process():
        if metric:
            _check_best_metric(cfg, metric)
            mode = best_checkpoint_mode(metric, cfg.D2SEG.BEST_CHECKPOINT.MODE)
            if best_checkpoint_mode(metric, "auto") != mode:
                logger.warning(f"D2SEG.BEST_CHECKPOINT: keeping the checkpoint with the "
                               f"{'lowest' if mode == 'min' else 'highest'} '{metric}' "
                               f"(MODE {cfg.D2SEG.BEST_CHECKPOINT.MODE}); 'auto' would pick "
                               f"{'max' if mode == 'min' else 'min'}")
            period = val_period if metric.startswith("val_") else cfg.TEST.EVAL_PERIOD
            extra.append(BestCheckpointer(period, trainer.checkpointer, metric, mode))
        if cfg.D2SEG.PLOT_CURVES:
            extra.append(PlotCurves(os.path.join(cfg.OUTPUT_DIR, "curves.png")))
    writer_at = next((i for i, h in enumerate(hooks_list) if isinstance(h, hooks.PeriodicWriter)),
                     len(hooks_list))
    out = hooks_list[:writer_at] + extra + hooks_list[writer_at:]
    if comm.get_world_size() > 1:
        sync = SyncAcrossRanks(cfg.SOLVER.CHECKPOINT_PERIOD,
                               [cfg.TEST.EVAL_PERIOD, val_period])  # (and the best check's)
        at = next((i for i, h in enumerate(out) if isinstance(h, (hooks.PeriodicCheckpointer,
                                                                   hooks.EvalHook))), len(out))
        out.insert(at, sync)
    return out
