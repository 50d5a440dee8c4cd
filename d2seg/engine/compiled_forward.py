"""``torch.compile`` of a sub-module's forward with an eager fallback (``D2SEG.SPEED.COMPILE``).

:func:`compile_module` swaps a module's ``forward`` for a :class:`CompiledForward`: it compiles
at the first call, runs eagerly from then on if compiling or the compiled call fails while
the eager forward runs (logged once, with the reason), leaves CUDA-graph modes for calls outside training or inside a user's
dispatch mode, and reports its state (:func:`compiled_modules`). ``fast_paths.prepare_model``
applies it to the modules ``D2SEG.SPEED.COMPILE_MODULES`` names; ``fast_paths`` re-exports
these names.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

# logged under the fast paths' logger, where these lines were before this module existed
logger = logging.getLogger("d2seg.engine.fast_paths")

__all__ = ["CompiledForward", "compile_module", "compiled_modules", "user_dispatch_mode_active"]


def _dispatch_mode_probe() -> Callable[[], bool]:
    """``is_in_torch_dispatch_mode(include_infra_modes=False)`` where this torch has it, else
    whether any Python dispatch mode is active; never raises at call time."""
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode

        is_in_torch_dispatch_mode(include_infra_modes=False)
        return lambda: is_in_torch_dispatch_mode(include_infra_modes=False)
    except Exception:  # noqa: BLE001 - an older or newer torch without that signature
        pass
    try:  # pragma: no cover - torch without the helper
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        _get_current_dispatch_mode()
        return lambda: _get_current_dispatch_mode() is not None
    except Exception:  # noqa: BLE001  # pragma: no cover
        return lambda: False


_in_user_dispatch_mode = _dispatch_mode_probe()


def user_dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` other than torch's own (fake tensors, functionalization
    during tracing) is active: ``FlopCounterMode``, a logging or counting mode."""
    return bool(_in_user_dispatch_mode())


