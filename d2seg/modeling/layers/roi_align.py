"""ROIAlign for CPUs: the channels split over threads (``D2SEG.SPEED.PARALLEL_ROI_ALIGN``) and
the input gradient as a sparse matrix product (``D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD``).

torchvision's CPU ``roi_align`` kernels, forward and backward, run on one thread whatever
``torch.get_num_threads()`` says: they loop over regions, channels and sampling points with
no parallel loop. In the backward the loop also recomputes the bilinear weights for every
channel. On the 2-core development CPU (AMD EPYC, 2026-11-27) profiling a training step of
``make demo``'s Mask R-CNN R18-FPN (batch 4, 256 px) put ``_roi_align_backward`` third among
all operators: 223 ms of a 1.37 s step, the only large one running on a single core.

*Channel split.* Each channel is computed on its own in both directions (the regions,
sampling points and weights are the same for every channel), so the channels can be split
into as many chunks as torch has intra-op threads and the chunks run at once, the kernel
releasing the GIL. The result is bit-identical to torchvision's: every output and gradient
element comes from the same arithmetic in the same order.

*Sparse gradient.* ROIAlign is linear in its input, so its backward is one product with the
transposed sampling matrix (:func:`roi_align_grad_matrix`): the weights are computed once per
sampling point instead of once per point and channel, and the product runs on every thread.
The matrix's entries for each input position keep torchvision's order, so where every bin
has a power-of-two number of samples (a fixed ``sampling_ratio`` of 1, 2 or 4, as in d2seg's
CPU configs) the gradient was bit-identical to torchvision's in every test on the
development CPU (AMD EPYC). That last step depends on the order in which MKL's sparse
product adds each row's entries: on an Intel Xeon with AVX-512 (2026-11-29) its vectorised
path adds them in another order, and the float32 gradient differs from torchvision's by about
one rounding (largest difference 1.9e-6 on gradients up to 12.4, float64 1.8e-15, bf16 3-4
elements of 142k by one bf16 step). With the adaptive grid (``sampling_ratio`` 0) a bin's
sample count can be 3, 5, ... and the division by it rounds differently (relative
differences about 1e-7).
The forward stays torchvision's in both cases.

Where neither can help or reproduce torchvision, the layer calls detectron2's
``ROIAlign.forward`` unchanged: CUDA or other devices, quantised input, a reduced-precision
input outside autocast, and, for the split, one intra-op thread or fewer than
``2 * MIN_CHANNELS_PER_CHUNK`` channels (without a gradient to compute).

:func:`use_parallel_roi_align` switches every detectron2 ``ROIAlign`` of a model (the ROI
heads' poolers) to :class:`ParallelROIAlign`; ``state_dict`` is unchanged (ROIAlign has no
parameters).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from detectron2.layers import ROIAlign

from ...utils.threads import chunk_bounds, run_in_parallel

__all__ = ["ParallelROIAlign", "use_parallel_roi_align", "parallel_chunks",
           "roi_align_grad_matrix", "MIN_CHANNELS_PER_CHUNK", "MAX_SPARSE_ENTRIES"]

#: Fewer channels per chunk than this are not worth a thread hand-off.
MIN_CHANNELS_PER_CHUNK = 8

#: Largest sparse gradient matrix (entries: regions x bins x samples per bin x 4) that
#: ``sparse_grad`` builds (about 60 bytes each while it is built: at most ~250 MB); beyond it
#: the backward is torchvision's kernel. ``make demo``'s box head: 0.4 M entries per batch.
MAX_SPARSE_ENTRIES = 1 << 22


def parallel_chunks(channels: int, threads: Optional[int] = None) -> int:
    """How many channel chunks :class:`ParallelROIAlign` uses for ``channels`` channels with
    ``threads`` intra-op threads (default: ``torch.get_num_threads()``); 1 = no split."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    return max(1, min(threads, channels // MIN_CHANNELS_PER_CHUNK))


