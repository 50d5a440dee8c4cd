"""Test-time augmentation for semantic models in detectron2's model interface, so that
detectron2's ``inference_on_dataset`` and every evaluator see exactly what ``tools/predict.py``
writes (the counterpart of detectron2's ``GeneralizedRCNNWithTTA``)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable

from ..modeling.postprocessing import pixel_major, semantic_output
from .sliding_window import semantic_logits

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """Wrap a semantic model (``SemanticSegmentor`` contract); each image's logits are averaged
    over flips / rotations / scales and, optionally, sliding windows (:func:`semantic_logits`).

    Input: detectron2's list of dicts with "image" (C, H, W) and optionally "height"/"width".
    Output, in eval mode only: ``[{"sem_seg": (K, height, width) logits}]`` per image; where
    the model has a ``postprocessor`` (``MODEL.SEM_SEG_POSTPROCESS.ENABLED``), it runs once on
    the averaged logits: ``{"sem_seg": one-hot (K, height, width), "sem_seg_logits": logits}``.
    """

    @configurable
    def __init__(self, model: nn.Module, *, flip: bool = True, rot90: bool = False,
                 window: Tuple[int, int] = (0, 0), overlap: float = 0.25,
                 scales: Sequence[float] = (1.0,)):
        """
        Args:
            model: a semantic model, e.g. d2seg's UNet or detectron2's SemanticSegmentor.
            flip: average with the horizontally flipped image.
            rot90: average over 90/180/270-degree rotations too.
            window: (h, w) sliding window; (0, 0) = the whole image at once.
            overlap: share of the window that consecutive windows overlap.
            scales: factors the (test-resized) image is also resized by, e.g. (0.75, 1.0,
                1.25); logits resized back and averaged.
        """
        super().__init__()
        self.model = model.module if hasattr(model, "module") else model
        self.flip, self.rot90 = bool(flip), bool(rot90)
        self.window, self.overlap = tuple(int(s) for s in window), float(overlap)
        self.scales = tuple(float(s) for s in scales) or (1.0,)
        if any(not s > 0 for s in self.scales):
            raise ValueError(f"D2SEG.INFERENCE.SCALES must be > 0, got {list(self.scales)}")

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> Dict:
        inf = cfg.D2SEG.INFERENCE
        return {"model": model, "flip": bool(cfg.TEST.AUG.FLIP or inf.FLIP),
                "rot90": bool(inf.ROT90), "window": tuple(inf.SLIDING_WINDOW.SIZE),
                "overlap": float(inf.SLIDING_WINDOW.OVERLAP), "scales": tuple(inf.SCALES)}

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("SemanticSegmentorWithTTA is for inference: call .eval()")
        device = next(self.model.parameters()).device
        results = []
        for x in batched_inputs:
            image = x["image"].to(device)
            logits = semantic_logits(self.model, image, self.window, self.overlap, self.flip,
                                     self.rot90, self.scales)
            h, w = int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1]))
            if tuple(logits.shape[-2:]) != (h, w):
                logits = F.interpolate(logits[None], size=(h, w), mode="bilinear",
                                       align_corners=False)[0]
            logits = pixel_major(logits)  # CPU: classes innermost, as the models return them
            # the model's post-processing, once, on the averaged full-size logits
            results.append(semantic_output(logits, getattr(self.model, "postprocessor", None)))
        return results
