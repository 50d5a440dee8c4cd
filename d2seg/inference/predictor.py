"""``SegPredictor``: detectron2's ``DefaultPredictor`` with d2seg's test-time options.

* semantic models: sliding windows (``D2SEG.INFERENCE.SLIDING_WINDOW``), flip and rotation
  averaging (``D2SEG.INFERENCE.FLIP`` / ``ROT90``), see :mod:`d2seg.inference.sliding_window`;
* R-CNN models: ``D2SEG.INFERENCE.FLIP`` uses detectron2's ``GeneralizedRCNNWithTTA``
  (horizontal flip at ``INPUT.MIN_SIZE_TEST``; ``TEST.AUG.MIN_SIZES`` adds scales when
  ``TEST.AUG.ENABLED``);
* weights are read with :class:`d2seg.checkpoint.FinetuneCheckpointer`;
* the model gets the fast paths evaluation gets (``D2SEG.SPEED``: BatchNorms folded into their
  convs, channels_last, the parallel CPU ROIAlign, semantic models under autocast in their
  training precision, see :mod:`.autocast`), except ``torch.compile``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

import cv2
import numpy as np
import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA, build_model
from detectron2.modeling.meta_arch.panoptic_fpn import PanopticFPN
from detectron2.utils.logger import log_first_n

from ..checkpoint import load_weights
from ..data.image_io import IntensityScaling, to_uint8
from ..data.sem_seg_transforms import ResizeShortestEdge
from ..engine import fast_paths
from .tta import SemanticSegmentorWithTTA

logger = logging.getLogger(__name__)

__all__ = ["SegPredictor", "build_inference_model", "is_semantic_model", "cpu_fallback"]


def is_semantic_model(model: nn.Module) -> bool:
    """Whether ``model`` returns only ``"sem_seg"`` (not an R-CNN, a proposal network,
    RetinaNet or Panoptic FPN)."""
    from detectron2.modeling import ProposalNetwork, RetinaNet

    model = model.module if hasattr(model, "module") else model
    return not isinstance(model, (GeneralizedRCNN, ProposalNetwork, RetinaNet))


def cpu_fallback(cfg: CfgNode, doing: str = "predicting") -> CfgNode:
    """``cfg``, or a copy with ``MODEL.DEVICE`` "cpu" (and a warning: "... ``doing`` on CPU")
    where it names CUDA and this machine has none, as ``tools/train_net.py`` does."""
    if not (cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()):
        return cfg
    logger.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available: {doing} "
                   "on CPU")
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if frozen:
        cfg.freeze()
    return cfg


def build_inference_model(cfg: CfgNode) -> nn.Module:
    """The model of ``cfg`` as evaluation runs it, in eval mode with ``MODEL.WEIGHTS`` loaded
    (:class:`d2seg.checkpoint.FinetuneCheckpointer`: d2seg / detectron2 / model-zoo files;
    random weights with a warning when it is empty). A ``MODEL.DEVICE`` naming CUDA on a
    machine without it builds on the CPU, with a warning.

    It gets ``Trainer.build_model``'s ``D2SEG.SPEED`` plan (``FOLD_NORM``,
    ``PARALLEL_ROI_ALIGN``, ``CHANNELS_LAST``, ``INFERENCE_AMP``, ...) without
    ``torch.compile``, because every new image size would recompile. Process-wide switches
    (cuDNN benchmark, TF32) are left as they are. Gradients are off (predicting only: folded
    norms are cached on CPU).
    """
    from ..modeling.postprocessing import attach_postprocessor

    cfg = cpu_fallback(cfg)
    model = build_model(cfg)
    attach_postprocessor(model, cfg)  # MODEL.SEM_SEG_POSTPROCESS for SemanticSegmentor
    model.eval()
    model.requires_grad_(False)
    plan = dataclasses.replace(fast_paths.resolve(cfg), compile=False)
    fast_paths.prepare_model(model, cfg, plan)
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS, complete=True, context="MODEL.WEIGHTS")
    else:
        logger.warning("MODEL.WEIGHTS is empty: predicting with random weights")
    return model


def _as_uint8(image: np.ndarray, scaling: Optional[IntensityScaling] = None) -> np.ndarray:
    """uint8 pixels: unsigned 16/32-bit and out-of-range values scaled by ``scaling`` (as d2seg
    reads such files), bool as 0/255; other integer and float arrays already in 0-255 as they
    are."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:  # a mask: True is white (255), as d2seg reads bool images, not 1
        return to_uint8(image, "SegPredictor input")
    high_bit = image.dtype.kind == "u" and image.dtype.itemsize > 1
    # a fixed window or percentiles scale every non-8-bit array (a float / int16 CT crop may
    # lie within 0-255 and still be Hounsfield units); with min-max scaling (the default)
    # arrays already in 0-255 are taken as they are
    configured = scaling is not None and scaling.mode != "minmax"
    if not high_bit and not configured and image.size and np.isfinite(image).all() and \
            image.min() >= 0 and image.max() <= 255:
        if image.dtype.kind == "f" and image.max() <= 1.0 and image.max() > 0:
            log_first_n(logging.WARNING, "SegPredictor got a float image with values in 0-1; "
                        "it takes 0-255 (multiply by 255), or set INPUT.INTENSITY.SCALING to "
                        "scale it", name=__name__, key="message")
        return np.rint(image).astype(np.uint8)
    return to_uint8(image, "SegPredictor input", scaling)


