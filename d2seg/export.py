"""TorchScript and ONNX export, each checked against PyTorch on random inputs.

Both go through detectron2's ``TracingAdapter`` (which flattens the list-of-dicts inputs and
outputs of detectron2 models into tensors), as detectron2's ``tools/deploy/export_model.py``
"tracing" mode does:

* semantic models (``UNet``, ``DeepLabV3``, ``DeepLabV3Plus``, ``PSPNet``, detectron2's
  ``SemanticSegmentor``): input ``image`` (C, H, W) float, 0-255, channels in the config's
  ``INPUT.FORMAT`` (C = 3, or 1 for ``L``); output ``sem_seg`` (K, H, W) logits (K = 2 for a binary model). H and W are
  dynamic (padding to the size divisibility happens inside). torch's ONNX exporter cannot
  export ``adaptive_avg_pool2d`` to sizes other than 1x1 without a known input size (PSPNet's
  pyramid pooling: 2x2, 3x3, 6x6), so during ONNX export it is computed as two matrix products
  (:func:`exportable_adaptive_avg_pool2d`, same results). Should an export with dynamic axes
  still fail, a fixed-size ONNX file is written and ``dynamic`` is False.
* R-CNN (``GeneralizedRCNN``, Mask R-CNN): ``model.inference(do_postprocess=False)`` traced
  as detectron2 does; outputs boxes, classes, 28x28 mask probabilities, scores (and the image
  size) at the input resolution. See :func:`export_rcnn`.

:func:`compare_outputs` runs the exported file and PyTorch on fresh random images (of other
sizes than the export size where the export is dynamic) and reports the largest difference.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.export import TracingAdapter

logger = logging.getLogger(__name__)

__all__ = ["semantic_adapter", "export_semantic", "export_rcnn", "compare_outputs",
           "ExportResult", "exportable_adaptive_avg_pool2d", "onnx_friendly_ops",
           "TraceableGroupNorm", "make_group_norm_traceable"]

ONNX_OPSET = 17


class ExportResult(dict):
    """{"format", "path", "dynamic", "max_abs_diff", "checked_shapes", "error"}; R-CNN also
    "detections" (per checked image, so that a comparison on zero boxes shows) and
    "match_rate" (share of detections matched one to one, see :func:`match_detections`;
    "max_abs_diff" is then over the matched pairs)."""


def _pool_matrix(size: torch.Tensor, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) averaging matrix of adaptive pooling: row i averages [floor(i*size/bins),
    ceil((i+1)*size/bins)), as ``adaptive_avg_pool`` does."""
    pos = torch.arange(size, device=like.device)
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * size, bins, rounding_mode="floor")
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
    mask = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])).to(like.dtype)
    return mask / mask.sum(dim=1, keepdim=True)


def exportable_adaptive_avg_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as two matrix products, so that ONNX export keeps the input
    size dynamic (torch's ONNX exporter supports adaptive pooling only to 1x1 or for a known,
    divisible input size). Same results. x: (N, C, H, W) -> (N, C, oh, ow)."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[-2], x.shape[-1]
    oh = h if oh is None else oh
    ow = w if ow is None else ow
    ph = _pool_matrix(torch.as_tensor(h), int(oh), x)
    pw = _pool_matrix(torch.as_tensor(w), int(ow), x)
    return torch.matmul(torch.matmul(ph, x), pw.t())


@contextlib.contextmanager
def onnx_friendly_ops():
    """Within the block, ``F.adaptive_avg_pool2d`` (also behind ``nn.AdaptiveAvgPool2d``) is
    :func:`exportable_adaptive_avg_pool2d`: PSPNet's pyramid pooling and ASPP's image pooling
    then export to ONNX with a dynamic input size."""
    from torch.nn import functional as F

    original = F.adaptive_avg_pool2d
    F.adaptive_avg_pool2d = exportable_adaptive_avg_pool2d
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original


def input_channels(model: nn.Module) -> int:
    """Channels of the images ``model`` takes: one per ``pixel_mean`` value (3 for RGB / BGR,
    1 for ``INPUT.FORMAT L``); 3 for a model without ``pixel_mean``."""
    mean = getattr(model, "pixel_mean", None)
    return int(mean.numel()) if isinstance(mean, torch.Tensor) else 3


