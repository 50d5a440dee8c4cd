"""d2seg's trainer: detectron2's ``DefaultTrainer`` with d2seg's data loaders and evaluators."""
from __future__ import annotations

import logging
import os
import random
import warnings
import weakref
from typing import Callable, List, Optional

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer
from detectron2.engine import defaults as _d2_defaults
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
)
from detectron2.utils import comm
from detectron2.utils.events import TensorboardXWriter

from ..data import build as data_build
from . import fast_paths
from .checkpoint import D2SegCheckpointer
from .train_step import GuardedAMPTrainer, GuardedSimpleTrainer
from ..data.catalogs import prepare_dataset
from ..evaluation.coco_backend import coco_evaluator_kwargs
from ..evaluation.sem_seg_evaluator import SemSegEvaluator, load_sem_seg_gt
from ..evaluation.sem_seg_metrics import SemSegMetricsEvaluator

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "build_evaluators", "evaluation_tasks", "evaluator_types"]

KNOWN_EVALUATOR_TYPES = ("coco", "sem_seg", "coco_panoptic_seg")


def evaluator_types(dataset_name: str) -> List[str]:
    """The dataset's ``evaluator_type`` metadata as a list (a str, a comma list or a list)."""
    meta = MetadataCatalog.get(dataset_name)
    et = getattr(meta, "evaluator_type", None)
    if et is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has no 'evaluator_type' in its metadata; set it to one "
            f"or more of {KNOWN_EVALUATOR_TYPES} (MetadataCatalog.get(name).evaluator_type)"
        )
    types = [t.strip() for t in et.split(",")] if isinstance(et, str) else list(et)
    for t in types:
        if t not in KNOWN_EVALUATOR_TYPES:
            raise ValueError(
                f"Dataset '{dataset_name}': evaluator_type '{t}' is not one of "
                f"{KNOWN_EVALUATOR_TYPES}"
            )
    return types


def evaluation_tasks(cfg: CfgNode, dataset_name: str) -> List[str]:
    """The result keys :func:`build_evaluators` produces for the dataset, in its order:
    "sem_seg" (detectron2's SemSegEvaluator metrics), "sem_seg_metrics" (d2seg's), "bbox",
    "segm"
    (COCOEvaluator, "segm" with ``MODEL.MASK_ON``), "panoptic_seg" (COCOPanopticEvaluator)."""
    types = evaluator_types(dataset_name)
    tasks = []
    if "sem_seg" in types or "coco_panoptic_seg" in types:
        tasks.append("sem_seg")
    if "sem_seg" in types:
        tasks.append("sem_seg_metrics")
    if "coco" in types or "coco_panoptic_seg" in types:
        tasks += ["bbox", "segm"] if cfg.MODEL.MASK_ON else ["bbox"]
    if "coco_panoptic_seg" in types:
        tasks.append("panoptic_seg")
    return tasks


def build_evaluators(cfg: CfgNode, dataset_name: str,
                     output_folder: Optional[str] = None) -> DatasetEvaluator:
    """The evaluators a dataset's ``evaluator_type`` calls for.

    * ``sem_seg``: d2seg's ``SemSegEvaluator``: detectron2's results (mIoU, fwIoU, mACC, pACC)
      under "sem_seg" and d2seg's ``SemSegMetricsEvaluator`` (per-class IoU/Dice, mDice,
      boundary IoU) under "sem_seg_metrics", from one reading of each label map
      (``D2SEG.EVAL.SEM_SEG_PREDICTIONS_JSON`` adds detectron2's RLE predictions file).
    * ``coco``: ``COCOEvaluator`` (bbox, and segm when ``MODEL.MASK_ON``), computed by the
      implementation ``D2SEG.EVAL.COCO_BACKEND`` selects (see ``d2seg.evaluation.coco_backend``).
    * ``coco_panoptic_seg``: ``COCOPanopticEvaluator`` (PQ/SQ/RQ) + ``COCOEvaluator`` on the
      things + ``SemSegEvaluator`` on the stuff map, as detectron2's own train_net does.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    prepare_dataset(dataset_name)  # COCOEvaluator reads json_file at construction
    tasks = evaluation_tasks(cfg, dataset_name)
    evaluators: List[DatasetEvaluator] = []
    if "sem_seg" in tasks:
        metrics = (SemSegMetricsEvaluator(
            dataset_name, distributed=True, output_dir=output_folder,
            surface_distance=bool(cfg.D2SEG.EVAL.SURFACE_DISTANCE),
            pixel_spacing=tuple(cfg.D2SEG.EVAL.PIXEL_SPACING))
                   if "sem_seg_metrics" in tasks else None)
        evaluators.append(SemSegEvaluator(
            dataset_name, distributed=True, output_dir=output_folder,
            sem_seg_loading_fn=load_sem_seg_gt, metrics=metrics,
            write_predictions=bool(cfg.D2SEG.EVAL.SEM_SEG_PREDICTIONS_JSON)))
    if "bbox" in tasks:
        evaluators.append(COCOEvaluator(dataset_name,
                                        tasks=tuple(t for t in tasks if t in ("bbox", "segm")),
                                        distributed=True, output_dir=output_folder,
                                        **coco_evaluator_kwargs(cfg.D2SEG.EVAL.COCO_BACKEND)))
    if "panoptic_seg" in tasks:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _rng_snapshot() -> tuple:
    """This process's RNG states as the libraries return them (cheap: every iteration)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None  # the current device's generator only
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng_snapshot(snap: tuple) -> None:
    py, npy, cpu, cuda = snap
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def get_rng_state(snapshot: Optional[tuple] = None) -> dict:
    """This process's python / numpy / torch (and current CUDA device's) RNG states, as plain
    types and tensors (checkpoints load with ``torch.load(weights_only=True)``); of
    ``snapshot`` (:func:`_rng_snapshot`) when given."""
    py, (name, keys, pos, has_gauss, gauss), cpu, cuda = snapshot or _rng_snapshot()
    state = {"python": py,
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "torch": cpu}
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's
            i = torch.cuda.current_device()
            if i >= len(cuda):
                return
            cuda = cuda[i]
        torch.cuda.set_rng_state(cuda)


