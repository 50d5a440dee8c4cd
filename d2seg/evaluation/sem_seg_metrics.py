"""``SemSegMetricsEvaluator``: per-class IoU / Dice, mIoU, mDice, pixel accuracy, boundary IoU.

Reported beside detectron2's metrics under the result key ``"sem_seg_metrics"``; in training
and ``tools/train_net.py --eval-only`` it is fed by d2seg's ``SemSegEvaluator``
(:mod:`d2seg.evaluation.sem_seg_evaluator`), which reads each label map once for both.
"""
from __future__ import annotations

import csv
import json
import math
import logging
import os
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.image_io import read_sem_seg
from ..metrics import (class_boundary_counts, confusion_matrix, segmentation_metrics,
                       surface_distance_stats)
from ..modeling.postprocessing import class_labels

__all__ = ["SemSegMetricsEvaluator", "load_sem_seg_gt"]


def load_sem_seg_gt(filename: str, dtype=int) -> np.ndarray:
    """A label map as an integer array (H, W) by d2seg's one rule
    (:func:`d2seg.data.image_io.read_sem_seg`: the stored values are the class ids).

    detectron2 0.7's default loader reads with ``np.array(..., copy=False)``, which NumPy 2
    rejects for PIL images; every semantic evaluator d2seg builds uses this one instead.
    """
    return read_sem_seg(filename).astype(dtype, copy=False)

RESULT_KEY = "sem_seg_metrics"