def semantic_adapter(model: nn.Module, height: int, width: int) -> TracingAdapter:
    """``TracingAdapter`` of a semantic model: (C, H, W) image -> (K, H, W) logits, C =
    :func:`input_channels`."""
    image = torch.rand(input_channels(model), height, width, device=_device(model)) * 255
    return TracingAdapter(model, [{"image": image}]).eval()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _onnx_export(adapter: nn.Module, args: Tuple, path: str, input_names: List[str],
                 output_names: List[str], dynamic_axes: Optional[Dict]) -> None:
    with torch.no_grad():
        torch.onnx.export(adapter, args, path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)


def _run_exported(fmt: str, path: str, inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    if fmt == "torchscript":
        ts = torch.jit.load(path)
        with torch.no_grad():
            out = ts(*inputs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.cpu().numpy() for o in out]
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: x.cpu().numpy() for n, x in zip(names, inputs)})


def compare_outputs(fmt: str, path: str, reference, sample_inputs: Sequence[Tuple]) -> float:
    """Largest |exported - PyTorch| over ``sample_inputs``; ``inf`` where the export gives NaN
    or inf and PyTorch a finite value.

    Args:
        fmt: "torchscript" or "onnx".
        reference: callable(*inputs) -> tuple of tensors (the PyTorch adapter).
        sample_inputs: tuples of input tensors.

    Raises:
        AssertionError: an output's shape differs.
    """
    worst = 0.0
    for inputs in sample_inputs:
        with torch.no_grad():
            ref = reference(*inputs)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = _run_exported(fmt, path, inputs)
        assert len(got) == len(ref), f"{path}: {len(got)} outputs, PyTorch has {len(ref)}"
        ref = [r.cpu().numpy() for r in ref]
        for g, r in zip(got, ref):
            assert g.shape == r.shape, f"{path}: output shape {g.shape}, PyTorch {r.shape}"
            if r.size:
                d = np.abs(g.astype(np.float64) - r)
                # a NaN / inf where PyTorch is finite is the worst difference (max() would
                # drop a NaN)
                if (~np.isfinite(d) & np.isfinite(r)).any():
                    return float("inf")
                worst = max(worst, float(np.nanmax(d)))
    return worst


def export_semantic(model: nn.Module, out_dir: str, height: int = 256, width: int = 256,
                    formats: Sequence[str] = ("torchscript", "onnx"),
                    check_sizes: Sequence[Tuple[int, int]] = ((192, 320), (250, 333)),
                    seed: int = 0, check_images: Optional[Sequence[torch.Tensor]] = None
                    ) -> List[ExportResult]:
    """Export a semantic model to ``out_dir/model.ts`` and/or ``out_dir/model.onnx``, checked.

    The exported graph returns the logits: a post-processor (``MODEL.SEM_SEG_POSTPROCESS``,
    numpy / OpenCV code a trace would freeze into constants) is left out, as are the test-time
    augmentations; ``tools/export_model.py`` names both in ``input_spec.json``.

    Args:
        model: the model (eval mode is set).
        height, width: the example input size used for tracing.
        check_sizes: (H, W) of the random images used to compare with PyTorch (for a fixed-size
            ONNX file, the export size is used instead); the default includes a size that is
            not a multiple of the model's size divisibility (padding inside the graph).
        check_images: (C, H, W) images (0-255, as the model takes them) compared as well,
            where the export has a dynamic size (e.g. real images of the dataset).

    Returns:
        One :class:`ExportResult` per format. A format that fails to export or to run is
        reported in its ``error`` rather than raised, as :func:`export_rcnn` does.
    """
    from .inference.sliding_window import without_postprocessor

    model.eval()
    with without_postprocessor(model):
        return _export_semantic(model, out_dir, height, width, formats, check_sizes, seed,
                                list(check_images or []))


