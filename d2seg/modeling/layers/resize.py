"""Bilinear resizing as two small matrix products (``D2SEG.SPEED.MATMUL_RESIZE``).

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is separable: every output
row is a 2-tap mix of input rows, and every output column of input columns. So

    resize(x) = A_h @ x @ A_w^T,   A_h: (H_out, H_in),  A_w: (W_out, W_in)

with at most two non-zeros per matrix row (the same weights PyTorch uses). The forward is the
same result up to float rounding. What changes is the backward: PyTorch's bilinear backward
(eager CUDA, and inductor's decomposition of it under ``torch.compile``) scatters every output
gradient into its input pixels with atomic adds, one per output element and tap, contended
when the scale factor is large (PSPNet's 1x1..6x6 bins to stride 8, SegFormer's and HRNet's
stride-32 features to stride 4). On the H100 (SegFormer-B2, batch 16 at 512x512, compiled,
2026-11-26) one such fused kernel took 28.4 ms of the step's 59.4 ms of GPU time. With
matrices the backward is two more matrix products (``A_h^T @ g @ A_w``): no atomics, and a
deterministic result. The products do dense work (``H_in`` multiply-adds per output
element instead of 2), which a GPU's matrix units should absorb and a CPU does not: "auto"
uses them on CUDA only, for SegFormer, DeepLabV3+ (H100: 1.11x its step) and
``D2SEG.DETERMINISTIC`` runs, until a GPU measures the other models with both forms
(:mod:`d2seg.engine.fast_paths`).

Modules that resize feature maps have a ``resize_impl`` attribute ("interpolate" or
"matmul"); :func:`use_matmul_resize` switches a whole model.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["bilinear_matrix", "resize_bilinear", "use_matmul_resize", "RESIZE_IMPLS"]

RESIZE_IMPLS = ("interpolate", "matmul")

_CACHE: Dict[Tuple[int, int, str, torch.dtype], Tensor] = {}


def _build_matrix(n_in: int, n_out: int, device, dtype: torch.dtype) -> Tensor:
    # PyTorch's rule for align_corners=False with an output size: source = (dst + 0.5) *
    # (n_in / n_out) - 0.5, clamped at 0; taps floor(source) and the next one (clamped).
    dst = torch.arange(n_out, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    i0 = src.floor().clamp_max(n_in - 1)
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp_max(n_in - 1)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    m.scatter_add_(1, i0[:, None], (1.0 - frac)[:, None])
    m.scatter_add_(1, i1[:, None], frac[:, None])
    return m.to(dtype)


def bilinear_matrix(n_in: int, n_out: int, device=None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The (n_out, n_in) matrix of a 1-D bilinear resize (``align_corners=False``), as
    ``F.interpolate(..., size=...)`` weighs its taps. Cached per size, device and dtype
    outside ``torch.compile`` (built in the graph while compiling)."""
    if torch.compiler.is_compiling():
        return _build_matrix(n_in, n_out, device, dtype)
    key = (int(n_in), int(n_out), str(torch.device(device or "cpu")), dtype)
    m = _CACHE.get(key)
    if m is None:
        with torch.no_grad(), torch.inference_mode(False):
            m = _build_matrix(n_in, n_out, device, dtype)
        if len(_CACHE) > 256:  # many input sizes (inference on arbitrary images)
            _CACHE.clear()
        _CACHE[key] = m
    return m


def resize_bilinear(x: Tensor, size: Sequence[int], impl: str = "interpolate") -> Tensor:
    """Bilinear resize of (N, C, H, W) ``x`` to ``size`` = (H', W') (``align_corners=False``).

    Args:
        impl: "interpolate" (``F.interpolate``) or "matmul" (``A_h @ x @ A_w^T``: the same
            values up to float rounding, a backward without atomic adds; see the module).

    Returns:
        (N, C, H', W') in ``x``'s dtype and memory format (channels_last stays
        channels_last).
    """
    if impl not in RESIZE_IMPLS:
        raise ValueError(f"resize impl must be one of {RESIZE_IMPLS}, got '{impl}'")
    if impl == "interpolate" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # an export keeps the resize one operator with traced sizes (matrices would fix them)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    h_out, w_out = size[0], size[1]  # no int(): symbolic sizes stay symbolic when compiled
    n, c, h, w = x.shape
    # under autocast the products run in the autocast dtype; the matrices follow x otherwise
    dtype = x.dtype if x.is_floating_point() else torch.float32
    a_h = bilinear_matrix(h, h_out, x.device, dtype)
    a_w = bilinear_matrix(w, w_out, x.device, dtype)
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        # NCHW: (H', H) @ (N, C, H, W) -> (N, C, H', W) -> @ (W, W')
        return torch.matmul(torch.matmul(a_h, x), a_w.t())
    # channels_last: work on the (N, H, W, C) view, whose memory is contiguous
    t = x.permute(0, 2, 3, 1)
    t = torch.matmul(a_h, t.reshape(n, h, w * c)).reshape(n * h_out, w, c)
    t = torch.matmul(a_w, t).reshape(n, h_out, w_out, c)
    return t.permute(0, 3, 1, 2)


def use_matmul_resize(model: nn.Module, on: bool = True) -> int:
    """Set ``resize_impl`` to "matmul" (or back to "interpolate") on every module of ``model``
    that has one; returns how many modules were set."""
    impl = "matmul" if on else "interpolate"
    n = 0
    for m in model.modules():
        if hasattr(m, "resize_impl"):
            m.resize_impl = impl
            n += 1
    return n