def _one_line(e: BaseException) -> str:
    """``"Type: message"`` on one line, at most 300 characters of message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


#: torch.compile modes that record CUDA graphs, and their counterpart without
_CUDA_GRAPH_MODES = {"reduce-overhead": "default",
                     "max-autotune": "max-autotune-no-cudagraphs"}


class CompiledForward:
    """A module's ``forward`` compiled with ``torch.compile``, falling back to eager.

    The first compiled call that raises while the same call runs eagerly (a dynamo / backend
    failure, at first use or at a later re-compilation) logs one warning, and this and every
    later call run the eager forward. A call that fails eagerly too raises the eager call's
    error (the forward's own: a bad target, a device assert), without the warning and with
    compiling kept on. Out-of-memory errors are re-raised. The module's parameters, ``state_dict`` keys and hooks
    are untouched (the compiled function is stored as the instance attribute ``forward``).

    A mode that records CUDA graphs ("reduce-overhead", "max-autotune") is used for training
    calls only (module in training mode, gradients enabled): the training step has one fixed
    input shape, replays one graph per step and frees the host from launching each kernel.
    Other calls - evaluation at each test image's size, a validation loss under ``no_grad``,
    a module whose parameters are all frozen (``D2SEG.FINETUNE.FREEZE``) - use the same mode
    without CUDA graphs ("default" / "max-autotune-no-cudagraphs"), so that no graph is
    recorded, and no memory pool kept, per input size. A frozen module's graph would have no
    backward, and torch's CUDA-graph trees before mid-2026 fail when such a graph's outputs
    feed another compiled CUDA-graph function (the head; pytorch#160281, fixed by
    pytorch#184102).

    Calls made while a user ``TorchDispatchMode`` is active (``FlopCounterMode``, d2seg's
    host-sync audit) run the eager forward. Dynamo does not compile under such a mode, and
    torch releases before the fix of pytorch/pytorch#190286 (mid-2026; torch 2.11 included)
    then mark the forward's code "skip" for good: every later call, with the mode gone, ran
    eagerly, silently (seen on the H100, 2026-11-26: no compiled region in any step after
    the audit).
    """

    def __init__(self, module: nn.Module, name: str, *, mode: str = "default",
                 backend: str = "inductor", dynamic: Optional[bool] = None):
        self.name, self.module, self.mode = name, module, mode
        self.eager = module.forward
        self._kwargs: Dict[str, Any] = {"backend": backend, "dynamic": dynamic}
        self.compiled = self._compile(mode)
        # the calls outside training, when ``mode`` records CUDA graphs (built at first use)
        self._other_mode = _CUDA_GRAPH_MODES.get(mode) if backend == "inductor" else None
        self._other = None
        self.failed: Optional[BaseException] = None
        self.first_call_s: Dict[str, float] = {}  # mode -> seconds of its first (compiling) call

    def _compile(self, mode: str):
        kwargs = dict(self._kwargs)
        if kwargs["backend"] == "inductor" and mode != "default":
            kwargs["mode"] = mode
        return torch.compile(self.eager, **kwargs)

    def _trains(self) -> bool:
        """A training call: training mode, gradients on, and a trainable parameter (so the
        recorded graph has a backward)."""
        if not (self.module.training and torch.is_grad_enabled()):
            return False
        return any(p.requires_grad for p in self.module.parameters())

    def _pick(self):
        if self._other_mode is None or self._trains():
            return self.compiled
        if self._other is None:
            self._other = self._compile(self._other_mode)
        return self._other

    def __call__(self, *args, **kwargs):
        if self.failed is None and not user_dispatch_mode_active():
            fn = self._pick()
            mode = self.mode if fn is self.compiled else self._other_mode
            first = mode not in self.first_call_s
            if first:  # a compile of minutes looks like a hang without this
                logger.info("torch.compile: compiling '%s' (mode '%s') at its first call; that "
                            "call takes longer (minutes for a large model with CUDA graphs on a "
                            "machine with an empty inductor cache)", self.name, mode)
                t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if first:
                    self.first_call_s[mode] = time.perf_counter() - t0
                    logger.info("torch.compile: '%s' (mode '%s') compiled; first call %.1f s",
                                self.name, mode, self.first_call_s[mode])
                return out
            except torch.OutOfMemoryError:
                if fn is self.compiled and self._other_mode is not None:
                    logger.error("Out of memory in '%s' compiled with CUDA graphs, whose memory "
                                 "pool is kept besides the allocator's cache: "
                                 "D2SEG.SPEED.COMPILE_MODE %s needs less memory", self.name,
                                 self._other_mode)
                raise
            except Exception as e:  # noqa: BLE001 - decided by the eager call below
                # The same call eagerly: if it fails too, the forward itself is at fault (a
                # bad target, a device assert), not the compiler: its own error, compiling
                # stays on. If it runs, the compiled call failed: eager from now on.
                out = self.eager(*args, **kwargs)
                self.failed = e
                logger.warning("torch.compile of '%s' failed (%s); running it eagerly from "
                               "now on (D2SEG.SPEED.COMPILE 'off' skips compiling)",
                               self.name, _one_line(e))
                return out
        return self.eager(*args, **kwargs)


    def status(self) -> Dict[str, Any]:
        """{"module", "mode", "backend", "eval_mode" (the CUDA-graph-free mode of other calls,
        or None), "failed" (the error that made it eager, or None), "first_call_s" (per mode,
        the seconds of its first call: the forward's compile, the backward's comes at the
        first backward)} - for logs and the benchmark JSON."""
        return {"module": self.name, "mode": self.mode, "backend": self._kwargs["backend"],
                "eval_mode": self._other_mode,
                "failed": None if self.failed is None else _one_line(self.failed),
                "first_call_s": {k: round(v, 3) for k, v in self.first_call_s.items()}}


def compiled_modules(model: nn.Module) -> List[Dict[str, Any]]:
    """:meth:`CompiledForward.status` of every compiled sub-module of ``model`` (DDP or not)."""
    model = getattr(model, "module", model)
    return [m.__dict__["forward"].status() for m in model.modules()
            if isinstance(m.__dict__.get("forward"), CompiledForward)]


def compile_module(module: nn.Module, name: str, *, mode: str = "default",
                   backend: str = "inductor") -> CompiledForward:
    """Replace ``module.forward`` by a :class:`CompiledForward` (in place); returns it."""
    if isinstance(module.__dict__.get("forward"), CompiledForward):
        return module.__dict__["forward"]
    wrapper = CompiledForward(module, name, mode=mode, backend=backend)
    module.forward = wrapper
    return wrapper