def _export_semantic(model, out_dir, height, width, formats, check_sizes, seed, check_images):
    os.makedirs(out_dir, exist_ok=True)
    adapter = semantic_adapter(model, height, width)
    gen = torch.Generator().manual_seed(seed)
    dev = _device(model)

    c = input_channels(model)

    def samples(sizes):
        return [(torch.rand(c, h, w, generator=gen).to(dev) * 255,) for h, w in sizes]

    results = []
    for fmt in formats:
        if fmt not in ("torchscript", "onnx"):
            raise ValueError(f"unknown export format '{fmt}' (torchscript, onnx)")
        try:
            results.append(_export_semantic_format(fmt, adapter, out_dir, height, width,
                                                   check_sizes, samples,
                                                   [im.float().to(dev) for im in check_images]))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:600] if str(e) else ''}"
            logger.warning(f"{fmt} export: {err}")
            results.append(ExportResult(format=fmt, path="", dynamic=False,
                                        max_abs_diff=float("nan"), checked_shapes=[], error=err))
    return results


def _export_semantic_format(fmt: str, adapter: nn.Module, out_dir: str, height: int, width: int,
                            check_sizes: Sequence[Tuple[int, int]], samples: Callable,
                            images: Sequence[torch.Tensor] = ()) -> ExportResult:
    """One format of :func:`export_semantic`: export, then compare with PyTorch."""
    if fmt == "torchscript":
        path = os.path.join(out_dir, "model.ts")
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        traced.save(path)
        dynamic = True
    else:
        path = os.path.join(out_dir, "model.onnx")
        axes = {"image": {1: "height", 2: "width"}, "sem_seg": {1: "height", 2: "width"}}
        try:
            with onnx_friendly_ops():
                _onnx_export(adapter, adapter.flattened_inputs, path, ["image"], ["sem_seg"],
                             axes)
            dynamic = True
        except Exception as e:  # noqa: BLE001 - e.g. PSPNet's adaptive pooling
            logger.warning(f"ONNX export with a dynamic input size failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); exporting for a fixed "
                           f"{height}x{width} input instead")
            with onnx_friendly_ops():
                _onnx_export(adapter, adapter.flattened_inputs, path, ["image"], ["sem_seg"],
                             None)
            dynamic = False
    sizes = list(check_sizes) if dynamic else [(height, width)]
    if images and not dynamic:
        logger.warning(f"{fmt}: a fixed-size file takes only {height}x{width} images: the "
                       f"{len(images)} check images are not compared")
    inputs = samples(sizes) + ([(im,) for im in images] if dynamic else [])
    diff = compare_outputs(fmt, path, adapter, inputs)
    res = ExportResult(format=fmt, path=path, dynamic=dynamic, max_abs_diff=diff,
                       checked_shapes=[list(x[0].shape[1:]) for x in inputs], error="")
    logger.info(f"{fmt}: {path} ({'dynamic' if dynamic else 'fixed'} size); max |exported - "
                f"PyTorch| on {len(sizes)} random and {len(inputs) - len(sizes)} given "
                f"images: {diff:.3g}")
    return res


class TraceableGroupNorm(nn.Module):
    """``nn.GroupNorm`` without reshaping its input (group statistics through a (C, C)
    averaging matrix), so that it also runs on an empty batch once exported. torch's ONNX
    ``group_norm`` reshapes to (N, G, -1), which ONNX Runtime cannot do for N = 0: an exported
    Mask R-CNN with GN heads failed on every image without detections."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, gn.eps
        self.weight, self.bias = gn.weight, gn.bias
        c = gn.num_channels
        group = torch.arange(c) // (c // gn.num_groups)
        avg = (group[:, None] == group[None, :]).float() / (c // gn.num_groups)
        self.register_buffer("group_avg", avg, persistent=False)  # (C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        expand = (...,) + (None,) * len(dims)
        mean = torch.matmul(x.mean(dim=dims), self.group_avg)[expand]  # (N, C, 1, 1)
        centered = x - mean
        var = torch.matmul(centered.pow(2).mean(dim=dims), self.group_avg)[expand]
        y = centered / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[expand] + self.bias[expand]
        return y


def make_group_norm_traceable(model: nn.Module) -> int:
    """Replace every ``nn.GroupNorm`` of ``model`` by :class:`TraceableGroupNorm` (same
    parameters, same results); returns how many were replaced."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.GroupNorm) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    TraceableGroupNorm(m))
            n += 1
    return n


