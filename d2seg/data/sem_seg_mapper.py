"""``SemSegDatasetMapper``: dataset dict -> model input for semantic segmentation."""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .errors import MapperSetupError
from .image_io import IntensityScaling, read_image, read_sem_seg
from .sem_seg_transforms import (
    ForegroundCenteredCrop,
    RandomElasticDeformation,
    RandomRot90,
    ResizeShortestEdge,
)

__all__ = ["SemSegDatasetMapper", "build_sem_seg_augmentation"]

FLIP_CHOICES = ("none", "horizontal", "vertical", "both")


def build_sem_seg_augmentation(cfg: CfgNode, is_train: bool) -> List[T.Augmentation]:
    """Augmentations from ``cfg.INPUT``.

    Training: ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING)``
    (detectron2's, but a no-op where the size stays; left out when MIN_SIZE_TRAIN is 0),
    then if ``CROP.ENABLED`` a crop of ``CROP.TYPE`` /
    ``CROP.SIZE`` (foreground-centred with ``FG_CROP``, else detectron2's
    ``RandomCrop_CategoryAreaConstraint`` with ``CROP.SINGLE_CATEGORY_MAX_AREA``), flips
    (``RANDOM_FLIP``: "none", "horizontal", "vertical" or "both"), ``RANDOM_ROT90`` and
    ``ELASTIC`` (the U-Net paper's elastic deformation, last so that it warps the crop).
    Inference: ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` unless MIN_SIZE_TEST is 0.
    """
    inp = cfg.INPUT
    augs: List[T.Augmentation] = []
    if not is_train:
        if inp.MIN_SIZE_TEST > 0:
            augs.append(ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice"))
        return augs
    min_sizes = inp.MIN_SIZE_TRAIN if isinstance(inp.MIN_SIZE_TRAIN, (list, tuple)) else [
        inp.MIN_SIZE_TRAIN]
    if any(s > 0 for s in min_sizes):
        augs.append(ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN,
                                       inp.MIN_SIZE_TRAIN_SAMPLING))
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if inp.FG_CROP.ENABLED and not inp.CROP.ENABLED:
        raise ValueError("INPUT.FG_CROP.ENABLED=True needs INPUT.CROP.ENABLED=True (it sets "
                         "the crop size)")
    if inp.CROP.ENABLED:
        if inp.FG_CROP.ENABLED:
            augs.append(ForegroundCenteredCrop(inp.CROP.TYPE, inp.CROP.SIZE, inp.FG_CROP.PROB,
                                               list(inp.FG_CROP.CLASSES), ignore))
        else:
            augs.append(T.RandomCrop_CategoryAreaConstraint(
                inp.CROP.TYPE, inp.CROP.SIZE, inp.CROP.SINGLE_CATEGORY_MAX_AREA, ignore))
    flip = inp.RANDOM_FLIP
    if flip not in FLIP_CHOICES:
        raise ValueError(f"INPUT.RANDOM_FLIP must be one of {FLIP_CHOICES}, got '{flip}'")
    if flip in ("horizontal", "both"):
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if flip in ("vertical", "both"):
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    if inp.RANDOM_ROT90:
        augs.append(RandomRot90())
    if inp.ELASTIC.ENABLED:
        augs.append(RandomElasticDeformation(inp.ELASTIC.GRID, inp.ELASTIC.STD, inp.ELASTIC.PROB))
    return augs


