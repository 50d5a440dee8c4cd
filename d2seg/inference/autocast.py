"""Mixed-precision inference (``D2SEG.SPEED.INFERENCE_AMP``).

:func:`use_inference_autocast` makes a model's eval-mode calls run under ``torch.autocast``
and return their floating-point outputs in fp32, so evaluators, writers and the threshold
search see the dtype they always see. Training-mode calls, TorchScript tracing / scripting and
ONNX export run the model's own forward unchanged. Parameters, ``state_dict`` keys and hooks
are untouched: the wrapper is stored as the instance attribute ``forward`` (as
:class:`d2seg.engine.compiled_forward.CompiledForward` is), so checkpoints load either way.

d2seg's semantic heads cast their logits to fp32 before upsampling them in eval mode, so only
the backbone and the head's layers run in reduced precision; on 7 ISBI models trained in bf16
on a CPU the membrane IoU of bf16 and fp32 inference differed by at most 0.07 points
(docs/benchmarks.md, "Mixed-precision inference").
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["InferenceAutocast", "use_inference_autocast", "inference_autocast_dtype",
           "outputs_to_fp32"]

_REDUCED = (torch.float16, torch.bfloat16)


def outputs_to_fp32(out: Any) -> Any:
    """``out`` with every fp16 / bf16 tensor in it (lists, tuples, dicts, detectron2
    ``Instances`` fields and ``Boxes``, nested) as fp32."""
    from detectron2.structures import Boxes, Instances

    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype in _REDUCED else out
    if isinstance(out, Instances):
        for name, value in out.get_fields().items():
            out.set(name, outputs_to_fp32(value))
        return out
    if isinstance(out, Boxes):
        return type(out)(outputs_to_fp32(out.tensor))
    if isinstance(out, dict):
        return type(out)((k, outputs_to_fp32(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(outputs_to_fp32(v) for v in out)
    return out


def _exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    onnx = getattr(torch, "onnx", None)
    probe = getattr(onnx, "is_in_onnx_export", None)
    return bool(probe()) if callable(probe) else False


class InferenceAutocast:
    """A module's ``forward`` whose eval-mode calls run under ``torch.autocast(dtype)``.

    Args:
        module: the model (its parameters' device picks the autocast device type at each
            call, so the model may be moved after wrapping).
        dtype: ``torch.bfloat16`` or ``torch.float16``.

    Calls in training mode, while tracing / scripting / exporting to ONNX, or with ``dtype``
    not supported on the module's device (fp16 on CPU) run the original forward. Outputs of
    the autocast calls pass through :func:`outputs_to_fp32`.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        if dtype not in _REDUCED:
            raise ValueError(f"inference autocast dtype must be float16 or bfloat16, got {dtype}")
        self.module, self.dtype = module, dtype
        self.eager = module.forward

    def _device_type(self) -> str:
        for p in self.module.parameters():
            return p.device.type
        for b in self.module.buffers():
            return b.device.type
        return "cpu"

    def __call__(self, *args, **kwargs):
        device_type = self._device_type()
        if (self.module.training or _exporting()
                or (device_type == "cpu" and self.dtype is not torch.bfloat16)
                or device_type not in ("cpu", "cuda")):
            return self.eager(*args, **kwargs)
        with torch.autocast(device_type, dtype=self.dtype):
            out = self.eager(*args, **kwargs)
        return outputs_to_fp32(out)


def use_inference_autocast(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Make ``model``'s eval-mode forward autocast to ``dtype`` (in place; returned).

    ``dtype=None`` removes a wrapper set earlier (fp32 inference). Wrapping twice replaces the
    dtype; it never nests.
    """
    current = model.__dict__.get("forward")
    if isinstance(current, InferenceAutocast):
        if dtype is None:
            if getattr(current.eager, "__func__", None) is type(model).forward:
                del model.__dict__["forward"]  # the class's forward again
            else:
                model.forward = current.eager
        else:
            current.dtype = dtype
        return model
    if dtype is not None:
        model.forward = InferenceAutocast(model, dtype)
    return model


def inference_autocast_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype ``model``'s eval-mode calls autocast to (None: fp32)."""
    model = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model
    current = model.__dict__.get("forward")
    return current.dtype if isinstance(current, InferenceAutocast) else None