def _as_bgr_uint8(image: np.ndarray, scaling: Optional[IntensityScaling] = None) -> np.ndarray:
    """(H, W, 3) uint8 from what a user may hand the predictor (see ``SegPredictor.__call__``)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(_as_uint8(image, scaling)[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"SegPredictor takes an (H, W, 3) BGR image or an (H, W) grey one, got "
                         f"shape {tuple(image.shape)}")
    return _as_uint8(image, scaling)


class SegPredictor(DefaultPredictor):
    """Like ``DefaultPredictor``: ``predictor(bgr_image (H, W, 3) uint8)`` -> the model's output
    dict for one image at its original size ("sem_seg" (K, H, W) logits, "instances",
    "panoptic_seg")."""

    def __init__(self, cfg: CfgNode):
        # DefaultPredictor.__init__, with d2seg's model preparation, loader and TTA wrapper
        self.cfg = cpu_fallback(cfg).clone()
        self.model = build_inference_model(self.cfg)
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        # detectron2's test-time resize, skipped where the size stays (no PIL round trip)
        self.aug = ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.intensity = IntensityScaling.from_cfg(cfg)
        if self.input_format not in ("RGB", "BGR", "L"):
            raise ValueError(f"INPUT.FORMAT '{self.input_format}': SegPredictor takes BGR, RGB "
                             f"and L (grey) models")
        self.semantic = is_semantic_model(self.model)
        inf = cfg.D2SEG.INFERENCE
        self.flip = bool(inf.FLIP)
        if inf.ROT90 and not self.semantic:
            logger.warning(f"D2SEG.INFERENCE.ROT90: semantic models only, not "
                           f"{type(self.model).__name__}; predicting without it")
        if tuple(inf.SCALES) != (1.0,) and not self.semantic:
            logger.warning(f"D2SEG.INFERENCE.SCALES {tuple(inf.SCALES)}: semantic models only, "
                           f"not {type(self.model).__name__}; predicting at one scale")
        if min(inf.SLIDING_WINDOW.SIZE) > 0 and not self.semantic:
            logger.warning(f"D2SEG.INFERENCE.SLIDING_WINDOW.SIZE "
                           f"{tuple(inf.SLIDING_WINDOW.SIZE)}: semantic models only, not "
                           f"{type(self.model).__name__}; predicting each image whole")
        self.tta_model = None
        if self.semantic:  # windows, flips and rotations as D2SEG.INFERENCE says
            self.semantic_model = SemanticSegmentorWithTTA(
                self.model, flip=self.flip, rot90=bool(inf.ROT90),
                window=tuple(inf.SLIDING_WINDOW.SIZE), overlap=float(inf.SLIDING_WINDOW.OVERLAP),
                scales=tuple(inf.SCALES)).eval()
        if self.flip and not self.semantic:
            if isinstance(self.model, PanopticFPN) or not isinstance(self.model, GeneralizedRCNN):
                logger.warning(f"D2SEG.INFERENCE.FLIP: no flip TTA for "
                               f"{type(self.model).__name__} outputs; predicting without it")
            else:
                tcfg = self.cfg.clone()
                tcfg.defrost()
                tcfg.TEST.AUG.FLIP = True
                if not tcfg.TEST.AUG.ENABLED:
                    tcfg.TEST.AUG.MIN_SIZES = (cfg.INPUT.MIN_SIZE_TEST,)
                    tcfg.TEST.AUG.MAX_SIZE = cfg.INPUT.MAX_SIZE_TEST
                self.tta_model = GeneralizedRCNNWithTTA(tcfg, self.model)

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray) -> Dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image in BGR order (as cv2.imread); an (H, W) or
                (H, W, 1) grey image is repeated over the 3 channels; a 16- or 32-bit unsigned
                one (or any with values outside 0-255) is scaled to 0-255 as the config's
                ``INPUT.INTENSITY`` says (default: by its own minimum and maximum), as d2seg
                reads such files; with a "window" or "percentile" scaling every array that is
                not uint8, otherwise float or signed arrays in 0-255 are taken as they are. A grey model (INPUT.FORMAT "L") gets the image's grey.

        Returns:
            the model's output for the image, at the original size.
        """
        original_image = _as_bgr_uint8(original_image, self.intensity)
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        elif self.input_format == "L":  # PIL's (ITU-R 601-2) grey, as the loader reads "L"
            original_image = cv2.cvtColor(original_image, cv2.COLOR_BGR2GRAY)[:, :, None]
        height, width = original_image.shape[:2]
        if self.semantic:
            image = self.aug.get_transform(original_image).apply_image(original_image) \
                if self.cfg.INPUT.MIN_SIZE_TEST > 0 else original_image
            inputs = {"image": self._to_tensor(image), "height": height, "width": width}
            return self.semantic_model([inputs])[0]
        if self.tta_model is not None:
            # uint8, as the data loader gives it: detectron2's TTA wrapper then resizes with
            # PIL as the loader does (a float image is resized by torch, without antialiasing)
            image = torch.as_tensor(np.ascontiguousarray(original_image.transpose(2, 0, 1)))
            inputs = {"image": image, "height": height, "width": width}
            return self.tta_model([inputs])[0]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        inputs = {"image": self._to_tensor(image), "height": height, "width": width}
        return self.model([inputs])[0]