class SemSegDatasetMapper:
    """Read the image and its label map, augment both, return the model's input dict.

    Output: the dataset dict plus "image" (C, H, W) uint8 tensor and, when the dict has
    "sem_seg_file_name" and in training (or with ``load_gt_in_eval``), "sem_seg" (H, W) tensor
    of ``label_dtype`` (int64, detectron2's convention; uint8 with
    ``D2SEG.SPEED.COMPACT_LABELS``, which d2seg's segmentors widen on the device; image and
    uint8 labels are then views of one buffer). "height" / "width" keep the original size, so
    models predict at that size.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        image_format: str = "BGR",
        load_gt_in_eval: bool = False,
        label_dtype: torch.dtype = torch.int64,
        intensity: Optional[IntensityScaling] = None,
    ):
        """
        Args:
            is_train: training (random augmentations, ground truth loaded) or inference.
            augmentations: applied to image and label map together.
            image_format: ``detection_utils.read_image`` format (e.g. "BGR", "RGB", "L").
            load_gt_in_eval: also load "sem_seg" at inference (evaluators read the original
                ground truth themselves, so it is off by default).
            label_dtype: torch.int64 or torch.uint8 (no value lost: label maps with ids outside
                0-255 raise a ValueError naming the file). Label maps are read by
                :func:`~d2seg.data.image_io.read_sem_seg` (stored values are the ids).
            intensity: how images with more than 8 bits become 0-255 (``INPUT.INTENSITY``);
                None: the process's default (:func:`~d2seg.data.image_io.set_intensity_scaling`).
        """
        if label_dtype not in (torch.int64, torch.uint8):
            raise ValueError(f"label_dtype must be torch.int64 or torch.uint8, got {label_dtype}")
        self.label_dtype = label_dtype
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.load_gt_in_eval = load_gt_in_eval
        self.intensity = intensity
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[SemSegDatasetMapper] Augmentations used in {mode}: {list(augmentations)}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        from ..engine.fast_paths import resolve

        return {
            "is_train": is_train,
            "augmentations": build_sem_seg_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "label_dtype": torch.uint8 if resolve(cfg).compact_labels else torch.int64,
            "intensity": IntensityScaling.from_cfg(cfg),
        }

    def _narrow_labels(self, sem_seg: np.ndarray, path: str) -> np.ndarray:
        """Wide integer ids as uint8 when they fit (no value lost), else as float32, which
        detectron2's resize takes (its nearest resize refuses other integer types) and which
        holds every id below 2**24 exactly; int64 again after the augmentations."""
        lo, hi = (int(sem_seg.min()), int(sem_seg.max())) if sem_seg.size else (0, 0)
        if 0 <= lo and hi <= 255:
            return sem_seg.astype(np.uint8)
        if self.label_dtype == torch.uint8:
            raise MapperSetupError(f"{path}: label values {lo}..{hi} do not fit the uint8 "
                                   f"label maps of D2SEG.SPEED.COMPACT_LABELS; set it 'off' "
                                   f"for class ids outside 0-255")
        if max(-lo, hi) >= 2 ** 24:
            raise ValueError(f"{path}: label values {lo}..{hi}; class ids must lie below 2**24")
        return sem_seg.astype(np.float32)

    def __call__(self, dataset_dict: Dict) -> Dict:
        d = copy.deepcopy(dataset_dict)
        image = read_image(d["file_name"], format=self.image_format, scale=True,
                           scaling=self.intensity)
        utils.check_image_size(d, image)
        sem_seg: Optional[np.ndarray] = None
        if "sem_seg_file_name" in d and (self.is_train or self.load_gt_in_eval):
            sem_seg = read_sem_seg(d["sem_seg_file_name"])
            if sem_seg.dtype != np.uint8:  # 16/32-bit ids
                sem_seg = self._narrow_labels(sem_seg, d["sem_seg_file_name"])
        elif self.is_train:
            raise MapperSetupError(f"{d.get('file_name')}: no 'sem_seg_file_name' in the "
                                   "dataset dict; SemSegDatasetMapper trains on semantic "
                                   "segmentation datasets")
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        if sem_seg is not None and self.label_dtype == torch.uint8 and image.dtype == np.uint8:
            # one buffer for both (the loader workers then hand over one shared-memory block,
            # d2seg/data/pack.py), filled by the copies the layout change makes anyway
            c = image.shape[2]
            buf = np.empty((c + 1,) + image.shape[:2], dtype=np.uint8)
            buf[:c] = image.transpose(2, 0, 1)
            buf[c] = sem_seg
            both = torch.from_numpy(buf)
            d["image"], d["sem_seg"] = both[:c], both[c]
        else:
            d["image"] = _tensor(image.transpose(2, 0, 1))
            if sem_seg is not None:
                d["sem_seg"] = _tensor(
                    sem_seg, np.uint8 if self.label_dtype == torch.uint8 else np.int64)
        d.pop("annotations", None)
        return d


def _tensor(a: np.ndarray, dtype=None) -> torch.Tensor:
    """``a`` as a contiguous tensor of ``dtype``, copied when it is read-only (an array PIL
    hands out, e.g. a one-channel image whose transpose needs no copy): torch warns about
    non-writable arrays."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a if a.flags.writeable else a.copy())