class SemSegMetricsEvaluator(DatasetEvaluator):
    """Dataset-level (pooled over all pixels) segmentation metrics, in percent.

    The prediction of an image is ``output["sem_seg"].argmax(0)`` (as for detectron2's
    ``SemSegEvaluator``), compared with the label map at the dataset's
    ``sem_seg_file_name``; pixels labelled ``ignore_label`` are skipped.

    ``evaluate()`` returns ``{"sem_seg_metrics": {...}}`` with floats: "mIoU", "mDice", "pACC",
    "IoU-<class>", "Dice-<class>" and, with ``boundary_iou``, "mBIoU" and "BIoU-<class>".
    All are pooled over the dataset's pixels (one confusion matrix), in percent. Empty cases
    (see :mod:`d2seg.metrics`): a class with neither ground-truth nor predicted pixels in the
    whole dataset is NaN and left out of the means; a class predicted but never present
    scores 0 (detectron2's ``SemSegEvaluator`` instead leaves out every class absent from the
    ground truth).

    Per image (the per-case figures of medical papers): "DiceImg-<class>", the mean over the
    images in which the class is present or predicted of that image's Dice; "mDiceImg" and
    "mDiceImgSD", the mean and standard deviation over images of each image's mean Dice over
    such classes. With ``surface_distance``: "HD95-<class>" and "ASSD-<class>", the 95th
    percentile and the mean of the symmetric surface distances (in pixels, or in the units of
    ``pixel_spacing``,
    :func:`d2seg.metrics.hausdorff95`, MONAI's definitions), averaged over the images in which
    the class is present or predicted (where it is only one of them, a miss, the image's
    diagonal: a bound on any distance in it, as BraTS scores a miss), and "mHD95" / "mASSD" over
    the classes but class 0 (taken as background, as MONAI's ``include_background=False``).
    With ``output_dir``, ``sem_seg_per_image.csv`` has one row per image: its file name, then
    Dice and IoU (and HD95, ASSD) per class, empty where the class is neither present nor
    predicted.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        num_classes: Optional[int] = None,
        ignore_label: Optional[int] = None,
        boundary_iou: bool = True,
        boundary_dilation_ratio: float = 0.02,
        surface_distance: bool = False,
        pixel_spacing: Tuple[float, float] = (1.0, 1.0),
    ):
        """
        Args:
            dataset_name: a registered dataset with "sem_seg_file_name" per dict and
                ``stuff_classes`` (and ``ignore_label``) in its metadata.
            distributed: gather the statistics of all processes (main process returns them).
            output_dir: if set, the results are also written to
                ``<output_dir>/sem_seg_metrics.json`` (strict JSON: null where a
                metric is NaN, e.g. a class absent from ground truth and predictions).
            num_classes, ignore_label: override the metadata's.
            boundary_iou: also compute Boundary IoU per class (Cheng et al., 2021), pooled.
            boundary_dilation_ratio: boundary width as a fraction of the image diagonal.
            surface_distance: also HD95 and ASSD per class and image (``D2SEG.EVAL.
                SURFACE_DISTANCE``; two distance transforms per class and image).
            pixel_spacing: (row, column) size of a pixel the distances are given in
                (``D2SEG.EVAL.PIXEL_SPACING``, e.g. mm); (1, 1): pixels.
        """
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        classes = getattr(meta, "stuff_classes", None)
        if num_classes is None:
            if classes is None:
                raise ValueError(f"Dataset '{dataset_name}' has no 'stuff_classes' metadata; "
                                 "pass num_classes")
            num_classes = len(classes)
        self._num_classes = int(num_classes)
        self._class_names: List[str] = (list(classes) if classes is not None
                                        and len(classes) == self._num_classes
                                        else [str(i) for i in range(self._num_classes)])
        self._ignore_label = (ignore_label if ignore_label is not None
                              else getattr(meta, "ignore_label", 255))
        self._gt_files = {d["file_name"]: d["sem_seg_file_name"]
                          for d in DatasetCatalog.get(dataset_name) if "sem_seg_file_name" in d}
        self._boundary = boundary_iou
        self._ratio = boundary_dilation_ratio
        self._surface = bool(surface_distance)
        self._spacing = tuple(float(v) for v in pixel_spacing)
        self.reset()

    def reset(self) -> None:
        c = self._num_classes
        self._cm = np.zeros((c, c), dtype=np.int64)
        self._b_inter = np.zeros(c, dtype=np.int64)
        self._b_union = np.zeros(c, dtype=np.int64)
        self._num_images = 0
        # (file name, Dice (C,), IoU (C,), HD95 (C,) or None, ASSD (C,) or None) per image
        self._per_image: List[tuple] = []

    def _load_gt(self, inp: Dict) -> np.ndarray:
        path = inp.get("sem_seg_file_name") or self._gt_files.get(inp["file_name"])
        if path is None:
            raise KeyError(f"No ground truth for '{inp['file_name']}' in dataset "
                           f"'{self._dataset_name}'")
        return load_sem_seg_gt(path, dtype=np.int64)

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        """inputs: the model inputs ("file_name"); outputs: dicts with "sem_seg" (C, H, W)."""
        for inp, out in zip(inputs, outputs):
            pred = class_labels(out["sem_seg"]).to("cpu").numpy()
            gt = self._load_gt(inp)
            if pred.shape != gt.shape:
                raise ValueError(f"{inp['file_name']}: prediction {pred.shape} and ground truth "
                                 f"{gt.shape} differ in size")
            self.accumulate(pred, gt, name=inp["file_name"])

    def accumulate(self, pred: np.ndarray, gt: np.ndarray, cm: Optional[np.ndarray] = None,
                   name: str = "") -> None:
        """Add one image: ``pred`` (H, W) labels in ``[0, C)``, ``gt`` (H, W) ids (what
        :meth:`process` does after reading them; d2seg's ``SemSegEvaluator`` calls it with the
        maps it has read itself, and ``cm``, their (C, C) confusion matrix, rows = ground
        truth, when it has counted it already); ``name``: the image's file, for the per-image
        table."""
        if cm is None:
            cm = confusion_matrix(pred, gt, self._num_classes, self._ignore_label)
        self._cm += cm
        self._num_images += 1
        tp = np.diag(cm).astype(np.float64)
        both = cm.sum(0) + cm.sum(1)  # predicted + ground-truth pixels per class
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(both > 0, 2 * tp / both, np.nan)
            iou = np.where(both > 0, tp / (both - tp), np.nan)
        hd95 = assd = None
        if self._surface:
            hd95, assd = self._surface_distances(pred, gt, both)
        self._per_image.append((str(name), dice.astype(np.float32), iou.astype(np.float32),
                                hd95, assd))
        if self._boundary:
            self._accumulate_boundary(pred, gt)

    def _surface_distances(self, pred: np.ndarray, gt: np.ndarray, both: np.ndarray):
        """Per class (C,) HD95 and ASSD of the image (valid pixels only): NaN where the class
        is neither present nor predicted; the image's diagonal, a bound on any distance in
        it, where it is only one of them (a miss: without it, missing objects would lower the
        means)."""
        c = self._num_classes
        hd95, assd = np.full(c, np.nan), np.full(c, np.nan)
        valid = gt != self._ignore_label
        worst = float(np.hypot(gt.shape[0] * self._spacing[0], gt.shape[1] * self._spacing[1]))
        for k in np.flatnonzero(both > 0):
            h, a = surface_distance_stats((pred == k) & valid, (gt == k) & valid,
                                          self._spacing, empty_score=float("nan"))
            hd95[k], assd[k] = (worst, worst) if math.isinf(h) else (h, a)
        return hd95, assd

    def _accumulate_boundary(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Per-class boundary intersections / unions on the image's valid pixels
        (:func:`d2seg.metrics.class_boundary_counts`)."""
        inter, union = class_boundary_counts(pred, gt, self._num_classes, self._ignore_label,
                                             dilation_ratio=self._ratio)
        self._b_inter += inter
        self._b_union += union

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        cm, bi, bu, n = self._cm, self._b_inter, self._b_union, self._num_images
        if self._distributed:
            comm.synchronize()
            parts = comm.gather((cm, bi, bu, n, self._per_image), dst=0)
            if not comm.is_main_process():
                return {}
            cm = sum(p[0] for p in parts)
            bi = sum(p[1] for p in parts)
            bu = sum(p[2] for p in parts)
            n = sum(p[3] for p in parts)
            per_image = [row for p in parts for row in p[4]]
        else:
            per_image = self._per_image
        if n == 0:
            self._logger.warning(f"[SemSegMetricsEvaluator] no predictions for "
                                 f"'{self._dataset_name}'")
            return {}
        res = OrderedDict(
            (k, 100.0 * v) for k, v in segmentation_metrics(cm, self._class_names).items())
        if self._boundary:
            with np.errstate(invalid="ignore", divide="ignore"):
                biou = np.where(bu > 0, bi / np.maximum(bu, 1), np.nan)
            res["mBIoU"] = (100.0 * float(np.nanmean(biou)) if np.isfinite(biou).any()
                            else float("nan"))
            for name, v in zip(self._class_names, biou):
                res[f"BIoU-{name}"] = 100.0 * float(v)
        res.update(self._per_image_summary(per_image))
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            self._write_per_image(per_image)
            with PathManager.open(os.path.join(self._output_dir, "sem_seg_metrics.json"), "w") as f:
                # strict JSON: null (not NaN) for a class absent from ground truth and
                # predictions alike
                json.dump({"num_images": int(n),
                           **{k: (v if math.isfinite(v) else None) for k, v in res.items()}},
                          f, indent=1, allow_nan=False)
        return OrderedDict({RESULT_KEY: res})

    def _per_image_summary(self, per_image: List[tuple]) -> Dict[str, float]:
        """The per-image means (class docstring), in percent."""
        if not per_image:
            return {}
        dice = np.stack([row[1] for row in per_image]).astype(np.float64)  # (images, C)
        out: Dict[str, float] = OrderedDict()
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns / rows
            per_class = np.nanmean(dice, axis=0)
            means = np.nanmean(dice, axis=1)
        means = means[np.isfinite(means)]
        out["mDiceImg"] = 100.0 * float(means.mean()) if means.size else float("nan")
        out["mDiceImgSD"] = (100.0 * float(means.std(ddof=1)) if means.size > 1
                                        else float("nan"))
        for name, v in zip(self._class_names, per_class):
            out[f"DiceImg-{name}"] = 100.0 * float(v)
        if self._surface:
            for key, col in (("HD95", 3), ("ASSD", 4)):
                d = np.stack([row[col] for row in per_image])  # (images, C), pixels
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    cls = np.nanmean(d, axis=0)
                    # class 0 taken as background, as MONAI's include_background=False
                    fg = cls[1:] if len(cls) > 1 else cls
                    out[f"m{key}"] = float(np.nanmean(fg)) if np.isfinite(fg).any() \
                        else float("nan")
                for name, v in zip(self._class_names, cls):
                    out[f"{key}-{name}"] = float(v)
        return out

    def _write_per_image(self, per_image: List[tuple]) -> None:
        """``sem_seg_per_image.csv``: file, Dice-<class>..., IoU-<class>... in percent."""
        def cell(v: float, scale: float = 100.0) -> str:
            return "" if math.isnan(v) else f"{scale * v:.4f}"

        path = os.path.join(self._output_dir, "sem_seg_per_image.csv")
        with PathManager.open(path, "w") as f:
            w = csv.writer(f)
            surface = ("HD95", "ASSD") if self._surface else ()
            w.writerow(["file_name"] + [f"{m}-{c}" for m in ("Dice", "IoU") + surface
                                        for c in self._class_names])
            for name, dice, iou, hd95, assd in per_image:
                w.writerow([name] + [cell(float(v)) for v in dice]
                           + [cell(float(v)) for v in iou]
                           + [cell(float(v), 1.0) for d in (hd95, assd) if d is not None
                              for v in d])
