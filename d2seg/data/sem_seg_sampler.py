"""Repeat-factor sampling for semantic segmentation data (class imbalance).

detectron2's ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`` reads
instance annotations; semantic datasets only have label maps, so the class frequencies come
from the masks here and the factors feed detectron2's ``RepeatFactorTrainingSampler``.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .image_io import read_sem_seg

__all__ = ["classes_per_image", "repeat_factors_from_sem_seg", "build_sem_seg_repeat_sampler"]

logger = logging.getLogger(__name__)


def classes_per_image(dataset_dicts: Sequence[Dict], *, ignore_label: Optional[int] = 255,
                      min_pixels: int = 1) -> List[List[int]]:
    """Per dict, the sorted class ids with at least ``min_pixels`` pixels in its label map."""
    out = []
    for d in dataset_dicts:
        if "sem_seg_file_name" not in d:
            raise ValueError(f"{d.get('file_name')}: no 'sem_seg_file_name'; semantic repeat "
                             "factors need label maps")
        m = read_sem_seg(d["sem_seg_file_name"])
        ids, counts = np.unique(m, return_counts=True)
        keep = counts >= max(int(min_pixels), 1)
        if ignore_label is not None:
            keep &= ids != ignore_label
        out.append([int(i) for i in ids[keep]])
    return out


def repeat_factors_from_sem_seg(
    dataset_dicts: Sequence[Dict],
    repeat_thresh: float,
    *,
    ignore_label: Optional[int] = 255,
    min_pixels: int = 1,
    sqrt: bool = True,
) -> torch.Tensor:
    """One repeat factor per image, LVIS-style (Gupta et al., 2019), from label maps.

    f_c = share of images containing class c; r_c = max(1, (t / f_c) ** 0.5) (or t / f_c with
    ``sqrt=False``); an image's factor is the max r_c over its classes (1 if it has none).
    """
    if repeat_thresh <= 0:
        raise ValueError(f"DATALOADER.REPEAT_THRESHOLD must be > 0 for repeat-factor sampling "
                         f"(0 repeats nothing), got {repeat_thresh}")
    present = classes_per_image(dataset_dicts, ignore_label=ignore_label, min_pixels=min_pixels)
    n = max(len(present), 1)
    freq: Dict[int, float] = {}
    for cls in present:
        for c in cls:
            freq[c] = freq.get(c, 0.0) + 1.0 / n
    rep = {c: max(1.0, (repeat_thresh / f) ** 0.5 if sqrt else repeat_thresh / f)
           for c, f in freq.items()}
    logger.info("Semantic repeat factors per class: "
                + ", ".join(f"{c}: f={freq[c]:.3f} r={rep[c]:.2f}" for c in sorted(rep)))
    factors = [max([rep[c] for c in cls], default=1.0) for cls in present]
    return torch.tensor(factors, dtype=torch.float32)


def build_sem_seg_repeat_sampler(cfg: CfgNode, dataset_dicts: Sequence[Dict]
                                 ) -> RepeatFactorTrainingSampler:
    """detectron2's ``RepeatFactorTrainingSampler`` with :func:`repeat_factors_from_sem_seg`."""
    factors = repeat_factors_from_sem_seg(
        dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD,
        ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        min_pixels=cfg.DATALOADER.SEM_SEG_REPEAT_MIN_PIXELS,
        sqrt=cfg.DATALOADER.REPEAT_SQRT,
    )
    logger.info(f"SemSegRepeatFactorTrainingSampler: {len(factors)} images, expected "
                f"{float(factors.sum()):.1f} samples per epoch")
    return RepeatFactorTrainingSampler(factors, seed=cfg.SEED if cfg.SEED >= 0 else None)
