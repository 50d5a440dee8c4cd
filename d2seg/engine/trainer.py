"""d2seg's trainer: detectron2's ``DefaultTrainer`` with d2seg's data loaders and evaluators."""
from __future__ import annotations

import logging
import os
import weakref
from typing import List, Optional

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..data import build as data_build
from .checkpoint import D2SegCheckpointer
from .train_step import GuardedAMPTrainer, GuardedSimpleTrainer
from ..data.catalogs import prepare_dataset

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "build_evaluators", "evaluator_types"]

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


def load_sem_seg_gt(filename: str, dtype=int) -> np.ndarray:
    """Read a label PNG as an integer array (H, W).

    detectron2 0.7's ``SemSegEvaluator`` reads with ``np.array(..., copy=False)``, which NumPy 2
    rejects for PIL images; every SemSegEvaluator d2seg builds uses this loader instead.
    """
    from detectron2.utils.file_io import PathManager

    with PathManager.open(filename, "rb") as f:
        return np.asarray(Image.open(f), dtype=dtype)


def _sem_seg_metrics_evaluator(dataset_name: str, output_folder: str) -> Optional[DatasetEvaluator]:
    try:
        from ..evaluation.sem_seg_metrics import SemSegMetricsEvaluator
    except ImportError:  # pragma: no cover - only while the module is absent
        return None
    return SemSegMetricsEvaluator(dataset_name, distributed=True, output_dir=output_folder)


def build_evaluators(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """The evaluators a dataset's ``evaluator_type`` calls for.

    * ``sem_seg``: detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC) and d2seg's
      ``SemSegMetricsEvaluator`` (per-class IoU/Dice, mDice, ...).
    * ``coco``: ``COCOEvaluator`` (bbox, and segm when ``MODEL.MASK_ON``).
    * ``coco_panoptic_seg``: ``COCOPanopticEvaluator`` (PQ/SQ/RQ) + ``COCOEvaluator`` on the
      things + ``SemSegEvaluator`` on the stuff map, as detectron2's own train_net does.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    prepare_dataset(dataset_name)  # COCOEvaluator reads json_file at construction
    types = evaluator_types(dataset_name)
    evaluators: List[DatasetEvaluator] = []
    if "sem_seg" in types or "coco_panoptic_seg" in types:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                          sem_seg_loading_fn=load_sem_seg_gt))
    if "sem_seg" in types:
        extra = _sem_seg_metrics_evaluator(dataset_name, output_folder)
        if extra is not None:
            evaluators.append(extra)
    if "coco" in types or "coco_panoptic_seg" in types:
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators.append(COCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                                        output_dir=output_folder))
    if "coco_panoptic_seg" in types:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` that picks evaluators by ``evaluator_type`` and uses d2seg's loaders.

    Everything else (hooks, checkpointing, LR schedule, AMP through ``SOLVER.AMP.ENABLED``,
    DDP) is detectron2's.
    """

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
        cls = GuardedAMPTrainer if isinstance(old, AMPTrainer) else GuardedSimpleTrainer
        self._trainer = cls(old.model, old.data_loader, old.optimizer)
        self._trainer.configure_guard(
            cfg.D2SEG.NONFINITE.MAX_SKIPS, cfg.D2SEG.NONFINITE.REPORT_IMAGES
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: Optional[str] = None):
        return build_evaluators(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return data_build.build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return data_build.build_test_loader(cfg, dataset_name)