# detectron2's DefaultTrainer writes metrics (PeriodicWriter) every 20 iterations
_WRITER_PERIOD = 20


def _strict_iterations(cfg, trainer) -> Callable[[int], bool]:
    """The iterations whose losses a "lagged" non-finite check still checks before the update:
    those that save a checkpoint (periodic or best), evaluate, compute the validation loss,
    write metrics, and the last one."""
    periods = [p for p in (_WRITER_PERIOD, int(cfg.SOLVER.CHECKPOINT_PERIOD),
                           int(cfg.TEST.EVAL_PERIOD), int(cfg.D2SEG.VAL_LOSS_PERIOD)) if p > 0]

    def check_now(it: int) -> bool:
        nxt = it + 1
        return nxt >= trainer.max_iter or any(nxt % p == 0 for p in periods)

    return check_now


def _create_ddp_model_cpu_aware(model, *, fp16_compression: bool = False, **kwargs):
    """detectron2's ``create_ddp_model``, also for CPU models (gloo): no ``device_ids`` there.

    detectron2 0.7 always passes ``device_ids=[local_rank]``, which DDP rejects for CPU modules,
    so ``--num-gpus N`` could not train on a machine without GPUs.
    """
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        param = next(model.parameters(), None)
        if param is not None and param.device.type == "cpu":
            kwargs["device_ids"] = None
    return _d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


