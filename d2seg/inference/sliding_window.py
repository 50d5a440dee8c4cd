"""Sliding-window and flip inference for semantic segmentation models.

Any model following detectron2's ``SemanticSegmentor`` contract works (d2seg's ``UNet``,
``DeepLabV3(Plus)``, ``PSPNet``, detectron2's ``SemanticSegmentor``): it is called on windows
with ``{"image", "height", "width"}`` and returns ``[{"sem_seg": (K, h, w)}]`` logits.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..modeling.postprocessing import pixel_major

__all__ = ["window_starts", "sliding_window_logits", "semantic_logits", "without_postprocessor"]


def window_starts(length: int, window: int, overlap: float) -> List[int]:
    """Start offsets of windows of ``window`` pixels covering ``[0, length)``.

    Consecutive windows overlap by at least ``overlap`` (a share of ``window``, in [0, 1));
    the last window ends exactly at ``length``. One window at 0 when ``window >= length``.
    """
    if window <= 0:
        raise ValueError(f"D2SEG.INFERENCE.SLIDING_WINDOW.SIZE (--sliding-window) must be > 0 "
                         f"pixels, got {window}")
    if window >= length:
        return [0]
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP (--overlap) must be in "
                         f"[0, 1), got {overlap}")
    stride = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def _run(model: nn.Module, crops: List[Tensor]) -> List[Tensor]:
    inputs = [{"image": c, "height": c.shape[-2], "width": c.shape[-1]} for c in crops]
    # raw logits where the model post-processes ("sem_seg" is then a one-hot label map)
    return [o.get("sem_seg_logits", o["sem_seg"]) for o in model(inputs)]


@contextmanager
def without_postprocessor(model: nn.Module):
    """Within the block, ``model`` (a d2seg semantic model with a ``postprocessor``) returns
    raw logits: windows and views are averaged as logits and post-processed once, by the
    caller, on the whole image (a component filter per window would keep one component per
    window, and averaged one-hot maps are no logits)."""
    post = getattr(model, "postprocessor", None)
    if post is None:
        yield model
        return
    model.postprocessor = None
    try:
        yield model
    finally:
        model.postprocessor = post


@torch.no_grad()
def sliding_window_logits(model: nn.Module, image: Tensor, window: Sequence[int],
                          overlap: float = 0.25, batch_size: int = 4) -> Tensor:
    """Logits of ``image`` averaged over overlapping windows.

    Args:
        model: a semantic model in eval mode.
        image: (C, H, W) tensor as the model takes it (0-255, the config's INPUT.FORMAT).
        window: (h, w) window size; each side is capped at the image's.
        overlap: share of the window that consecutive windows overlap.
        batch_size: windows per forward pass.

    Returns:
        (K, H, W) float logits (the mean of the windows' logits where they overlap).
    """
    _, h, w = image.shape
    if len(window) != 2 or min(int(s) for s in window) <= 0:
        raise ValueError(f"sliding window must be (h, w) with both sides > 0 "
                         f"(D2SEG.INFERENCE.SLIDING_WINDOW.SIZE / --sliding-window), got "
                         f"{tuple(window)}")
    wh, ww = min(int(window[0]), h), min(int(window[1]), w)
    boxes = [(y, x) for y in window_starts(h, wh, overlap) for x in window_starts(w, ww, overlap)]
    total = None
    count = torch.zeros((1, h, w), dtype=torch.float32, device=image.device)
    with without_postprocessor(model):
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            outs = _run(model, [image[:, y:y + wh, x:x + ww] for y, x in chunk])
            for (y, x), o in zip(chunk, outs):
                o = o.float()
                if total is None:
                    total = torch.zeros((o.shape[0], h, w), dtype=torch.float32,
                                        device=o.device)
                    count = count.to(o.device)
                total[:, y:y + wh, x:x + ww] += o
                count[:, y:y + wh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def semantic_logits(model: nn.Module, image: Tensor, window: Tuple[int, int] = (0, 0),
                    overlap: float = 0.25, flip: bool = False, rot90: bool = False,
                    scales: Sequence[float] = (1.0,)) -> Tensor:
    """(K, H, W) logits of a (C, H, W) image: whole image or sliding windows (``window`` with
    both sides > 0), averaged over test-time views mapped back to the image: with ``flip`` the
    horizontally flipped image, with ``rot90`` the rotations by 90, 180 and 270 degrees (with
    both, the 8 views of the square's symmetry group: for images without a preferred
    orientation, e.g. microscopy), and at each of ``scales`` (the image resized by that factor,
    bilinear; its logits resized back to (H, W)); every view's logits are averaged (where
    MMSegmentation's multi-scale test averages probabilities). On a
    CPU the result is stored with the classes innermost
    (:func:`~d2seg.modeling.postprocessing.pixel_major`).
    """
    window = tuple(int(s) for s in window) if window else (0, 0)
    if len(window) != 2 or (any(s <= 0 for s in window) and any(s != 0 for s in window)):
        raise ValueError(f"sliding window must be (h, w) with both sides > 0, or (0, 0) for the "
                         f"whole image (D2SEG.INFERENCE.SLIDING_WINDOW.SIZE / --sliding-window), "
                         f"got {window}")

    def once(img: Tensor) -> Tensor:
        if window and min(window) > 0 and (img.shape[-2] > window[0] or img.shape[-1] > window[1]):
            return sliding_window_logits(model, img, window, overlap)
        return _run(model, [img])[0].float()

    scales = [float(s) for s in scales] or [1.0]
    if any(not s > 0 for s in scales):
        raise ValueError(f"test scales must be > 0 (D2SEG.INFERENCE.SCALES / --scales), got "
                         f"{scales}")
    h, w = image.shape[-2:]
    total, n = None, 0
    with without_postprocessor(model):
        for s in scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            scaled = image if size == (h, w) else F.interpolate(
                image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            for k in (0, 1, 2, 3) if rot90 else (0,):
                view = torch.rot90(scaled, k, (-2, -1)) if k else scaled
                for flipped in (False, True) if flip else (False,):
                    out = once(view.flip(-1)).flip(-1) if flipped else once(view)
                    out = torch.rot90(out, -k, (-2, -1)) if k else out
                    if tuple(out.shape[-2:]) != (h, w):
                        out = F.interpolate(out[None], size=(h, w), mode="bilinear",
                                            align_corners=False)[0]
                    total = out if total is None else total + out
                    n += 1
    total = total / n if n > 1 else total
    # classes innermost on CPU, as the models return them (argmax(0) reads contiguous memory)
    return pixel_major(total)
