"""Training fast paths (``D2SEG.SPEED``), decided per model family and device in one place.

Every switch is a config key whose default is ``"auto"``; :func:`resolve` turns the config into
a :class:`SpeedPlan` (the effective value of every switch and why), and the rest of this
module applies it:

* :func:`configure_backends` - process-wide switches: cuDNN benchmark, TF32 (CUDA only);
* :func:`amp_dtype` - the autocast dtype of ``SOLVER.AMP.ENABLED`` training (or None);
* :func:`prepare_model` - channels_last, ``torch.compile`` of sub-modules with an eager
  fallback;
* :func:`optimizer_impl_kwargs` - ``fused`` / ``foreach`` for SGD, Adam and AdamW;
* :func:`loader_kwargs` - ``pin_memory``, ``persistent_workers``, ``prefetch_factor`` of the
  training data loader; :func:`apply_sharing_strategy` - how its workers share tensors;
  ``pack_samples`` wraps its mapper in :class:`d2seg.data.pack.PackedMapper` and
  ``device_prefetch`` the loader in
  :class:`d2seg.data.prefetch.DevicePrefetcher` (``d2seg.data.build.build_train_loader``).

``d2seg.engine.Trainer`` calls them (``build_model``, ``build_optimizer``, the AMP trainer,
``build_train_loader``); anything building a model through the Trainer gets the same fast
paths. The decision table (``"auto"``) is :data:`FAMILY_DEFAULTS` plus the device rules in
:func:`resolve`; docs/benchmarks.md ("Fast paths") explains the choices and what was measured.

Switch values are strings: ``"auto"``, ``"on"`` or ``"off"`` (also ``"true"``/``"false"``,
``"1"``/``"0"``). In YAML files quote them (YAML reads a bare ``on`` as a boolean).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, TYPE_CHECKING, Tuple

import torch
from torch import nn

# the torch.compile wrapper (its own module); its names stay importable from here
from .compiled_forward import (
    CompiledForward,
    compile_module,
    compiled_modules,
    user_dispatch_mode_active,
)

if TYPE_CHECKING:  # for annotations only
    from detectron2.config import CfgNode

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILY_DEFAULTS", "SpeedPlan", "model_family", "resolve", "configure_backends",
    "amp_dtype", "make_grad_scaler", "prepare_model", "compile_module", "CompiledForward",
    "to_channels_last", "optimizer_impl_kwargs", "loader_kwargs", "apply_sharing_strategy",
    "describe", "user_dispatch_mode_active", "compiled_modules", "cpu_has_native_bf16",
    "cpu_bf16_speedup", "resolve_amp", "CPU_BF16_MIN_SPEEDUP", "CPU_BF16_SPEEDUP_ENV",
]

#: What ``"auto"`` means, per device and model family (measured; docs/benchmarks.md):
#:
#: * cudnn_benchmark (CUDA only): on for the fixed-shape semantic models; off for R-CNN /
#:   panoptic, whose ROI heads change shape every iteration (cuDNN re-tunes each time:
#:   measured 1.8x slower Mask R-CNN and 4.6x slower Panoptic FPN with plain detectron2 on an
#:   H100).
#: * channels_last: CUDA: on for the semantic conv nets (NHWC tensor-core kernels), off for
#:   R-CNN / panoptic (ROIAlign makes NCHW copies of every FPN level; to be measured on a
#:   GPU). CPU: on for the conv families: oneDNN convolutions run NHWC natively (measured
#:   13-25% faster training steps for the CPU U-Net and the demo Mask R-CNN in fp32 on an
#:   Intel Xeon; U-Net 1.24-1.26x fp32 / 1.33-1.40x bf16 on an AMD EPYC), except R-CNN /
#:   panoptic under bf16 autocast (:func:`resolve`: 0.82-0.95x on the AMD EPYC).
#: * compile: CUDA: the semantic models' backbone and head (static shapes with fixed-size
#:   crops); off for R-CNN / panoptic (data-dependent proposal / ROI shapes recompile or
#:   graph-break). CPU: off, measured: compiled training steps ran 0.82-0.95x the eager
#:   defaults (U-Net, DeepLabV3+, the demo's Mask R-CNN; 2-core AMD EPYC, fp32 and bf16)
#:   after 44-99 s of compiling (docs/benchmarks.md, "torch.compile on CPU").
#:
#: AMP (``SOLVER.AMP.ENABLED``; on CPU bf16 only where :func:`cpu_bf16_speedup` measures it
#: faster), TF32 and the optimizer / loader switches do not depend on the family: see
#: :func:`resolve`. Inference AMP (``INFERENCE_AMP``) "auto" follows the training AMP for
#: semantic models and is off for R-CNN / panoptic ones ("on" turns it on for them too).
FAMILY_DEFAULTS: Dict[str, Dict[str, Dict[str, bool]]] = {
    "cuda": {
        "semantic": {"cudnn_benchmark": True, "channels_last": True, "compile": True},
        "rcnn": {"cudnn_benchmark": False, "channels_last": False, "compile": False},
        "panoptic": {"cudnn_benchmark": False, "channels_last": False, "compile": False},
        "other": {"cudnn_benchmark": False, "channels_last": False, "compile": False},
    },
    "cpu": {
        "semantic": {"cudnn_benchmark": False, "channels_last": True, "compile": False},
        "rcnn": {"cudnn_benchmark": False, "channels_last": True, "compile": False},
        "panoptic": {"cudnn_benchmark": False, "channels_last": True, "compile": False},
        "other": {"cudnn_benchmark": False, "channels_last": False, "compile": False},
    },
}

#: ``D2SEG.SPEED.COMPILE_MODE`` values; "auto" = "reduce-overhead" (CUDA graphs for the
#: training step, see :class:`CompiledForward`) on CUDA for ``CUDA_GRAPH_META_ARCHS``, else
#: "default".
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
#: Meta-architectures whose compiled training step is host-bound on a GPU, so that CUDA graphs
#: pay (measured on one H100, 2026-11-26, DeepLabV3+ R50, batch 16, 512x512, bf16: 491 img/s
#: with CUDA graphs, 369 eager, 290-306 compiled in the default mode - its host time per step
#: exceeded the GPU's). DeepLabV3 shares the backbone and head design. SegFormer (same card
#: and settings, third lease): 272 img/s with CUDA graphs, 241 in the default mode, 226 eager.
#: The U-Net's step is GPU-bound (98 % busy compiled) and keeps the default mode; PSPNet and
#: HRNet are not measured yet.
CUDA_GRAPH_META_ARCHS = ("DeepLabV3", "DeepLabV3Plus", "SegFormer")

#: Meta-architectures whose bilinear resizes ``D2SEG.SPEED.MATMUL_RESIZE: auto`` turns into
#: matrix products on CUDA. SegFormer: its compiled step spent 28.4 of 59.4 ms of GPU time in
#: the bilinear backward's atomic adds (one H100, 2026-11-26, B2, batch 16, 512x512, bf16),
#: which the matrix form does not have (the switched step itself is not yet measured: both
#: runs of the sixth lease were stopped by their time limits while compiling). DeepLabV3+:
#: measured, R50 with CUDA graphs at batch 16, 512x512, bf16 on one H100 (2026-11-27): 540
#: img/s with the matrix form, 486 in the same lease and 491 the day before with
#: F.interpolate (docs/benchmarks.md). The others keep F.interpolate until a GPU measures
#: them (``scripts/gpu_session.sh eighth-lease``). Whatever the model, ``D2SEG.DETERMINISTIC``
#: on CUDA turns it on: the interpolate backward's atomics are non-deterministic there, the
#: matrix products are not.
MATMUL_RESIZE_META_ARCHS = ("SegFormer", "DeepLabV3Plus")

#: Sub-modules compiled by default (``D2SEG.SPEED.COMPILE_MODULES = []``), per family.
DEFAULT_COMPILE_MODULES: Dict[str, Tuple[str, ...]] = {
    "semantic": ("backbone", "sem_seg_head"),
    "rcnn": ("backbone",),
    "panoptic": ("backbone",),
    "other": ("backbone",),
}

_SWITCH = {"auto": None, "on": True, "true": True, "1": True, "off": False, "false": False,
           "0": False}
_AMP_DTYPES = {"auto": None, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_OPT_IMPLS = ("auto", "fused", "foreach", "for-loop")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------
def model_family(cfg: CfgNode) -> str:
    """``"semantic"``, ``"rcnn"``, ``"panoptic"`` or ``"other"`` for ``MODEL.META_ARCHITECTURE``.

    semantic: detectron2's ``SemanticSegmentor`` and every d2seg
    ``EncoderDecoderSegmentor`` (UNet, DeepLabV3(+), PSPNet, ...); panoptic: ``PanopticFPN``
    (and subclasses); rcnn: ``GeneralizedRCNN`` (and subclasses), ``ProposalNetwork``.
    """
    name = cfg.MODEL.META_ARCHITECTURE
    from detectron2.modeling import META_ARCH_REGISTRY
    from detectron2.modeling.meta_arch import (GeneralizedRCNN, PanopticFPN, ProposalNetwork,
                                               SemanticSegmentor)

    from ..modeling.meta_arch.segmentor import EncoderDecoderSegmentor

    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return "other"
    if not isinstance(cls, type):
        return "other"
    if issubclass(cls, (SemanticSegmentor, EncoderDecoderSegmentor)):
        return "semantic"
    if issubclass(cls, PanopticFPN):
        return "panoptic"
    if issubclass(cls, (GeneralizedRCNN, ProposalNetwork)):
        return "rcnn"
    return "other"


@dataclasses.dataclass
class SpeedPlan:
    """The effective fast paths of one config (what :func:`resolve` decided)."""

    family: str
    device: str  # "cuda" or "cpu"
    amp_dtype: Optional[torch.dtype]  # None = no autocast (fp32)
    cudnn_benchmark: bool
    tf32: bool
    channels_last: bool
    compile: bool
    compile_modules: Tuple[str, ...]
    compile_mode: str
    compile_backend: str
    optimizer_impl: str  # "fused", "foreach" or "for-loop"
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int  # 0 = torch's default
    device_prefetch: bool = False
    device_prefetch_depth: int = 2
    nonfinite_check: str = "step"  # "step" or "lagged" (d2seg/engine/train_step.py)
    compact_labels: bool = False  # uint8 label maps from the "sem_seg" mapper
    rcnn_sync_free: bool = False  # d2seg/modeling/sync_free_rcnn.py
    rcnn_batched: bool = False  # d2seg/modeling/batched_rcnn.py
    fold_norm: bool = False  # d2seg/modeling/fold_norm.py
    matmul_resize: bool = False  # d2seg/modeling/layers/resize.py
    rcnn_indexed_masks: bool = False  # d2seg/modeling/indexed_masks.py
    parallel_roi_align: bool = False  # d2seg/modeling/layers/roi_align.py
    sparse_roi_align_grad: bool = False  # d2seg/modeling/layers/roi_align.py
    pack_samples: bool = False  # d2seg/data/pack.py
    sharing_strategy: str = ""  # torch.multiprocessing sharing strategy; "" = leave as is
    inference_amp_dtype: Optional[torch.dtype] = None  # eval-mode autocast; None = fp32
    notes: List[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("amp_dtype", "inference_amp_dtype"):
            d[key] = str(d[key]).replace("torch.", "") if d[key] is not None else None
        d["compile_modules"] = list(self.compile_modules)
        return d


def _switch(cfg, key: str) -> Optional[bool]:
    value = cfg.D2SEG.SPEED.get(key)
    s = str(value).strip().lower()
    if isinstance(value, bool):
        return value
    if s not in _SWITCH:
        raise ValueError(f"D2SEG.SPEED.{key} must be 'auto', 'on' or 'off', got '{value}'")
    return _SWITCH[s]


def _compact_labels_possible(cfg) -> Tuple[bool, str]:
    """(whether uint8 label maps can feed this model, what is missing if not)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from ..modeling.meta_arch.segmentor import EncoderDecoderSegmentor

    name = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, EncoderDecoderSegmentor)):
        return False, (f"a d2seg segmentor (MODEL.META_ARCHITECTURE '{name}' is not one; "
                       f"its head may need int64 labels)")
    ignore = int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    if not 0 <= ignore <= 255:
        return False, f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE in [0, 255], got {ignore}"
    n = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    if n > 256:  # class ids 0..n-1 must fit in uint8 (ADE20K-full, 847 classes, does not)
        return False, f"MODEL.SEM_SEG_HEAD.NUM_CLASSES <= 256, got {n}"
    return True, ""


