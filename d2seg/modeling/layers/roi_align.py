"""ROIAlign on CPU with its channels split over threads (``D2SEG.SPEED.PARALLEL_ROI_ALIGN``).

torchvision's CPU ``roi_align`` kernels, forward and backward, run on one thread whatever
``torch.get_num_threads()`` says: they loop over regions, channels and sampling points with
no parallel loop. In the backward the loop also recomputes the bilinear weights for every
channel. On the 2-core development CPU (AMD EPYC, 2026-11-27) profiling a training step of
``make demo``'s Mask R-CNN R18-FPN (batch 4, 256 px) put ``_roi_align_backward`` third among
all operators: 223 ms of a 1.37 s step, the only large one running on a single core.

Each channel is computed on its own in both directions (the regions, sampling points and
weights are the same for every channel), so the channels can be split into as many chunks as
torch has intra-op threads and the chunks run at once, the kernel releasing the GIL. The
result is bit-identical to torchvision's: every output and gradient element comes from the
same arithmetic in the same order. Where the split cannot help or cannot reproduce
torchvision exactly, the layer calls detectron2's ``ROIAlign.forward`` unchanged: CUDA or
other devices, one intra-op thread, fewer than ``2 * MIN_CHANNELS_PER_CHUNK`` channels,
quantised input, or a reduced-precision input outside autocast.

:func:`use_parallel_roi_align` switches every detectron2 ``ROIAlign`` of a model (the ROI
heads' poolers) to :class:`ParallelROIAlign`; ``state_dict`` is unchanged (ROIAlign has no
parameters).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from detectron2.layers import ROIAlign

from ...utils.threads import chunk_bounds, run_in_parallel

__all__ = ["ParallelROIAlign", "use_parallel_roi_align", "parallel_chunks",
           "MIN_CHANNELS_PER_CHUNK"]

#: Fewer channels per chunk than this are not worth a thread hand-off.
MIN_CHANNELS_PER_CHUNK = 8


def parallel_chunks(channels: int, threads: Optional[int] = None) -> int:
    """How many channel chunks :class:`ParallelROIAlign` uses for ``channels`` channels with
    ``threads`` intra-op threads (default: ``torch.get_num_threads()``); 1 = no split."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    return max(1, min(threads, channels // MIN_CHANNELS_PER_CHUNK))


def _run_chunks(fn, bounds: List[Tuple[int, int]]) -> List[Tensor]:
    """``fn(a, b)`` for every chunk at once (:func:`d2seg.utils.threads.run_in_parallel`: no
    autograd recording in any chunk)."""
    return run_in_parallel([lambda a=a, b=b: fn(a, b) for a, b in bounds])


class _ChannelSplitROIAlign(torch.autograd.Function):
    """torchvision's ``roi_align`` / ``_roi_align_backward`` on channel chunks in parallel."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                pooled_w: int, sampling_ratio: int, aligned: bool, chunks: int) -> Tensor:
        n, c, h, w = input.shape
        bounds = chunk_bounds(c, chunks)
        outs = _run_chunks(lambda a, b: torch.ops.torchvision.roi_align(
            input[:, a:b], rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned),
            bounds)
        ctx.save_for_backward(rois)
        ctx.meta = (n, h, w, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, bounds)
        return torch.cat(outs, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        n, h, w, scale, ph, pw, sr, aligned, bounds = ctx.meta
        grads = _run_chunks(lambda a, b: torch.ops.torchvision._roi_align_backward(
            grad[:, a:b].contiguous(), rois, scale, ph, pw, n, b - a, h, w, sr, aligned),
            bounds)
        return torch.cat(grads, 1), None, None, None, None, None, None, None


class ParallelROIAlign(ROIAlign):
    """detectron2's ``ROIAlign`` whose CPU forward and backward split the channels over
    torch's intra-op threads (see the module docstring); same arguments and results.

    ``forward(input, rois)``: input (N, C, H, W) feature map, rois (R, 5) rows of (batch
    index, x0, y0, x1, y1) in input-image coordinates; returns (R, C, *output_size), in train
    and eval mode alike.
    """

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        chunks = parallel_chunks(input.shape[1]) if input.dim() == 4 else 1
        if input.device.type != "cpu" or chunks < 2 or input.is_quantized:
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        rois = rois.to(dtype=input.dtype)  # as detectron2 does, before any autocast cast
        orig = input.dtype
        if torch.is_autocast_enabled("cpu"):
            # torchvision's autocast rule for roi_align: float32 in, the input's dtype out
            # (float64 stays); the worker threads do not autocast, so cast here
            if orig != torch.float64:
                input, rois = input.float(), rois.float()
        elif orig not in (torch.float32, torch.float64):
            return super().forward(input, rois)
        ph, pw = _pair(self.output_size)
        out = _ChannelSplitROIAlign.apply(input, rois, float(self.spatial_scale), int(ph),
                                          int(pw), int(self.sampling_ratio),
                                          bool(self.aligned), chunks)
        return out.to(orig)


def use_parallel_roi_align(model: nn.Module) -> int:
    """Switch every detectron2 ``ROIAlign`` in ``model`` (exactly that class, not its other
    subclasses) to :class:`ParallelROIAlign`; returns how many were switched."""
    n = 0
    for m in model.modules():
        if type(m) is ROIAlign:
            m.__class__ = ParallelROIAlign
            n += 1
    return n
