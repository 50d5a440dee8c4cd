"""D2SEG.SPEED.FOLD_NORM measured alone: a detectron2 ResNet with FrozenBN (the model-zoo
backbone), each FrozenBatchNorm2d run as detectron2 runs it (conv, then ``x * scale + shift``)
and folded into its convolution (d2seg/modeling/fold_norm.py), in interleaved rounds.

    python benchmarks/fold_norm.py --json benchmarks/results/fold_norm_cpu.json   # CPU defaults
    python benchmarks/fold_norm.py --device cuda --batch 16 --size 800x1216 --precision bf16

Measures the training step of the backbone (forward + backward of all its outputs, the frozen
stem and res2 as in the zoo config: ``--freeze-at 2``) and its eval forward (no_grad), the
median over rounds, and the largest difference of the outputs relative to their scale.
The eval forward runs a third variant, ``folded_frozen``: the folded model with no parameter
requiring gradients (a predictor's model), whose layers reuse their cached fold instead of
recomputing it per call as trainable layers do: the fold's per-call cost in isolation.
On devices where forward-only calls run unfolded (``FOLD_FORWARD_ONLY_DEVICES``: all but the
CPU), a fourth variant, ``folded_always``, folds every call (the rule before 2026-11-27),
so one run shows what that rule costs or saves in training and eval. On CUDA the eval also
runs ``folded_cudnn``, an experiment and not a d2seg code path: the frozen folded model with
each conv + bias + ReLU (and the bottleneck's last conv + bias + shortcut + ReLU) as one
cuDNN call (``torch.cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``), the passes
that the profile of the seventh lease showed eager folding cannot save alone.
``--profile`` adds each eval variant's busiest kernels (torch.profiler, one forward).
Writes a JSON with the machine, settings and every round.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.resnet import build_resnet_backbone  # noqa: E402

from d2seg.modeling import fold_norm as fold_norm_module  # noqa: E402
from d2seg.modeling.fold_norm import fold_norms  # noqa: E402


def build_backbone(depth: int, freeze_at: int, seed: int = 0) -> nn.Module:
    """A detectron2 ResNet-``depth`` with FrozenBN and non-trivial frozen statistics."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    torch.manual_seed(seed)
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def cudnn_fused(model: nn.Module) -> nn.Module:
    """A copy of a folded, frozen ResNet whose stem and bottleneck blocks run their folded
    convolutions fused with bias, shortcut and ReLU in cuDNN (CUDA, eval only)."""
    from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock

    model = copy.deepcopy(model).requires_grad_(False)

    def conv(layer, x: torch.Tensor, z: torch.Tensor = None) -> torch.Tensor:
        w, b = layer._cached_fold(layer.norm)
        dt = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
              else x.dtype)
        x, w, b = x.to(dt), w.to(dt), b.to(dt)
        args = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        if z is None:
            return torch.cudnn_convolution_relu(x, w, b, *args)
        return torch.cudnn_convolution_add_relu(x, w, z.to(dt), 1.0, b, *args)

    def stem_forward(self, x):
        return torch.nn.functional.max_pool2d(conv(self.conv1, x), 3, 2, 1)

    def block_forward(self, x):
        out = conv(self.conv2, conv(self.conv1, x))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return conv(self.conv3, out, z=shortcut)

    for m in model.modules():
        if isinstance(m, BasicStem):
            m.forward = stem_forward.__get__(m)
        elif isinstance(m, BottleneckBlock):
            m.forward = block_forward.__get__(m)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: List[str] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--freeze-at", type=int, default=2, help="MODEL.BACKBONE.FREEZE_AT (zoo: 2)")
    ap.add_argument("--batch", type=int, default=0, help="0: 2 on CPU, 16 on CUDA")
    ap.add_argument("--size", default="", help="HxW; default 512x768 on CPU, 800x1216 on CUDA")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="auto: as D2SEG.SPEED decides for R-CNN models (CPU on, CUDA off)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=0, help="steps per round (0: 2 CPU, 10 CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: default)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one eval forward of each variant (top kernels)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if a.device == "auto" else a.device))
    cuda = dev.type == "cuda"
    if not cuda and a.threads > 0:
        torch.set_num_threads(a.threads)
    batch = a.batch or (16 if cuda else 2)
    h, w = (int(v) for v in (a.size or ("800x1216" if cuda else "512x768")).split("x"))
    precision = a.precision or ("bf16" if cuda else "fp32")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    channels_last = (not cuda) if a.channels_last == "auto" else a.channels_last == "on"
    iters = a.iters or (10 if cuda else 2)

    plain = build_backbone(a.depth, a.freeze_at).to(dev)
    folded = copy.deepcopy(plain)
    n_folded = fold_norms(folded)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, folded = plain.to(memory_format=fmt), folded.to(memory_format=fmt)
    folded_frozen = copy.deepcopy(folded).requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, h, w, generator=gen).to(dev).contiguous(memory_format=fmt)

    def fwd(model: nn.Module) -> Dict[str, torch.Tensor]:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return model(x)

    def train_step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        out = fwd(model)
        sum(v.float().mean() for v in out.values()).backward()

    @torch.no_grad()
    def eval_step(model: nn.Module) -> None:
        fwd(model)

    default_devices = fold_norm_module.FOLD_FORWARD_ONLY_DEVICES
    always = dev.type not in default_devices  # a folded_always variant differs here

    @contextlib.contextmanager
    def fold_every_call(on: bool = True):
        """Forward-only calls on this device fold too (the rule before 2026-11-27)."""
        if on:
            fold_norm_module.FOLD_FORWARD_ONLY_DEVICES = default_devices + (dev.type,)
        try:
            yield
        finally:
            fold_norm_module.FOLD_FORWARD_ONLY_DEVICES = default_devices

    def run(step, name: str, model: nn.Module) -> None:
        with fold_every_call(name == "folded_always"):
            step(model)

    # equality first: the fold changes only float rounding
    plain.eval(), folded.eval(), folded_frozen.eval()
    with torch.no_grad():
        ref = fwd(plain)
        with fold_every_call():  # the folded computation, on every device
            out, out_frozen = fwd(folded), fwd(folded_frozen)
    rel_diff = max(((o[k].float() - ref[k].float()).abs().max()
                    / ref[k].float().abs().max()).item() for k in ref for o in (out, out_frozen))
    fused, fused_note = None, ""
    if cuda:  # the cuDNN-fused experiment (eval only); recorded, never fatal
        try:
            fused = cudnn_fused(folded_frozen).eval()
            with torch.no_grad():
                out_fused = fwd(fused)
            fused_diff = max(((out_fused[k].float() - ref[k].float()).abs().max()
                              / ref[k].float().abs().max()).item() for k in ref)
            fused_note = f"largest output difference {fused_diff:.1e}"
        except Exception as e:  # noqa: BLE001 - the ops may not support this dtype or cuDNN
            fused, fused_note = None, f"failed: {type(e).__name__}: {e}"[:300]

    results: Dict[str, Dict[str, List[float]]] = {}
    peak: Dict[str, float] = {}
    for mode, step, train in (("train", train_step, True), ("eval", eval_step, False)):
        variants = [("detectron2", plain), ("folded", folded)]
        if always:
            variants.append(("folded_always", folded))
        if not train:  # no gradients: the cached fold of a frozen model
            variants.append(("folded_frozen", folded_frozen))
            if fused is not None:
                variants.append(("folded_cudnn", fused))
        for _, model in variants:
            model.train(train)
        results[mode] = {name: [] for name, _ in variants}
        for name, model in variants:  # warm-up
            run(step, name, model)
        _sync(dev)
        for _ in range(a.rounds):
            for name, model in variants:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    run(step, name, model)
                _sync(dev)
                results[mode][name].append((time.perf_counter() - t0) / iters * 1000.0)
                if cuda:
                    peak[f"{mode}_{name}"] = torch.cuda.max_memory_allocated(dev) / 2**30
    summary = {mode: {name: statistics.median(v) for name, v in r.items()}
               for mode, r in results.items()}
    speedup = {mode: s["detectron2"] / s["folded"] for mode, s in summary.items()}
    speedup["eval_frozen"] = summary["eval"]["detectron2"] / summary["eval"]["folded_frozen"]
    if always:
        for mode in ("train", "eval"):
            speedup[f"{mode}_always"] = (summary[mode]["detectron2"]
                                         / summary[mode]["folded_always"])
    if fused is not None:
        speedup["eval_cudnn"] = summary["eval"]["detectron2"] / summary["eval"]["folded_cudnn"]
    profiles: Dict[str, str] = {}
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for name, model in (("detectron2", plain), ("folded", folded),
                            ("folded_frozen", folded_frozen)) + (
                                (("folded_always", folded),) if always else ()) + (
                                (("folded_cudnn", fused),) if fused is not None else ()):
            model.eval()
            with profile(activities=acts) as prof:
                run(eval_step, name, model)
                _sync(dev)
            profiles[name] = prof.key_averages().table(sort_by=key, row_limit=12)
    machine = (torch.cuda.get_device_name(dev) if cuda else
               f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
               f"{torch.get_num_threads()} torch threads")
    record = {
        "what": "D2SEG.SPEED.FOLD_NORM: detectron2 ResNet with FrozenBN, each norm as "
                "detectron2 runs it vs folded into its conv (benchmarks/fold_norm.py)",
        "machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "fold_forward_only_devices": list(default_devices),
        "settings": {"depth": a.depth, "freeze_at": a.freeze_at, "batch": batch,
                     "size": [h, w], "precision": precision, "channels_last": channels_last,
                     "rounds": a.rounds, "iters": iters, "device": str(dev)},
        "layers_folded": n_folded, "max_rel_output_diff": rel_diff,
        "folded_cudnn": fused_note,
        "ms_per_step_median": summary, "speedup": speedup, "rounds_ms": results,
        "peak_memory_gib": peak, "eval_profiles": profiles,
    }
    print(f"fold_norm: R{a.depth} FrozenBN backbone, {n_folded} layers folded, batch {batch}, "
          f"{h}x{w}, {precision}, channels_last {'on' if channels_last else 'off'}, {machine}")
    for mode in ("train", "eval"):
        s = summary[mode]
        print(f"  {mode:5s}: detectron2 {s['detectron2']:.1f} ms, folded {s['folded']:.1f} ms "
              f"-> {speedup[mode]:.2f}x")
    print(f"  eval, frozen model (cached fold): {summary['eval']['folded_frozen']:.1f} ms -> "
          f"{speedup['eval_frozen']:.2f}x")
    if always:
        for mode in ("train", "eval"):
            print(f"  {mode:5s}, every call folded (folded_always): "
                  f"{summary[mode]['folded_always']:.1f} ms -> {speedup[mode + '_always']:.2f}x")
    if fused_note:
        line = (f"{summary['eval']['folded_cudnn']:.1f} ms -> {speedup['eval_cudnn']:.2f}x, "
                if fused is not None else "")
        print(f"  eval, cuDNN-fused conv + bias + (shortcut +) ReLU: {line}{fused_note}")
    for name, table in profiles.items():
        print(f"  eval forward profile, {name}:\n{table}")
    if peak:
        print("  peak memory GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in peak.items()))
    print(f"  largest output difference relative to the output's scale: {rel_diff:.1e}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"  JSON: {a.json}")
    return record


if __name__ == "__main__":
    main()