def _run_chunks(fn, bounds: List[Tuple[int, int]]) -> List[Tensor]:
    """``fn(a, b)`` for every chunk at once (:func:`d2seg.utils.threads.run_in_parallel`: no
    autograd recording in any chunk)."""
    return run_in_parallel([lambda a=a, b=b: fn(a, b) for a, b in bounds])


def _bilinear(c: Tensor, length: int) -> Tuple[Tensor, Tensor]:
    """torchvision's bilinear interpolation along one axis of ``length`` pixels, for sampling
    coordinates ``c`` (any shape): the two neighbour indices and their weights, each
    ``c.shape + (2,)``; points more than one pixel outside the axis get weight 0."""
    keep = (c >= -1.0) & (c <= length)
    c = c.clamp(min=0)
    lo = c.long()  # c >= 0: truncation is the floor
    edge = lo >= length - 1
    lo = lo.clamp(max=length - 1)
    hi = torch.where(edge, lo, lo + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - lo.to(c.dtype))
    return torch.stack([lo, hi], -1), torch.stack([1 - frac, frac], -1) * keep.unsqueeze(-1)


def roi_align_grad_matrix(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                          sampling_ratio: int, aligned: bool, n: int, h: int, w: int,
                          max_entries: Optional[int] = None) -> Optional[Tensor]:
    """ROIAlign's bilinear sampling as a sparse matrix, transposed for the backward.

    ``roi_align(x)`` is linear in ``x``: with ``x`` laid out as ``X`` (N*H*W, C) (channels
    innermost) and the output as ``Y`` (R*ph*pw, C), ``Y = M @ X`` where row ``(r, py, px)`` of
    ``M`` holds, for every sampling point of that bin, the four bilinear weights divided by the
    bin's sample count (torchvision's arithmetic: the same sampling points, the same clamping
    at the borders, points more than one pixel outside the map dropped, the adaptive grid
    ``ceil(bin size)`` where ``sampling_ratio`` is 0). The input gradient is then
    ``M.T @ dY``: one sparse-dense product instead of torchvision's CPU backward, which
    recomputes every weight for every channel on one thread.

    Args:
        rois: (R, 5) rows of (batch index, x0, y0, x1, y1), float32 or float64.
        n, h, w: the feature map's batch size, height and width.
        max_entries: above this many matrix entries (R*ph*pw * samples per bin * 4) return
            None (the caller runs torchvision's backward instead); None: the module's
            ``MAX_SPARSE_ENTRIES`` as it is at the call.

    Returns:
        ``M.T`` as a sparse CSR tensor (N*H*W + 1, R*ph*pw) of ``rois.dtype``, or None. Its
        last row collects the entries of weight 0 (drop that row of any product). A column
        can appear more than once in a row (two sampling points sharing a pixel): the product
        sums every entry, in torchvision's order.
    """
    if max_entries is None:
        max_entries = MAX_SPARSE_ENTRIES
    r = rois.shape[0]
    dt, dev = rois.dtype, rois.device
    off = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x0 = rois[:, 1] * spatial_scale - off
    y0 = rois[:, 2] * spatial_scale - off
    rw = rois[:, 3] * spatial_scale - off - x0
    rh = rois[:, 4] * spatial_scale - off - y0
    if not aligned:  # torchvision's legacy mode: regions at least 1x1
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bin_h, bin_w = rh / pooled_h, rw / pooled_w
    bins = pooled_h * pooled_w
    if sampling_ratio > 0:
        # every bin has the same grid: coordinates per axis, entries by broadcasting
        g = sampling_ratio
        if r * bins * g * g * 4 > max_entries:
            return None
        p_h = torch.arange(pooled_h, dtype=dt, device=dev).view(1, pooled_h, 1)
        p_w = torch.arange(pooled_w, dtype=dt, device=dev).view(1, pooled_w, 1)
        i = torch.arange(g, dtype=dt, device=dev).view(1, 1, g)
        # sampling coordinates (R, pooled, g) as torchvision computes them
        ys = y0.view(-1, 1, 1) + p_h * bin_h.view(-1, 1, 1) + (i + 0.5) * bin_h.view(-1, 1, 1) / g
        xs = x0.view(-1, 1, 1) + p_w * bin_w.view(-1, 1, 1) + (i + 0.5) * bin_w.view(-1, 1, 1) / g
        yi, yw = _bilinear(ys, h)  # (R, ph, g, 2)
        xi, xw = _bilinear(xs, w)
        shape = (r, pooled_h, pooled_w, g, g, 2, 2)  # y corner outer, x corner inner
        cols = (batch.view(r, 1, 1, 1, 1, 1, 1) * (h * w) + yi.view(r, pooled_h, 1, g, 1, 2, 1) * w
                + xi.view(r, 1, pooled_w, 1, g, 1, 2)).expand(shape)
        vals = (yw.view(r, pooled_h, 1, g, 1, 2, 1) * xw.view(r, 1, pooled_w, 1, g, 1, 2)
                / float(g * g)).expand(shape)
        rows = torch.arange(r * bins, device=dev).view(r, pooled_h, pooled_w, 1, 1, 1, 1)
        rows = rows.expand(shape)
    else:
        # adaptive grid, ceil(bin size) points per bin side, different for every region: one
        # flat list of sampling points in torchvision's order (region, bin, iy, ix), no padding
        grid_h, grid_w = bin_h.ceil().long().clamp(min=0), bin_w.ceil().long().clamp(min=0)
        per_bin = grid_h * grid_w
        per_roi = per_bin * bins
        total = int(per_roi.sum())
        if total * 4 > max_entries:
            return None
        roi = torch.repeat_interleave(torch.arange(r, device=dev), per_roi)  # (S,)
        k = torch.arange(total, device=dev) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
        pb = per_bin[roi]
        b, within = k // pb, k % pb
        gw_s = grid_w[roi]
        iy, ix = within // gw_s, within % gw_s
        bh_s, bw_s = bin_h[roi], bin_w[roi]
        ys = y0[roi] + (b // pooled_w).to(dt) * bh_s + (iy.to(dt) + 0.5) * bh_s / grid_h[roi].to(dt)
        xs = x0[roi] + (b % pooled_w).to(dt) * bw_s + (ix.to(dt) + 0.5) * bw_s / gw_s.to(dt)
        yi, yw = _bilinear(ys, h)  # (S, 2)
        xi, xw = _bilinear(xs, w)
        cols = (batch[roi] * (h * w)).view(-1, 1, 1) + yi.view(-1, 2, 1) * w + xi.view(-1, 1, 2)
        vals = yw.view(-1, 2, 1) * xw.view(-1, 1, 2) / per_bin[roi].to(dt).view(-1, 1, 1)
        rows = (roi * bins + b).view(-1, 1, 1).expand(-1, 2, 2)
    # M.T in CSR: entries ordered by input position (a stable sort keeps, for each position,
    # torchvision's order of regions, bins, samples and corners); entries of weight 0 (points
    # more than a pixel outside the map, the far corner of a point on a pixel) go to one extra
    # last row, which the caller drops (no read-back of how many there are)
    size = n * h * w
    vals = vals.reshape(-1)
    key = torch.where(vals != 0, cols.reshape(-1), size)
    key, order = torch.sort(key, stable=True)
    # row i starts at the number of keys below i
    crow = torch.searchsorted(key, torch.arange(size + 2, device=dev))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, rows.reshape(-1)[order], vals[order],
                                       (size + 1, r * pooled_h * pooled_w),
                                       check_invariants=False)