def _device(cfg) -> str:
    dev = str(cfg.MODEL.DEVICE)
    if dev.startswith("cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _tf32_capable() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    except Exception:  # noqa: BLE001 - no usable device
        return False


def cuda_has_native_bf16() -> bool:
    """Whether the current GPU computes bf16 in hardware (Ampere and newer).
    ``torch.cuda.is_bf16_supported()`` alone also says True where bf16 is only emulated (V100,
    T4): slow there, so "auto" precision takes fp16 with a GradScaler instead."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles), as torch
    reports them. Without them bf16 is emulated and :func:`cpu_bf16_speedup` is not measured."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - an older torch without these probes
        return False


#: bf16 autocast is chosen on CPU ("auto") when it is at least this much faster than fp32.
CPU_BF16_MIN_SPEEDUP = 1.2
#: A first measurement in [low, high) is repeated twice and the median of the three is used:
#: every reading below a clear win, since a burst of other work on a shared CPU only has to
#: land in the bf16 rounds to make a 1.7x CPU read 0.7x (seen beside another training run).
CPU_BF16_RECHECK = (0.01, 1.55)
#: Environment variable that replaces the measurement by a number (tests pin it to 1.0, so
#: the suite runs the same precision on every CPU; users can pin the decision the same way).
CPU_BF16_SPEEDUP_ENV = "D2SEG_CPU_BF16_SPEEDUP"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a small convolution block's forward and backward on
    this CPU (two 3x3 convolutions, 64 channels, 4 x 56 x 56, channels_last; minimum of 5
    interleaved rounds; about 0.3 s, once per process; where that lands near the decision, in
    ``CPU_BF16_RECHECK``, the median of three such measurements).

    Returns 0.0 without native bf16 instructions (nothing is measured). Measured: 1.8-1.9 on
    an AMD EPYC (Zen 4), where a whole training step was 1.46x (Mask R-CNN R18-FPN) to 1.84x
    (U-Net) faster with bf16; an Intel Xeon with AVX512-BF16 but no AMX ran the steps 20-27 %
    slower in bf16 (docs/benchmarks.md, Fast paths). ``$D2SEG_CPU_BF16_SPEEDUP`` replaces the
    measurement.
    """
    env = os.environ.get(CPU_BF16_SPEEDUP_ENV, "").strip()
    if env:
        try:
            return float(env)
        except ValueError:
            raise ValueError(f"${CPU_BF16_SPEEDUP_ENV} must be a number (fp32 time / bf16 "
                             f"time), got '{env}'") from None
    if not cpu_has_native_bf16():
        return 0.0

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = block(x)
        y.float().sum().backward()
        return time.perf_counter() - t0

    def ratio() -> float:
        times: Dict[bool, List[float]] = {False: [], True: []}
        for r in range(5):
            for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
                times[bf16].append(step(bf16))
        return min(times[False]) / min(times[True])

    # callable from evaluation code; the global RNG (the convolutions' init) is left untouched.
    # One intra-op thread: the ratio is a property of the instruction set, and on one thread it
    # does not depend on what else the machine runs (measured on the 2-core dev CPU under a
    # parallel test run: 2 threads read 0.79-2.07x and chose fp32 2 times in 11, one thread read
    # 1.50-5.16x, 0 in 11). The caller's thread count is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            gen = torch.Generator().manual_seed(0)
            c = 64
            block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
            block = block.to(memory_format=torch.channels_last)
            x = torch.randn(4, c, 56, 56, generator=gen).to(memory_format=torch.channels_last)
            x.requires_grad_()
            step(False), step(True)  # oneDNN primitive creation
            return _rechecked(ratio)
    finally:
        torch.set_num_threads(threads)


def _rechecked(measure: Callable[[], float]) -> float:
    """``measure()``; where it lands in ``CPU_BF16_RECHECK`` (near the decision, where one burst
    of other work on a shared CPU can flip it: a 1.8x CPU once measured 0.93x), the median of
    it and two more measurements."""
    ratios = [measure()]
    if CPU_BF16_RECHECK[0] <= ratios[0] < CPU_BF16_RECHECK[1]:
        ratios += [measure(), measure()]
    return sorted(ratios)[len(ratios) // 2]


def _resolve_amp(cfg, device: str, notes: List[str]) -> Optional[torch.dtype]:
    raw = str(cfg.D2SEG.SPEED.AMP_DTYPE).strip().lower()
    if raw not in _AMP_DTYPES:
        raise ValueError(f"D2SEG.SPEED.AMP_DTYPE must be 'auto', 'float16' or 'bfloat16', got "
                         f"'{cfg.D2SEG.SPEED.AMP_DTYPE}'")
    if not cfg.SOLVER.AMP.ENABLED:
        info = getattr(cpu_bf16_speedup, "cache_info", None)  # replaced in tests
        measured = (info().currsize if info else 1) or os.environ.get(CPU_BF16_SPEEDUP_ENV)
        if device == "cpu" and not measured and cpu_has_native_bf16():
            notes.append("this CPU computes bf16 natively (AVX512-BF16 / AMX): with "
                         "SOLVER.AMP.ENABLED True d2seg measures whether bf16 autocast is "
                         "faster here and uses it if so (1.3-1.8x on an AMD EPYC Zen 4)")
        return None
    want = _AMP_DTYPES[raw]
    if device == "cuda":
        if want is None:  # auto: bf16 (no GradScaler, no overflow) where the GPU has it
            return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
        return want
    # CPU: only bf16 autocast exists in a usable form
    if want is torch.bfloat16:
        return torch.bfloat16
    if want is torch.float16:
        notes.append("SOLVER.AMP.ENABLED ignored on CPU with D2SEG.SPEED.AMP_DTYPE "
                     f"'{raw}' (set 'bfloat16' or 'auto' for CPU autocast)")
        return None
    # auto: bf16 where this CPU measurably runs it faster than fp32
    if cfg.D2SEG.get("DETERMINISTIC", False):
        notes.append("fp32 on CPU: D2SEG.DETERMINISTIC (AMP_DTYPE 'bfloat16' forces bf16)")
        return None
    speedup = cpu_bf16_speedup()
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        notes.append(f"bf16 autocast: a convolution block ran {speedup:.2f}x faster "
                     "in bf16 than in fp32 here (AMP_DTYPE 'auto'; SOLVER.AMP.ENABLED False "
                     "keeps fp32)")
        return torch.bfloat16
    why = ("no native bf16 instructions" if speedup == 0.0 else
           f"bf16 autocast measured {speedup:.2f}x fp32 here, under {CPU_BF16_MIN_SPEEDUP}x")
    notes.append(f"fp32 on CPU: {why} (AMP_DTYPE 'bfloat16' forces bf16)")
    return None


def _resolve_inference_amp(cfg, family: str, device: str,
                           amp: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The eval-mode autocast dtype (``D2SEG.SPEED.INFERENCE_AMP``) given the training one."""
    want = _switch(cfg, "INFERENCE_AMP")
    if want is None:
        # auto: semantic models evaluate in the precision they train in; R-CNN / panoptic ones
        # in fp32, as detectron2 does and as published AP / PQ are (bf16 moved the CPU demo
        # models' AP by up to 0.4 points: docs/benchmarks.md, "Mixed-precision inference")
        return amp if family == "semantic" else None
    if not want:
        return None
    if amp is not None:
        return amp
    if device == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    return torch.bfloat16


def resolve_amp(cfg: CfgNode) -> Tuple[Optional[torch.dtype], List[str]]:
    """The autocast dtype for ``cfg`` on this machine (None: fp32) and why, in words."""
    notes: List[str] = []
    return _resolve_amp(cfg, _device(cfg), notes), notes


def validate(cfg: CfgNode) -> None:
    """Check every ``D2SEG.SPEED`` (and ``D2SEG.NONFINITE``) value, deciding nothing and
    measuring nothing (no CPU bf16 probe): what :func:`resolve` would refuse, at config load.

    Raises:
        ValueError: naming the key and the value.
    """
    c = cfg.clone()
    c.defrost()
    c.SOLVER.AMP.ENABLED = False  # AMP_DTYPE is still checked; the probe does not run
    c.MODEL.DEVICE = "cpu"
    resolve(c)


def resolve(cfg: CfgNode) -> SpeedPlan:
    """Validate ``cfg.D2SEG.SPEED`` and decide every fast path for this config and device.

    Raises:
        ValueError: a ``D2SEG.SPEED`` value that is not allowed (the message names the key and
            the value).
    """
    sp = cfg.D2SEG.SPEED
    family = model_family(cfg)
    device = _device(cfg)
    notes: List[str] = []
    defaults = FAMILY_DEFAULTS[device][family]
    cuda = device == "cuda"
    deterministic = bool(cfg.D2SEG.get("DETERMINISTIC", False))

    amp = _resolve_amp(cfg, device, notes)
    infer_amp = _resolve_inference_amp(cfg, family, device, amp)

    bench = _switch(cfg, "CUDNN_BENCHMARK")
    if bench is None:  # detectron2's top-level CUDNN_BENCHMARK: True still means on
        bench = bool(cfg.get("CUDNN_BENCHMARK", False)) or defaults["cudnn_benchmark"]
    if deterministic and bench:
        notes.append("cuDNN benchmark off: D2SEG.DETERMINISTIC")
        bench = False
    bench = bench and cuda

    tf32 = _switch(cfg, "TF32")
    tf32 = (True if tf32 is None else tf32) and cuda and _tf32_capable()

    cl = _switch(cfg, "CHANNELS_LAST")
    if cl is None:
        cl = defaults["channels_last"]
        if cl and not cuda and family in ("rcnn", "panoptic") and amp is torch.bfloat16:
            # measured on an AMD EPYC (2 cores, batch 4, 256 px, 2026-11-27,
            # benchmarks/switch_ab.py): with bf16 autocast the R18-FPN Mask R-CNN step ran
            # 0.87-0.90x and Panoptic FPN 0.82-0.95x in channels_last; in fp32 0.98-1.09x
            # (1.13x on an Intel Xeon); the U-Net 1.24-1.26x in fp32, 1.33-1.40x in bf16
            cl = False
            notes.append("channels_last off: R-CNN / panoptic with bf16 autocast on CPU "
                         "(measured slower)")

    comp = _switch(cfg, "COMPILE")
    comp = defaults["compile"] if comp is None else comp
    modules = tuple(str(m) for m in sp.COMPILE_MODULES) or DEFAULT_COMPILE_MODULES[family]
    mode = str(sp.COMPILE_MODE)
    if mode not in COMPILE_MODES:
        raise ValueError(f"D2SEG.SPEED.COMPILE_MODE must be one of {COMPILE_MODES}, got "
                         f"'{mode}'")
    if mode == "auto":
        mode = ("reduce-overhead" if cuda and comp
                and cfg.MODEL.META_ARCHITECTURE in CUDA_GRAPH_META_ARCHS else "default")
    if not str(sp.COMPILE_BACKEND):
        raise ValueError("D2SEG.SPEED.COMPILE_BACKEND must name a torch.compile backend "
                         "(e.g. 'inductor'), got ''")
    # a name other than torch's usual ones: checked against dynamo's list (importing it costs
    # 0.3 s, not spent on every config load for the default)
    if not callable(sp.COMPILE_BACKEND) and \
            str(sp.COMPILE_BACKEND) not in ("inductor", "eager", "aot_eager"):
        try:
            from torch._dynamo import list_backends

            known = set(list_backends(exclude_tags=()))
            usual = sorted(set(list_backends()) | {"inductor", "eager", "aot_eager"})
        except Exception:  # noqa: BLE001 - older torch: leave the check to torch.compile
            known, usual = set(), []
        if known and str(sp.COMPILE_BACKEND) not in known:
            raise ValueError(f"D2SEG.SPEED.COMPILE_BACKEND must name a torch.compile backend "
                             f"(e.g. {', '.join(usual)}), got '{sp.COMPILE_BACKEND}'")

    impl = str(sp.OPTIMIZER_IMPL).strip().lower()
    if impl not in _OPT_IMPLS:
        raise ValueError(f"D2SEG.SPEED.OPTIMIZER_IMPL must be one of {_OPT_IMPLS}, got "
                         f"'{sp.OPTIMIZER_IMPL}'")
    if impl == "auto":  # fused wherever torch has the kernels (CPU too: measured 3-7x faster)
        impl = "fused"

    pin = _switch(cfg, "PIN_MEMORY")
    pin = cuda if pin is None else pin
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    persist = _switch(cfg, "PERSISTENT_WORKERS")
    # auto: off. The training loader is iterated once (an infinite sampler), so keeping
    # workers alive between iterators only matters for a resumed loader.
    persist = bool(persist) and workers > 0
    prefetch = int(sp.PREFETCH_FACTOR)
    if prefetch < 0:
        raise ValueError(f"D2SEG.SPEED.PREFETCH_FACTOR must be >= 0 (0 = torch's default), got "
                         f"{prefetch}")
    if workers == 0:
        prefetch = 0
    dev_prefetch = _switch(cfg, "DEVICE_PREFETCH")
    # auto: off (not yet measured on a GPU). Without loader workers the mapper would run in
    # its thread, where PositionSeededMapper's seeding and restoring of the process-wide
    # random states would race the training step's draws: off (d2seg.data.build warns)
    dev_prefetch = bool(dev_prefetch) and workers > 0
    depth = int(sp.get("DEVICE_PREFETCH_DEPTH", 2))
    if depth < 1:
        raise ValueError(f"D2SEG.SPEED.DEVICE_PREFETCH_DEPTH must be >= 1, got {depth}")
    compact = _switch(cfg, "COMPACT_LABELS")
    compact_ok, why = _compact_labels_possible(cfg)
    if compact and not compact_ok:
        raise ValueError(f"D2SEG.SPEED.COMPACT_LABELS 'on' needs {why}")
    compact = compact_ok if compact is None else compact
    sync_free = _switch(cfg, "RCNN_SYNC_FREE")
    # auto: on for R-CNN / panoptic models (same results, fewer host waits), on every device
    sync_free = family in ("rcnn", "panoptic") if sync_free is None else sync_free
    batched = _switch(cfg, "RCNN_BATCHED")
    # auto: on for R-CNN / panoptic models (same targets, one pass for the batch), every device
    batched = family in ("rcnn", "panoptic") if batched is None else batched
    indexed = _switch(cfg, "RCNN_INDEXED_MASKS")
    # auto: on for R-CNN / panoptic models (same targets; only bit masks are affected)
    indexed = family in ("rcnn", "panoptic") if indexed is None else indexed
    par_roi = _switch(cfg, "PARALLEL_ROI_ALIGN")
    # auto: on CPUs (torchvision's CPU ROIAlign runs on one thread; bit-identical results;
    # make demo's step: docs/benchmarks.md, Fast paths); a CUDA ROIAlign is left alone
    par_roi = (not cuda) if par_roi is None else par_roi
    sparse_roi = _switch(cfg, "SPARSE_ROI_ALIGN_GRAD")
    # auto: on CPUs (ROIAlign's backward as one sparse matrix product; make demo's step:
    # docs/benchmarks.md, Fast paths); CUDA keeps torchvision's kernels whatever the value
    sparse_roi = (not cuda) if sparse_roi is None else (sparse_roi and not cuda)
    fold = _switch(cfg, "FOLD_NORM")
    # auto: on for every family and device: the same results with one pass over memory per
    # fixed norm instead of three (measured on the CPU; docs/benchmarks.md "Fast paths")
    fold = True if fold is None else fold
    mresize = _switch(cfg, "MATMUL_RESIZE")
    # auto: on CUDA for MATMUL_RESIZE_META_ARCHS (SegFormer-B2: the bilinear backward's atomic
    # adds took 28 of 59 ms of GPU time on an H100; DeepLabV3+ R50: 540 vs 486-491 img/s) and
    # for D2SEG.DETERMINISTIC (the atomics' order varies); off on CPUs, where F.interpolate on
    # channels_last maps measured as fast or faster (docs/benchmarks.md, Fast paths)
    if mresize is None:
        mresize = cuda and (deterministic
                            or cfg.MODEL.META_ARCHITECTURE in MATMUL_RESIZE_META_ARCHS)
    pack = _switch(cfg, "PACK_SAMPLES")
    # auto: on where samples cross a process boundary (loader workers); there it saves the
    # training process a shared-memory handshake per tensor (docs/benchmarks.md)
    pack = workers > 0 if pack is None else pack
    sharing = str(sp.get("SHARING_STRATEGY", "auto")).strip().lower()
    offered = sorted(torch.multiprocessing.get_all_sharing_strategies())
    if sharing not in ("auto", "default", *offered):
        raise ValueError(f"D2SEG.SPEED.SHARING_STRATEGY must be 'auto', 'default' or one of "
                         f"{offered} (this machine's torch), got '{sp.SHARING_STRATEGY}'")
    if sharing == "auto":  # only where workers hand tensors over
        sharing = "file_system" if workers > 0 and "file_system" in offered else ""
    elif sharing == "default":
        sharing = ""
    from .train_step import CHECK_MODES

    check = str(cfg.D2SEG.NONFINITE.get("CHECK", "auto")).strip().lower()
    if check not in CHECK_MODES:
        raise ValueError(f"D2SEG.NONFINITE.CHECK must be 'auto', 'step' or 'lagged', got "
                         f"'{cfg.D2SEG.NONFINITE.CHECK}'")
    skips = int(cfg.D2SEG.NONFINITE.MAX_SKIPS)
    if check == "auto":  # lagged wherever a per-step check would make the host wait
        check = "lagged" if cuda and skips == 0 else "step"
    elif check == "lagged" and skips > 0:
        raise ValueError(f"D2SEG.NONFINITE.CHECK 'lagged' cannot skip steps "
                         f"(D2SEG.NONFINITE.MAX_SKIPS={skips}): use 'step' or 'auto'")
    return SpeedPlan(family=family, device=device, amp_dtype=amp, cudnn_benchmark=bench,
                     tf32=tf32, channels_last=bool(cl), compile=bool(comp),
                     compile_modules=modules, compile_mode=mode,
                     compile_backend=str(sp.COMPILE_BACKEND), optimizer_impl=impl,
                     pin_memory=bool(pin), persistent_workers=persist, prefetch_factor=prefetch,
                     device_prefetch=dev_prefetch, device_prefetch_depth=depth,
                     nonfinite_check=check, compact_labels=bool(compact),
                     rcnn_sync_free=bool(sync_free), rcnn_batched=bool(batched),
                     rcnn_indexed_masks=bool(indexed), parallel_roi_align=bool(par_roi),
                     sparse_roi_align_grad=bool(sparse_roi),
                     fold_norm=bool(fold), matmul_resize=bool(mresize),
                     pack_samples=bool(pack), sharing_strategy=sharing,
                     inference_amp_dtype=infer_amp, notes=notes)


def describe(cfg: CfgNode) -> str:
    """One log line with the effective fast paths of ``cfg``."""
    p = resolve(cfg)
    amp = str(p.amp_dtype).replace("torch.", "") if p.amp_dtype else "off"
    infer_amp = (str(p.inference_amp_dtype).replace("torch.", "") if p.inference_amp_dtype
                 else "off")
    onoff = {True: "on", False: "off"}
    comp = (f"{','.join(p.compile_modules)} ({p.compile_backend}, {p.compile_mode})"
            if p.compile else "off")
    return (f"family={p.family} device={p.device} amp={amp} inference_amp={infer_amp} "
            f"cudnn_benchmark={onoff[p.cudnn_benchmark]} tf32={onoff[p.tf32]} "
            f"channels_last={onoff[p.channels_last]} compile={comp} "
            f"optimizer={p.optimizer_impl} pin_memory={onoff[p.pin_memory]} "
            f"device_prefetch={onoff[p.device_prefetch]} nonfinite_check={p.nonfinite_check} "
            f"compact_labels={onoff[p.compact_labels]} rcnn_sync_free={onoff[p.rcnn_sync_free]} "
            f"rcnn_batched={onoff[p.rcnn_batched]} "
            f"rcnn_indexed_masks={onoff[p.rcnn_indexed_masks]} "
            f"parallel_roi_align={onoff[p.parallel_roi_align]} "
            f"sparse_roi_align_grad={onoff[p.sparse_roi_align_grad]} "
            f"fold_norm={onoff[p.fold_norm]} "
            f"matmul_resize={onoff[p.matmul_resize]} "
            f"pack_samples={onoff[p.pack_samples]} "
            f"sharing_strategy={p.sharing_strategy or 'default'}")


# ----------------------------------------------------------------------------------------
# process-wide switches and AMP
# ----------------------------------------------------------------------------------------
def configure_backends(cfg: CfgNode) -> SpeedPlan:
    """Set ``torch.backends.cudnn.benchmark`` and TF32 for ``cfg`` (CUDA only; on CPU nothing
    global is touched). Returns the plan.

    cuDNN benchmark: ``D2SEG.SPEED.CUDNN_BENCHMARK``; with "auto", detectron2's top-level
    ``CUDNN_BENCHMARK: True`` still turns it on, otherwise the family decides;
    ``D2SEG.DETERMINISTIC`` always turns it off. TF32 (``D2SEG.SPEED.TF32``, "auto" = on for
    Ampere and newer): ``torch.set_float32_matmul_precision("high")`` and cuDNN TF32 convs.
    """
    plan = resolve(cfg)
    for n in plan.notes:
        logger.info("Fast paths: %s", n)
    if plan.device != "cuda":
        return plan
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    if _tf32_capable():
        torch.set_float32_matmul_precision("high" if plan.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = plan.tf32
    return plan


def amp_dtype(cfg: CfgNode) -> Optional[torch.dtype]:
    """The autocast dtype for training with ``cfg`` (None: AMP off or not possible here).

    ``SOLVER.AMP.ENABLED`` turns AMP on; ``D2SEG.SPEED.AMP_DTYPE`` picks the dtype: "auto" =
    bfloat16 on GPUs that support it, else float16; on CPU, bfloat16 autocast where it is asked
    for, or ("auto") where :func:`cpu_bf16_speedup` measures it at least
    :data:`CPU_BF16_MIN_SPEEDUP` x faster than fp32, else fp32.
    """
    return resolve(cfg).amp_dtype


def make_grad_scaler(dtype: Optional[torch.dtype], device: str):
    """A GradScaler that is enabled only for float16 on CUDA (bfloat16 needs no loss scaling)."""
    return torch.amp.GradScaler(device if device == "cuda" else "cpu",
                                enabled=(dtype is torch.float16 and device == "cuda"))


# ----------------------------------------------------------------------------------------
# the model: channels_last, torch.compile
# ----------------------------------------------------------------------------------------
def _input_to_channels_last(module: nn.Module, args):
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters/buffers in channels_last, and the backbone's (N, C, H, W) input too.

    Values are unchanged (same math, another memory layout). Checkpoints do not record the
    layout, so they load either way. detectron2's keypoint heads stay in the default layout:
    their loss reshapes the head's output with ``.view``, which a channels_last tensor does
    not allow.
    """
    from detectron2.modeling.roi_heads.keypoint_head import BaseKeypointRCNNHead

    model.to(memory_format=torch.channels_last)
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and not getattr(backbone, "_d2seg_channels_last", False):
        backbone.register_forward_pre_hook(_input_to_channels_last)
        backbone._d2seg_channels_last = True
    for m in model.modules():
        if isinstance(m, BaseKeypointRCNNHead) and not getattr(m, "_d2seg_contiguous", False):
            m.to(memory_format=torch.contiguous_format)
            m.register_forward_pre_hook(_input_to_contiguous)
            m._d2seg_contiguous = True
    return model


def _input_to_contiguous(module: nn.Module, args):
    """Forward pre-hook: a 4-D tensor input in the default (NCHW) layout."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    if path in ("", "."):
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise ValueError(f"D2SEG.SPEED.COMPILE_MODULES: the model ({type(model).__name__}) has "
                         f"no sub-module '{path}'") from e


def prepare_model(model: nn.Module, cfg, plan: Optional[SpeedPlan] = None) -> nn.Module:
    """Apply the model fast paths of ``cfg`` to ``model`` (in place; returned for chaining).

    * ``D2SEG.SPEED.CHANNELS_LAST``: :func:`to_channels_last`.
    * ``D2SEG.SPEED.COMPILE``: :func:`compile_module` on each of ``COMPILE_MODULES`` (dotted
      sub-module paths; [] = the family's default, e.g. backbone + sem_seg_head; "." = the
      whole model), with ``COMPILE_MODE`` / ``COMPILE_BACKEND``. Compilation happens at the
      first forward; a failure logs one warning and runs eagerly.

    * ``D2SEG.SPEED.RCNN_SYNC_FREE``: :func:`d2seg.modeling.sync_free_rcnn.make_sync_free`
      (detectron2's matchers and ROI-head relabelling without host synchronisations).
    * ``D2SEG.SPEED.RCNN_BATCHED``:
      :func:`d2seg.modeling.batched_rcnn.make_batched` (RPN and ROI-head targets for
      the whole batch at once).
    * ``D2SEG.SPEED.RCNN_INDEXED_MASKS``:
      :func:`d2seg.modeling.indexed_masks.make_mask_targets_indexed` (bit-mask targets cropped
      by object index, no per-proposal mask copies).
    * ``D2SEG.SPEED.PARALLEL_ROI_ALIGN``:
      :func:`d2seg.modeling.layers.roi_align.use_parallel_roi_align` (CPU ROIAlign with its
      channels split over the intra-op threads).
    * ``D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD``: the same layer's input gradient as a sparse
      matrix product (:func:`d2seg.modeling.layers.roi_align.roi_align_grad_matrix`).
    * ``D2SEG.SPEED.FOLD_NORM``: :func:`d2seg.modeling.fold_norm.fold_norms` (frozen and
      eval-mode BatchNorms folded into the convolution before them).
    * ``D2SEG.SPEED.MATMUL_RESIZE``: :func:`d2seg.modeling.layers.resize.use_matmul_resize`
      (bilinear feature resizing as matrix products).
    * ``D2SEG.SPEED.INFERENCE_AMP``: :func:`d2seg.inference.autocast.use_inference_autocast`
      (eval-mode calls under autocast, outputs in fp32; "auto": semantic models only).
    * on CPU, semantic and panoptic models:
      :func:`d2seg.modeling.postprocessing.use_pixel_major_outputs` (eval outputs' "sem_seg"
      stored classes-innermost, so that ``argmax(0)`` is fast; d2seg's segmentors do it
      themselves, detectron2's ``SemanticSegmentor`` / ``PanopticFPN`` get it here).

    Call it after the model is on its device and frozen, before DDP wrapping.
    """
    plan = plan or resolve(cfg)
    if plan.rcnn_sync_free:
        from ..modeling.sync_free_rcnn import make_sync_free

        make_sync_free(model)
    if plan.rcnn_batched:
        from ..modeling.batched_rcnn import make_batched

        make_batched(model)
    if plan.rcnn_indexed_masks:
        from ..modeling.indexed_masks import make_mask_targets_indexed

        make_mask_targets_indexed(model)
    if plan.parallel_roi_align or plan.sparse_roi_align_grad:
        from ..modeling.layers.roi_align import use_parallel_roi_align

        use_parallel_roi_align(model, split_channels=plan.parallel_roi_align,
                               sparse_grad=plan.sparse_roi_align_grad)
    if plan.fold_norm:
        from ..modeling.fold_norm import fold_norms

        fold_norms(model)
    if plan.matmul_resize:
        from ..modeling.layers.resize import use_matmul_resize

        use_matmul_resize(model)
    if plan.channels_last:
        to_channels_last(model)
    if plan.compile:
        for path in plan.compile_modules:
            sub = _get_submodule(model, path)
            compile_module(sub, path if path not in ("", ".") else type(model).__name__,
                           mode=plan.compile_mode, backend=plan.compile_backend)
    if plan.device == "cpu" and plan.family in ("semantic", "panoptic"):
        # evaluators' argmax(0) over "sem_seg" reads contiguous memory (15x faster on CPU)
        from ..modeling.postprocessing import use_pixel_major_outputs

        use_pixel_major_outputs(model)
    if plan.inference_amp_dtype is not None:  # outermost: around a compiled whole model too
        from ..inference.autocast import use_inference_autocast

        use_inference_autocast(model, plan.inference_amp_dtype)
    return model


# ----------------------------------------------------------------------------------------
# optimizer and data loader
# ----------------------------------------------------------------------------------------
def _fused_devices() -> Tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except Exception:  # noqa: BLE001 - older torch: CUDA only
        return ("cuda",)


def optimizer_impl_kwargs(cfg: CfgNode, params: Iterable, plan: Optional[SpeedPlan] = None
                          ) -> Dict[str, bool]:
    """``{"fused": True}``, ``{"foreach": True}`` or ``{"foreach": False}`` for
    ``torch.optim.SGD/Adam/AdamW``, from ``D2SEG.SPEED.OPTIMIZER_IMPL``.

    "auto" = fused: one kernel per parameter group instead of several passes over every
    tensor (CUDA, and CPU with torch >= 2.4, where it measured 3-7x faster than foreach on
    the demo's 16 M parameters). Fused needs every parameter in a floating dtype on one device
    type that torch has fused kernels for; otherwise foreach is used (with a log line when
    fused was asked for explicitly). ``params``: tensors or param-group dicts.
    """
    plan = plan or resolve(cfg)
    impl = plan.optimizer_impl
    if impl == "fused":
        tensors: List[torch.Tensor] = []
        for p in params:
            tensors.extend(p["params"] if isinstance(p, dict) else [p])
        kinds = {t.device.type for t in tensors}
        ok = (len(kinds) == 1 and next(iter(kinds)) in _fused_devices()
              and all(t.dtype in _FUSED_DTYPES for t in tensors))
        if ok:
            return {"fused": True}
        if str(cfg.D2SEG.SPEED.OPTIMIZER_IMPL).lower() == "fused":
            logger.info("D2SEG.SPEED.OPTIMIZER_IMPL 'fused': no fused kernels for these "
                        "parameters (%s); using 'foreach'", sorted(kinds))
        impl = "foreach"
    return {"foreach": impl == "foreach"}


def prime_momentum_buffers(optimizer: torch.optim.Optimizer) -> int:
    """Give a fused SGD with momentum zero momentum buffers before its first step; returns
    how many were created.

    torch's fused SGD creates its momentum buffers with ``torch.empty_like`` (uninitialised)
    in its first step and fills them in the kernel, which a grad scaler's ``found_inf`` makes
    skip. fp16 training usually skips its first step (the initial scale 65536 overflows), so
    the second step read uninitialised memory: on CUDA, recycled activations, which made
    Mask R-CNN diverge in fp16 at random init ("Predicted boxes or scores contain Inf/NaN").
    With zero buffers the first applied step computes ``momentum * 0 + grad = grad``: what
    torch's first step does, for ``dampening = 0`` (detectron2's SGD; other dampening values
    are left alone). Only parameters without a buffer get one (resumed states keep theirs).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return 0
    made = 0
    for group in optimizer.param_groups:
        if not group.get("fused") or not group.get("momentum") or group.get("dampening"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                made += 1
    return made


def loader_kwargs(cfg: CfgNode, plan: Optional[SpeedPlan] = None) -> Dict[str, Any]:
    """``pin_memory`` / ``persistent_workers`` / ``prefetch_factor`` for detectron2's
    ``build_detection_train_loader`` (which passes them to ``torch.utils.data.DataLoader``).

    Only non-default values are returned (workers-only options only with workers)."""
    plan = plan or resolve(cfg)
    out: Dict[str, Any] = {}
    if plan.pin_memory:
        out["pin_memory"] = True
    if int(cfg.DATALOADER.NUM_WORKERS) > 0:
        if plan.persistent_workers:
            out["persistent_workers"] = True
        if plan.prefetch_factor > 0:
            out["prefetch_factor"] = plan.prefetch_factor
    return out


def apply_sharing_strategy(plan: SpeedPlan) -> Optional[str]:
    """Set ``torch.multiprocessing``'s sharing strategy to ``plan.sharing_strategy`` (process-wide;
    data-loader workers forked afterwards inherit it). Returns the strategy set, or None when
    the plan leaves it alone.

    With "file_descriptor" (torch's Linux default) the training process receives every tensor
    storage through a socket connection to the worker, with an authentication handshake that
    the worker answers only when its mapper releases the GIL; "file_system" passes a shared-
    memory name instead (torch's ``torch_shm_manager`` removes what a killed process leaves)."""
    if not plan.sharing_strategy:
        return None
    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() != plan.sharing_strategy:
        mp.set_sharing_strategy(plan.sharing_strategy)
        logger.info(f"torch.multiprocessing sharing strategy: {plan.sharing_strategy} "
                    f"(D2SEG.SPEED.SHARING_STRATEGY)")
    return plan.sharing_strategy