# DefaultTrainer.__init__ looks the function up in its module at call time.
_d2_defaults.create_ddp_model = _create_ddp_model_cpu_aware


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` that picks evaluators by ``evaluator_type`` and uses d2seg's loaders.

    Everything else (hooks, checkpointing, LR schedule, AMP through ``SOLVER.AMP.ENABLED``,
    DDP) is detectron2's.
    """

    def __init__(self, cfg):
        with warnings.catch_warnings():
            # DefaultTrainer's AMPTrainer makes a CUDA GradScaler, which warns on a CPU-only
            # machine; build_hooks replaces that trainer and its scaler (_install_reliability)
            warnings.filterwarnings("ignore", message=r"torch\.cuda\.amp\.GradScaler is enabled, "
                                    r"but CUDA is not available")
            # ... through the torch.cuda.amp alias that torch now flags as deprecated
            warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)`"
                                    r" is deprecated", category=FutureWarning)
            super().__init__(cfg)

    def build_writers(self):
        """detectron2's writers (console, ``metrics.json``, TensorBoard), with TensorBoard's
        event file opened now rather than at the first write.

        detectron2's ``TensorboardXWriter`` imports ``torch.utils.tensorboard`` and creates its
        ``SummaryWriter`` lazily, in the first ``PeriodicWriter`` call (iteration 19): a pause
        of 70 ms on a 2-core CPU (most of it the import) in the middle of training, during
        which the GPU runs dry. Here it happens while the trainer is built. So does the first
        write's other one-time cost: ``CommonMetricPrinter``'s ``np.median`` imports
        ``numpy.ma`` lazily (15 of the first write's 18 ms on the same CPU; later writes 2 ms).
        """
        import numpy.ma  # noqa: F401  (see above)

        writers = super().build_writers()
        for w in writers:
            if isinstance(w, TensorboardXWriter):
                getattr(w, "_writer", None)  # detectron2's cached_property: opened once
        return writers

    def build_hooks(self):
        """detectron2's default hooks, plus d2seg's (see :func:`d2seg.engine.hooks.extend_hooks`)."""
        from .hooks import extend_hooks

        self._install_reliability()
        return extend_hooks(self, super().build_hooks())

    def _install_reliability(self) -> None:
        # DefaultTrainer.__init__ builds the checkpointer and the inner trainer right before it
        # calls build_hooks (whose PeriodicCheckpointer captures the checkpointer): replace them
        # here by a crash-safe checkpointer and a non-finite-guarded trainer over the same
        # model, data loader and optimizer.
        cfg = self.cfg
        self.checkpointer = D2SegCheckpointer(
            self.checkpointer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        old = self._trainer
        # AMP (SOLVER.AMP.ENABLED) with the dtype of D2SEG.SPEED.AMP_DTYPE, on CUDA or (bf16) CPU
        dtype = fast_paths.amp_dtype(cfg) if isinstance(old, AMPTrainer) else None
        if dtype is not None:
            device = fast_paths.resolve(cfg).device
            self._trainer = GuardedAMPTrainer(
                old.model, old.data_loader, old.optimizer, precision=dtype,
                grad_scaler=fast_paths.make_grad_scaler(dtype, device))
            # clipping (inside optimizer.step) must see unscaled gradients, fused or not
            self._trainer.unscale_before_step = bool(cfg.SOLVER.CLIP_GRADIENTS.ENABLED)
        else:
            self._trainer = GuardedSimpleTrainer(old.model, old.data_loader, old.optimizer)
        self._trainer.configure_guard(
            cfg.D2SEG.NONFINITE.MAX_SKIPS, cfg.D2SEG.NONFINITE.REPORT_IMAGES,
            lagged=fast_paths.resolve(cfg).nonfinite_check == "lagged",
            check_now=_strict_iterations(cfg, weakref.proxy(self)),
        )

    @classmethod
    def build_model(cls, cfg: CfgNode):
        """detectron2's ``build_model``, then ``D2SEG.FINETUNE.FREEZE`` (d2seg/checkpoint.py),
        then the fast paths of ``D2SEG.SPEED`` (d2seg/engine/fast_paths.py: cuDNN benchmark /
        TF32 for this model family, channels_last, torch.compile)."""
        from ..checkpoint import freeze_parameters

        from ..modeling.postprocessing import attach_postprocessor

        plan = fast_paths.configure_backends(cfg)
        model = super().build_model(cfg)
        attach_postprocessor(model, cfg)  # MODEL.SEM_SEG_POSTPROCESS for SemanticSegmentor
        freeze_parameters(model, cfg.D2SEG.FINETUNE.FREEZE)
        fast_paths.prepare_model(model, cfg, plan)
        logger.info("Fast paths: %s", fast_paths.describe(cfg))
        return model

    def resume_or_load(self, resume: bool = True):
        """detectron2's; but a new training (not resuming) loads ``MODEL.WEIGHTS`` with d2seg's
        fine-tuning loader (torchvision ResNets; skipped head weights in one log line)."""
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            fast_paths.prime_momentum_buffers(self.optimizer)  # a state without buffers
            if self.start_iter > 0:  # continue the data order where the checkpoint left it
                workers = self.cfg.DATALOADER.NUM_WORKERS
                if (self.cfg.DATALOADER.ASPECT_RATIO_GROUPING and workers > 1
                        and self.start_iter % workers):
                    logger.warning(
                        "Resuming at iteration %d: with ASPECT_RATIO_GROUPING and %d workers the "
                        "data order continues exactly only from iterations that are multiples "
                        "of DATALOADER.NUM_WORKERS (choose SOLVER.CHECKPOINT_PERIOD so); it is "
                        "approximately continued here", self.start_iter, workers)
                self._trainer.reset_data_loader(
                    lambda: data_build.build_train_loader(self.cfg, start_iter=self.start_iter))
            rng = getattr(self, "_loaded_rng_state", None)
            if rng is not None:
                # starting the data loader draws from the RNGs (worker seeds): restore them
                # once the first batch has arrived, right before the first resumed step
                self._trainer.after_next_batch_once(lambda: set_rng_state(rng))
            return
        from ..checkpoint import FinetuneCheckpointer

        FinetuneCheckpointer(self.checkpointer.model).load(self.cfg.MODEL.WEIGHTS,
                                                           checkpointables=[])

    def after_step(self):
        """detectron2's hooks; what they draw from the RNGs (evaluation, the validation loss
        and PreciseBN start data loaders, which seed their workers from torch's generator, and
        sample) is undone afterwards. The next step then starts from the states that the
        checkpoint of this iteration records, so a resumed run continues the uninterrupted
        run's random streams also where it evaluated, and the evaluation period does not
        change training."""
        self._rng_after_step = _rng_snapshot()
        try:
            super().after_step()
        finally:
            _restore_rng_snapshot(self._rng_after_step)
            self._rng_after_step = None

    def rng_state(self) -> dict:
        """The RNG states a checkpoint records: those of the end of the current step (before
        the hooks) while the hooks run, else the current ones."""
        return get_rng_state(getattr(self, "_rng_after_step", None))

    def state_dict(self):
        """detectron2's trainer state plus the RNG states (python, numpy, torch, CUDA) of the
        end of the step (:meth:`rng_state`): this process's, and in a distributed run every
        process's (gathered by :class:`~d2seg.engine.hooks.SyncAcrossRanks` at this
        iteration)."""
        ret = super().state_dict()
        ret["rng"] = self.rng_state()
        gathered = getattr(self, "rank_rng_states", None)
        if gathered is not None and gathered[0] == self.iter:
            ret["rng_per_rank"] = gathered[1]
        return ret

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if not comm.is_main_process():  # hooks that run on rank 0 only (BestCheckpointer)
            mine = {type(h).__qualname__ for h in self._hooks}
            state_dict["hooks"] = {k: v for k, v in state_dict.get("hooks", {}).items()
                                   if k in mine}
        super().load_state_dict(state_dict)
        # applied by resume_or_load once the data loader has started: this process's own
        # states where the checkpoint has every process's (same world size), else rank 0's
        per_rank = state_dict.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == comm.get_world_size():
            self._loaded_rng_state = per_rank[comm.get_rank()]
        else:
            self._loaded_rng_state = state_dict.get("rng")

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model):
        """detectron2's SGD, or Adam / AdamW with ``SOLVER.OPTIMIZER`` (same parameter groups,
        weight-decay rules and gradient clipping as detectron2's); fused / foreach / for-loop
        implementation from ``D2SEG.SPEED.OPTIMIZER_IMPL`` (d2seg/engine/fast_paths.py)."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name not in ("SGD", "ADAM", "ADAMW"):
            raise ValueError(f"SOLVER.OPTIMIZER must be SGD, ADAM or ADAMW, got '{cfg.SOLVER.OPTIMIZER}'")
        betas = tuple(cfg.SOLVER.BETAS)
        if name != "SGD" and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"SOLVER.BETAS must be two numbers in [0, 1) for {name}, got "
                             f"{cfg.SOLVER.BETAS}")
        from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR, weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        impl = fast_paths.optimizer_impl_kwargs(cfg, params)
        if name == "SGD":  # as detectron2's build_optimizer (which always uses foreach)
            opt = maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
                params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **impl)
            fast_paths.prime_momentum_buffers(opt)  # fused SGD + fp16 grad scaler: see there
            return opt
        opt_cls = torch.optim.Adam if name == "ADAM" else torch.optim.AdamW
        return maybe_add_gradient_clipping(cfg, opt_cls)(
            params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY, **impl)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        """detectron2's schedulers plus ``SOLVER.LR_SCHEDULER_NAME: "WarmupPolyLR"`` (the
        DeepLab / SegFormer poly schedule: ``(1 - iter / MAX_ITER) ** SOLVER.POLY_LR_POWER``,
        from ``detectron2.projects.deeplab``)."""
        from detectron2.projects.deeplab import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        return build_evaluators(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model):
        """Evaluate ``model`` on DATASETS.TEST with test-time augmentation (detectron2's
        ``tools/train_net.py`` convention, run by train_net when ``TEST.AUG.ENABLED``).

        R-CNN models: detectron2's ``GeneralizedRCNNWithTTA`` (``TEST.AUG.*``); semantic models:
        :class:`d2seg.inference.SemanticSegmentorWithTTA` (flip, ``D2SEG.INFERENCE.ROT90``, SCALES,
        sliding windows). Returns the evaluators' results with "_TTA" appended to each task
        name; evaluator files go to OUTPUT_DIR/inference_TTA. Panoptic FPN has no TTA: {}.
        """
        from collections import OrderedDict

        from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
        from detectron2.modeling.meta_arch.panoptic_fpn import PanopticFPN

        from ..inference import SemanticSegmentorWithTTA, is_semantic_model

        inner = model.module if hasattr(model, "module") else model
        if is_semantic_model(inner):
            tta = SemanticSegmentorWithTTA(cfg, inner)
        elif isinstance(inner, GeneralizedRCNN) and not isinstance(inner, PanopticFPN):
            tta = GeneralizedRCNNWithTTA(cfg, inner)
        else:
            logger.warning("TEST.AUG.ENABLED: no test-time augmentation for %s; skipped",
                           type(inner).__name__)
            return OrderedDict()
        logger.info("Evaluating with test-time augmentation (%s)", type(tta).__name__)
        evaluators = [cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA",
                                                                  name))
                      for name in cfg.DATASETS.TEST]
        res = cls.test(cfg, tta.eval(), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0):
        return data_build.build_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return data_build.build_test_loader(cfg, dataset_name)