def _sparse_input_grad(grad: Tensor, rois: Tensor, meta: tuple, channels_last: bool
                       ) -> Optional[Tensor]:
    """The input gradient of ROIAlign as ``M.T @ grad`` (:func:`roi_align_grad_matrix`), in
    the input's memory format; None where the matrix would be too large."""
    n, h, w, scale, ph, pw, sr, aligned = meta
    c = grad.shape[1]
    m = roi_align_grad_matrix(rois, scale, ph, pw, sr, aligned, n, h, w)
    if m is None:
        return None
    g = grad.permute(0, 2, 3, 1).reshape(-1, c)  # (R*ph*pw, C), channels innermost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gi = (m @ g)[:-1].view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last strides
    return gi if channels_last else gi.contiguous()


class _CPUROIAlign(torch.autograd.Function):
    """torchvision's ``roi_align`` (on channel chunks in parallel where ``len(bounds) > 1``);
    the backward as torchvision's ``_roi_align_backward`` on the same chunks, or, with
    ``sparse_grad``, as one sparse-dense matrix product (:func:`roi_align_grad_matrix`)."""

    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                pooled_w: int, sampling_ratio: int, aligned: bool, chunks: int,
                sparse_grad: bool) -> Tensor:
        n, c, h, w = input.shape
        bounds = chunk_bounds(c, chunks)

        def pool(a: int, b: int) -> Tensor:
            return torch.ops.torchvision.roi_align(
                input[:, a:b] if (a, b) != (0, c) else input, rois, spatial_scale, pooled_h,
                pooled_w, sampling_ratio, aligned)

        out = pool(0, c) if len(bounds) == 1 else torch.cat(_run_chunks(pool, bounds), 1)
        ctx.save_for_backward(rois)
        ctx.meta = (n, h, w, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
        ctx.bounds, ctx.sparse_grad = bounds, sparse_grad
        ctx.channels_last = (input.is_contiguous(memory_format=torch.channels_last)
                             and not input.is_contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        none = (None,) * 8
        if ctx.sparse_grad:
            gi = _sparse_input_grad(grad, rois, ctx.meta, ctx.channels_last)
            if gi is not None:
                return (gi,) + none
        n, h, w, scale, ph, pw, sr, aligned = ctx.meta

        def unpool(a: int, b: int) -> Tensor:
            return torch.ops.torchvision._roi_align_backward(
                grad[:, a:b].contiguous(), rois, scale, ph, pw, n, b - a, h, w, sr, aligned)

        if len(ctx.bounds) == 1:
            return (unpool(*ctx.bounds[0]),) + none
        return (torch.cat(_run_chunks(unpool, ctx.bounds), 1),) + none


class ParallelROIAlign(ROIAlign):
    """detectron2's ``ROIAlign`` for CPUs (see the module docstring); same arguments and,
    forward, the same results.

    ``forward(input, rois)``: input (N, C, H, W) feature map, rois (R, 5) rows of (batch
    index, x0, y0, x1, y1) in input-image coordinates; returns (R, C, *output_size), in train
    and eval mode alike.

    Attributes (set by :func:`use_parallel_roi_align`):
        split_channels: run the channels in chunks on torch's intra-op threads (bit-identical).
        sparse_grad: compute the input gradient as a sparse matrix product
            (:func:`roi_align_grad_matrix`; bit-identical with a fixed sampling ratio of 1, 2
            or 4, float rounding with the adaptive grid).
    """

    split_channels: bool = True
    sparse_grad: bool = False

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        if input.device.type != "cpu" or input.dim() != 4 or input.is_quantized:
            return super().forward(input, rois)
        chunks = parallel_chunks(input.shape[1]) if self.split_channels else 1
        sparse = self.sparse_grad and input.requires_grad and torch.is_grad_enabled()
        if chunks < 2 and not sparse:
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
        out = _CPUROIAlign.apply(input, rois, float(self.spatial_scale), int(ph), int(pw),
                                 int(self.sampling_ratio), bool(self.aligned), chunks, sparse)
        return out.to(orig)


def use_parallel_roi_align(model: nn.Module, split_channels: bool = True,
                           sparse_grad: bool = False) -> int:
    """Switch every detectron2 ``ROIAlign`` in ``model`` (exactly that class, not its other
    subclasses; also those switched before, to the new settings) to
    :class:`ParallelROIAlign` with the given options; returns how many were switched."""
    n = 0
    for m in model.modules():
        if type(m) in (ROIAlign, ParallelROIAlign):
            m.__class__ = ParallelROIAlign
            m.split_channels, m.sparse_grad = bool(split_channels), bool(sparse_grad)
            n += 1
    return n