def match_detections(ref: List[np.ndarray], got: List[np.ndarray],
                     box_tol: float = 0.5, score_tol: float = 1e-3) -> Tuple[float, float]:
    """Match two detection lists (boxes, classes, masks, scores, ...) one to one.

    A pair matches when the class is equal, every box coordinate is within ``box_tol`` pixels
    and the scores within ``score_tol``. Detections are compared as sets: NMS and top-k may
    order (or, for near-equal scores, choose) detections differently in ONNX Runtime.

    Returns:
        (matched / max(len(ref), len(got)) (1.0 when both are empty), largest |difference| of
        boxes, scores and masks over the matched pairs).
    """
    rb, rc, rm, rs = ref[:4]
    gb, gc, gm, gs = got[:4]
    if len(rb) == 0 and len(gb) == 0:
        return 1.0, 0.0
    dist = np.abs(rb[:, None, :] - gb[None, :, :]).max(-1)
    ok = (rc[:, None] == gc[None, :]) & (dist <= box_tol) & \
        (np.abs(rs[:, None] - gs[None, :]) <= score_tol)
    used = np.zeros(len(gb), bool)
    worst, matched = 0.0, 0
    for i in np.argsort(-rs, kind="stable"):
        cand = np.where(ok[i] & ~used)[0]
        if not len(cand):
            continue
        j = cand[np.argmin(dist[i, cand])]
        used[j] = True
        matched += 1
        worst = max(worst, float(dist[i, j]), float(abs(rs[i] - gs[j])),
                    float(np.abs(rm[i] - gm[j]).max()) if rm[i].size else 0.0)
    return matched / max(len(rb), len(gb)), worst


def _rcnn_inference(model, inputs):
    # as detectron2's tools/deploy/export_model.py: raw outputs at the input resolution
    inst = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": inst}]


def export_rcnn(model: nn.Module, out_dir: str, height: int = 256, width: int = 256,
                formats: Sequence[str] = ("torchscript", "onnx"), seed: int = 0,
                check_images: Optional[Sequence[torch.Tensor]] = None) -> List[ExportResult]:
    """Trace an R-CNN (``GeneralizedRCNN``) with detectron2's ``TracingAdapter`` and check it.

    Outputs (flattened ``Instances`` at the input resolution, no post-processing): boxes
    (N, 4), classes (N,), mask probabilities (N, 1, 28, 28), scores (N,), image size; compared
    with PyTorch as detection sets (:func:`match_detections`). A format that fails to export
    or to run is reported in ``error`` rather than raised, so the caller sees what blocks it.

    Args:
        check_images: (C, H, W) float images (0-255, as the model takes them) to compare on;
            default two random images (a trained model may detect nothing on them).
    """
    model.eval()
    if "onnx" in formats:
        make_group_norm_traceable(model)
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    c = input_channels(model)
    image = torch.rand(c, height, width, generator=gen) * 255
    adapter = TracingAdapter(model, [{"image": image}], _rcnn_inference).eval()
    if check_images:
        samples = [(img.float(),) for img in check_images]
    else:
        samples = [(torch.rand(c, height, width, generator=gen) * 255,),
                   (torch.rand(c, height + 32, width - 32, generator=gen) * 255,)]
    results = []
    for fmt in formats:
        path = os.path.join(out_dir, "model.ts" if fmt == "torchscript" else "model.onnx")
        res = ExportResult(format=fmt, path=path, dynamic=True, max_abs_diff=float("nan"),
                           checked_shapes=[list(s[0].shape[1:]) for s in samples], error="",
                           match_rate=float("nan"), detections=[])
        try:
            if fmt == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
                traced.save(path)
            else:
                _onnx_export(adapter, adapter.flattened_inputs, path, ["image"],
                             ["boxes", "classes", "masks", "scores", "image_size"],
                             {"image": {1: "height", 2: "width"}})
            rates, diffs = [], []
            for inputs in samples:
                with torch.no_grad():
                    ref = [t.cpu().numpy() for t in adapter(*inputs)]
                got = _run_exported(fmt, path, inputs)
                assert [g.shape[1:] for g in got] == [r.shape[1:] for r in ref], \
                    f"{path}: output shapes {[g.shape for g in got]}, PyTorch " \
                    f"{[r.shape for r in ref]}"
                rate, diff = match_detections(ref, got)
                rates.append(rate)
                diffs.append(diff)
                res["detections"].append(int(len(ref[0])))
            res["match_rate"], res["max_abs_diff"] = min(rates), max(diffs)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:600]}"
            logger.warning(f"Mask R-CNN {fmt} export: {res['error']}")
        results.append(res)
    return results
