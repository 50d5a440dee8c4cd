"""Prediction-beside-ground-truth overlays with detectron2's ``Visualizer``."""
from __future__ import annotations

import os
from typing import Dict, List

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..data.image_io import read_image
from ..data.sem_seg_transforms import ResizeShortestEdge
from ..modeling.postprocessing import class_labels

__all__ = ["draw_prediction", "visualize_predictions"]


def draw_prediction(image_rgb: np.ndarray, output: Dict, metadata, score_thresh: float = 0.5) -> np.ndarray:
    """Overlay one model output on an RGB uint8 image (H, W, 3); returns RGB uint8.

    Panoptic outputs win over instances, instances over semantic maps.
    """
    v = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in output:
        seg, info = output["panoptic_seg"]
        vis = v.draw_panoptic_seg(seg.to("cpu"), info)
    elif "instances" in output:
        inst = output["instances"].to("cpu")
        inst = inst[inst.scores >= score_thresh]
        vis = v.draw_instance_predictions(inst)
    elif "sem_seg" in output:
        vis = v.draw_sem_seg(class_labels(output["sem_seg"]).to("cpu"))
    else:
        raise ValueError(f"Nothing to draw in the model output (keys: {sorted(output)})")
    return vis.get_image()


def _ground_truth_to_draw(d: Dict) -> Dict:
    """The fields of a dataset dict that show its ground truth once: a panoptic dict (with
    ``pan_seg_file_name``) is drawn from its panoptic segments alone, as its prediction is;
    detectron2's ``draw_dataset_dict`` would also draw the instance annotations and the
    "separated" stuff map, whose class 0 labels every thing pixel "things"."""
    if "pan_seg_file_name" in d and "segments_info" in d:
        return {k: v for k, v in d.items() if k not in ("sem_seg_file_name", "annotations")}
    return d


def visualize_predictions(cfg, model: torch.nn.Module, dataset_name: str, out_dir: str,
                          num: int = 4) -> List[str]:
    """Write ``num`` PNGs of ``dataset_name``: model prediction (left) | ground truth (right)."""
    os.makedirs(out_dir, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    dicts = DatasetCatalog.get(dataset_name)[:num]
    was_training = model.training
    model.eval()
    paths = []
    # the test-time resize of DefaultPredictor / the test loader
    aug = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    try:
        for d in dicts:
            img = read_image(d["file_name"], format=cfg.INPUT.FORMAT, scale=True)
            rgb = utils.convert_image_to_rgb(img, cfg.INPUT.FORMAT)
            resized = aug.get_transform(img).apply_image(img) if cfg.INPUT.MIN_SIZE_TEST else img
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            with torch.no_grad():
                out = model([{"image": tensor, "height": img.shape[0], "width": img.shape[1]}])[0]
            pred = draw_prediction(rgb, out, metadata)
            gt = Visualizer(rgb, metadata).draw_dataset_dict(_ground_truth_to_draw(d)).get_image()
            stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
            path = os.path.join(out_dir, stem + ".png")
            k = 1
            while path in paths:  # one name in two sub-folders (a recursive folder dataset)
                path = os.path.join(out_dir, f"{stem}_{k}.png")
                k += 1
            cv2.imwrite(path, np.concatenate([pred, gt], axis=1)[..., ::-1])
            paths.append(path)
    finally:
        model.train(was_training)
    return paths
