"""The benchmark harness: d2seg models and reference implementations of the same networks,
side by side in one process, same batch, image size and precision; every claim is a ratio of
two numbers measured in the same run.

Per case (one d2seg config) and per subject (d2seg's ``Trainer`` and each reference):

* **train step alone**: a synthetic batch already on the device; forward + loss + backward +
  optimizer step, ``warmup`` steps excluded; ``repeats`` rounds of ``iters`` steps, subjects
  interleaved round by round (so a slow-down of a shared machine hits every subject); the
  device is synchronised around each round. ``img_per_s`` = batch x iters / median round.
* **train_net loop** (d2seg only): ``Trainer.train()`` with the config's real data loading and
  every hook; reported also as a fraction of the step-alone img/s.
* **inference**: latency at batch 1 (median of single synchronised calls) and throughput at
  ``infer_batch`` (eval mode, no gradients, same autocast).
* **peak memory** of the train step and of inference (CUDA allocator peaks; CPU: peak RSS
  increase, approximate; see :class:`~d2seg.benchmark.measure.MemoryMeter`).
* **host synchronisations** of one train step, with the source line of each (CUDA: the
  sync debug mode; CPU: an emulation; see :class:`~d2seg.benchmark.syncs.HostSyncAudit`).
* **profile** (``profile_steps > 0``): ``torch.profiler`` over that many train steps: wall and
  device-kernel time per step (their ratio: how busy the host keeps the GPU) and the top
  operators by device (CUDA) or host (CPU) time, and by host time (where the host spends a
  step, CUDA runtime calls such as ``cudaStreamSynchronize`` included); with a train_net
  loop, also that many loop iterations after its timed window (``loop["profile"]``).

:func:`run_benchmark` returns a JSON-able dict; :func:`format_report` renders markdown.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import time
import traceback
from typing import Dict, Iterator, List, Optional, Sequence, TYPE_CHECKING, Tuple

import torch

from .measure import (MemoryMeter, ThreadCPU, Timer, backend_flags, capture_backend_flags,
                      free_memory, is_oom, machine_info, sync, thread_cpu_per_iter)
from .references import reference_unavailable
from .subjects import (D2SegSubject, Subject, SyntheticBatch, build_reference_subject, task_of)

if TYPE_CHECKING:  # for annotations only
    from detectron2.config import CfgNode

logger = logging.getLogger(__name__)

__all__ = ["Case", "Settings", "Target", "run_benchmark", "run_case", "auto_references",
           "audit_host_syncs", "profile_steps",
           "evaluate_targets", "format_report", "resolve_device", "SCHEMA"]

SCHEMA = "d2seg-benchmark/1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Case:
    """One d2seg config measured against its references.

    ``references``: names (``plain_d2`` or keys of ``references.REFERENCES``); None = chosen
    from the meta-architecture by :func:`auto_references`. ``opts``: ``KEY VALUE`` pairs of
    this case (the user's command-line opts come after and win). ``loop``: also run the
    real train_net loop.
    """

    name: str
    config_file: str
    opts: List[str] = dataclasses.field(default_factory=list)
    references: Optional[List[str]] = None
    loop: bool = True


@dataclasses.dataclass
class Settings:
    """Everything that is the same for every subject of a run (recorded in the JSON)."""

    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"
    precision: str = "fp32"  # fp32 | bf16 | fp16: same autocast for d2seg and references
    batch: int = 2
    size: Tuple[int, int] = (256, 256)  # (H, W) of the synthetic batch
    warmup: int = 2  # train steps before timing (per subject)
    iters: int = 5  # train steps per timed round
    repeats: int = 3  # timed rounds, subjects interleaved
    infer_batch: int = 0  # 0 = batch
    infer_iters: int = 5  # calls per inference-throughput measurement
    latency_iters: int = 10  # single batch-1 calls for the latency median
    loop_warmup: int = 3  # train_net loop iterations before its timing window
    loop_iters: int = 10  # timed train_net loop iterations (0 = no loop)
    inference: bool = True
    lr: float = 1e-3  # SOLVER.BASE_LR of every subject: random-data training stays finite
    instances_per_image: int = 4  # synthetic objects per image (instance / panoptic)
    seed: int = 0
    statistic: str = "median"  # img/s from the "median" or the "min" (best) timed round
    threads: int = 0  # torch.set_num_threads on CPU (0: torch's default)
    quiet: bool = True  # hide detectron2 / d2seg INFO logging (config dumps, metrics)
    # Process-wide backend switches of the references: "plain" = PyTorch's defaults except the
    # TF32 switches, copied from d2seg's (same precision on both sides); "same" = all of
    # d2seg's (cuDNN benchmark included), to see what is left without them.
    ref_backend: str = "plain"
    # > 0: profile that many train steps of every subject (torch.profiler): device-busy
    # fraction of the wall time (host-bound steps leave the GPU idle) and the top operators
    profile_steps: int = 0
    opts: List[str] = dataclasses.field(default_factory=list)  # user's KEY VALUE (d2seg side)


@dataclasses.dataclass
class Target:
    """A pass/fail claim computed from measured numbers.

    ``kind``:
      * "speedup": d2seg train img/s of ``case`` / ``reference``'s  >= ``threshold``
      * "loop_fraction": train_net loop img/s / step-alone img/s of ``case`` >= ``threshold``
      * "step_time_ratio": d2seg s/iter of ``case`` / d2seg s/iter of ``other_case``
        <= ``threshold``
      * "reference_img_per_s": ``reference``'s train img/s in ``case`` compared with a stated
        number (``threshold``); informational (no pass/fail), e.g. plain detectron2's 49 img/s

    ``informational``: status "info" instead of pass / FAIL (a bar shown for context, e.g. the
    GPU target next to a smoke run's CPU ratio, which no tiny CPU run is meant to reach).
    """

    name: str
    kind: str
    case: str
    threshold: float
    reference: str = ""
    other_case: str = ""
    informational: bool = False


def resolve_device(name: str) -> torch.device:
    """``--device``: "auto" = CUDA when available, else the CPU; a CUDA device without CUDA
    raises ``RuntimeError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return dev


def auto_references(cfg: CfgNode) -> List[str]:
    """The references of a config's network, chosen by ``MODEL.META_ARCHITECTURE``."""
    arch = cfg.MODEL.META_ARCHITECTURE
    bb = cfg.MODEL.BACKBONE.NAME
    r50 = cfg.MODEL.RESNETS.DEPTH == 50
    if arch == "UNet":
        return ["plain_unet", "smp_unet_r34"] if bb == "build_unet_backbone" else []
    if arch == "DeepLabV3Plus":
        return ["plain_deeplabv3plus_r50", "smp_deeplabv3plus_r50"] if r50 else []
    if arch == "DeepLabV3":
        return ["tv_deeplabv3_r50"] if r50 else []
    if arch == "PSPNet":
        return ["smp_pspnet_r50"] if r50 else []
    if arch == "GeneralizedRCNN":
        return ["plain_d2"] + (["tv_maskrcnn_r50_fpn"] if r50 and cfg.MODEL.MASK_ON else [])
    return ["plain_d2"]  # PanopticFPN, SemanticSegmentor, ...


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _config_path(path: str) -> str:
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    alt = os.path.join(REPO, path)
    return alt if os.path.isfile(alt) else path


def _batch_for(subject: Subject, cfg, task: str, n: int, size: Tuple[int, int],
               device: torch.device, s: Settings) -> SyntheticBatch:
    return SyntheticBatch(task, n, size[0], size[1], device,
                          num_sem_classes=int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
                          num_thing_classes=int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
                          instances_per_image=s.instances_per_image, seed=s.seed)


def _measure_inference(sub: Subject, cfg, task, device, s: Settings, infer_batch: int) -> Dict:
    out: Dict[str, object] = {}
    sub.set_infer_batch(_batch_for(sub, cfg, task, 1, s.size, device, s))
    for _ in range(2):
        outputs = sub.infer()
    dets = sub.detections(outputs)
    if dets is not None:  # the work an inference call did (untimed call's outputs)
        out["detections_batch1"] = dets
    lat = []
    for _ in range(s.latency_iters):
        with Timer(device) as t:
            sub.infer()
        lat.append(t.seconds)
    out["latency_batch1_ms"] = 1000 * _median(lat)
    out["latency_ms_all"] = [1000 * x for x in lat]
    sub.set_infer_batch(_batch_for(sub, cfg, task, infer_batch, s.size, device, s))
    # peak memory of one untimed call (on a CPU the meter samples RSS from a thread, which
    # would compete with the timed calls below)
    with MemoryMeter(device) as mem:
        dets = sub.detections(sub.infer())
    if dets is not None:
        out["detections_per_image"] = dets
    # two timed blocks (one synchronisation between them), so that a comparison of runs
    # (d2seg/benchmark/compare.py) sees how far the throughput moved within this one
    sizes = [s.infer_iters - s.infer_iters // 2, s.infer_iters // 2] if s.infer_iters > 1 \
        else [s.infer_iters]
    blocks = []
    for n in sizes:
        with Timer(device) as t:
            for _ in range(n):
                sub.infer()
        blocks.append(t.seconds)
    total = sum(blocks)
    out.update(throughput_batch=infer_batch, throughput_seconds=total,
               throughput_calls=s.infer_iters,
               throughput_blocks=[{"calls": n, "seconds": b} for n, b in zip(sizes, blocks)],
               throughput_img_per_s=infer_batch * s.infer_iters / total)
    return {"inference": out, "inference_memory": mem.result}


def _same_layout(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts have the same keys, shapes and dtypes."""
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@contextlib.contextmanager
def _inference_weights(d2: Subject, sub: Subject) -> Iterator[str]:
    """Inside: ``sub`` holds d2seg's trained weights when its layout is d2seg's (plain
    detectron2 for a detectron2 architecture); yields "d2seg's" then, "own" otherwise, and
    puts ``sub``'s own weights back on exit.

    Each subject trained on its own for the timed rounds, so their weights differ. For a
    semantic model that changes nothing an inference call does, but a detector's cost grows
    with its detections (up to ``TEST.DETECTIONS_PER_IMAGE``; the mask head and the mask
    pasting run per detection), and two randomly initialised detectors a few steps into
    training keep very different numbers of boxes above the score threshold. With d2seg's
    weights the reference does the same work; the JSON records the detections either way
    (``detections_batch1``, ``detections_per_image``)."""
    if sub is d2:
        yield "own"
        return
    dst = sub.weights_module()
    src_state = d2.weights_module().state_dict()
    own = dst.state_dict()
    if not _same_layout(src_state, own):
        yield "own"
        return
    saved = {k: v.detach().clone() for k, v in own.items()}
    dst.load_state_dict(src_state)
    try:
        yield "d2seg's"
    finally:
        dst.load_state_dict(saved)


def run_case(case: Case, s: Settings, device: torch.device,
             plain_flags: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Measure one case; see the module docstring. Returns the case's JSON dict.

    ``plain_flags``: the process-wide backend switches the references run with (default:
    those in force before d2seg's Trainer is built), so that a fast path d2seg turns on
    globally (cuDNN benchmark, TF32) is not lent to the references.
    """
    plain_flags = dict(plain_flags or capture_backend_flags())
    cfg_file = _config_path(case.config_file)
    loop_iters = s.loop_iters if case.loop else 0
    loop_profile = s.profile_steps if loop_iters > 0 else 0
    max_iter = max(s.loop_warmup + loop_iters + loop_profile + 1, 2)
    d2 = D2SegSubject(cfg_file, list(case.opts) + ["SOLVER.BASE_LR", str(s.lr)] + list(s.opts),
                      device, s.precision, s.batch, max_iter=max_iter,
                      name=f"d2seg {case.name}")
    cfg = d2.cfg
    task = task_of(cfg)
    if s.ref_backend == "same":
        plain_flags = dict(d2.backend_flags)
    else:  # precision switches follow d2seg's, speed switches stay PyTorch's defaults
        for key in ("cudnn_tf32", "matmul_precision"):
            plain_flags[key] = d2.backend_flags[key]
    names = auto_references(cfg) if case.references is None else list(case.references)
    subjects: List[Subject] = [d2]
    skipped: Dict[str, str] = {}
    ref_cfg = cfg.clone()
    ref_cfg.defrost()
    ref_cfg.SOLVER.BASE_LR = s.lr
    for name in names:
        why = reference_unavailable(name)
        if why is None and name != "plain_d2":
            from .references import REFERENCES

            rtask = REFERENCES[name].task
            if (rtask == "semantic") != (task == "semantic"):
                why = f"a {rtask} reference cannot stand beside a {task} config"
        if why is not None:
            skipped[name] = why
            print(f"[benchmark] {case.name}: skipping reference {name}: {why}", flush=True)
            continue
        try:
            with backend_flags(plain_flags):
                ref = build_reference_subject(name, ref_cfg, device, s.precision)
            ref.backend_flags = dict(plain_flags)
            subjects.append(ref)
        except Exception as e:  # a reference that cannot be built is reported, not fatal
            skipped[name] = f"failed to build: {type(e).__name__}: {e}"
            print(f"[benchmark] {case.name}: reference {name} failed to build: {e}", flush=True)
    data = _batch_for(d2, cfg, task, s.batch, s.size, device, s)
    results: Dict[str, Dict] = {}
    times: Dict[str, List[float]] = {sub.name: [] for sub in subjects}
    thread_cpu: Dict[str, Dict[str, float]] = {}  # CPU seconds per thread over the rounds
    for sub in list(subjects):
        try:
            with backend_flags(sub.backend_flags):
                sub.set_batch(data)
                free_memory(device)  # the reserved delta: this subject's warm-up only
                # compilation, cuDNN autotuning and CUDA-graph recording happen here: its
                # reserved-memory delta includes the graphs' private memory pool, which the
                # timed rounds' memory (allocated before them) leaves out
                with MemoryMeter(device) as wmem:
                    sub.train_steps(max(s.warmup, 1))
                    sync(device)
            results.setdefault(sub.name, {})["warmup_memory"] = wmem.result
            if "peak_reserved_delta_mb" in wmem.result:
                print(f"[benchmark] {case.name}: {sub.name} warm-up: reserved memory "
                      f"+{wmem.result['peak_reserved_delta_mb']:.0f} MB", flush=True)
        except Exception as e:  # a reference that cannot train here is reported, not fatal
            if sub is d2:
                raise
            skipped[sub.name] = f"failed to train: {type(e).__name__}: {e}"
            print(f"[benchmark] {case.name}: reference {sub.name} failed to train: {e}",
                  flush=True)
            subjects.remove(sub)
            times.pop(sub.name)
            results.pop(sub.name, None)
            sub.close()
            free_memory(device)
    dynamo = {"after_warmup": _dynamo_counters()}
    for r in range(s.repeats):
        # every other round in reverse order: no subject always runs first (or right after
        # another one's heat and caches)
        for sub in (subjects if r % 2 == 0 else subjects[::-1]):
            with backend_flags(sub.backend_flags):
                if r == 0:  # memory of the first timed round (not timed itself)
                    with MemoryMeter(device) as mem:
                        sub.train_steps(1)
                    results.setdefault(sub.name, {})["train_memory"] = mem.result
                # the thread snapshots outside the timed block (about 1 ms each)
                with ThreadCPU() as cpu, Timer(device) as t:
                    sub.train_steps(s.iters)
            times[sub.name].append(t.seconds)
            acc = thread_cpu.setdefault(sub.name, {})
            for k, v in cpu.seconds.items():
                acc[k] = acc.get(k, 0.0) + v
            print(f"[benchmark] {case.name}: {sub.name} round {r + 1}/{s.repeats}: "
                  f"{t.seconds / s.iters:.4f} s/iter", flush=True)
    dynamo["after_timed"] = _dynamo_counters()
    infer_batch = s.infer_batch or s.batch
    for sub in subjects:
        res = results.setdefault(sub.name, {})
        rounds = times[sub.name]
        med = _median(rounds) if s.statistic == "median" else min(rounds)
        res.update({
            "name": sub.name, "kind": sub.kind, "description": sub.description,
            "params": sub.params(), "notes": sub.notes,
            "train_step": {"batch": s.batch, "size": list(s.size), "iters_per_round": s.iters,
                           "round_seconds": rounds, "statistic": s.statistic,
                           "s_per_iter": med / s.iters,
                           "img_per_s": s.batch * s.iters / med,
                           "img_per_s_median": s.batch * s.iters / _median(rounds),
                           "img_per_s_best": s.batch * s.iters / min(rounds),
                           # host CPU per step by thread (all rounds): against s_per_iter,
                           # how busy the host was (see ThreadCPU)
                           "thread_cpu_s_per_iter": thread_cpu_per_iter(
                               thread_cpu.get(sub.name, {}), s.iters * len(rounds))},
        })
        if s.inference:
            with backend_flags(sub.backend_flags):
                try:
                    with _inference_weights(d2, sub) as weights:
                        res.update(_measure_inference(sub, cfg, task, device, s, infer_batch))
                    res["inference"]["weights"] = weights
                except Exception as e:
                    res["inference_error"] = f"{type(e).__name__}: {e}"
                    print(f"[benchmark] {sub.name}: inference failed: {e}", flush=True)
                    traceback.print_exc()
    loop = None
    if loop_iters > 0:
        try:
            with backend_flags(d2.backend_flags):
                loop = d2.run_loop(s.loop_warmup, loop_iters, profile=loop_profile)
        except Exception as e:  # noqa: BLE001 - the step numbers stand without the loop
            traceback.print_exc()
            loop = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"[benchmark] {case.name}: train_net loop failed: {loop['error']}", flush=True)
        if "error" not in loop:
            step_ips = results[d2.name]["train_step"]["img_per_s"]
            loop["fraction_of_step"] = loop["img_per_s"] / step_ips
            # one more round of the step alone right after the loop: on a shared machine the
            # step rounds (minutes before) and the loop can see different load, so the ratio
            # comes with its range over every step round (2026-11-29, 2-core Xeon with four
            # other jobs: 70-100 % from three runs of one command)
            with backend_flags(d2.backend_flags):
                d2.set_batch(data)
                with Timer(device) as t_after:
                    d2.train_steps(s.iters)
            after = s.batch * s.iters / t_after.seconds
            all_ips = [s.batch * s.iters / x for x in times[d2.name]] + [after]
            loop["step_img_per_s_after_loop"] = after
            loop["fraction_of_step_range"] = [loop["img_per_s"] / max(all_ips),
                                              loop["img_per_s"] / min(all_ips)]
            loop["sizes_match_step"] = loop["input_sizes"] == [tuple(s.size)]
            loop["input_sizes"] = [list(x) for x in loop["input_sizes"]]
            if loop.get("mean_pixels"):
                # per pixel: conservative where images of other sizes cost a loop less than
                # in proportion to their pixels (R-CNN's ROI heads do not scale with them)
                loop["pixel_fraction_of_step"] = loop["fraction_of_step"] * \
                    loop["mean_pixels"] / float(s.size[0] * s.size[1])
            lo, hi = loop["fraction_of_step_range"]
            print(f"[benchmark] {case.name}: train_net loop {loop['img_per_s']:.3f} img/s = "
                  f"{100 * loop['fraction_of_step']:.1f}% of the step alone ({100 * lo:.1f}-"
                  f"{100 * hi:.1f}% against each step round, one after the loop)", flush=True)
    # The diagnostics last: the profile, then one step under the sync audit (a
    # TorchDispatchMode and CUDA's sync debug mode). On the H100 (torch 2.11, 2026-11-26) the
    # compiled modules ran eagerly in every step after the audit: dynamo skips frames under a
    # dispatch mode and that torch then skipped them for good (pytorch#190286). d2seg's
    # CompiledForward now runs such calls eagerly itself; the audit still goes last.
    for sub in subjects:
        with backend_flags(sub.backend_flags):
            sub.set_batch(data)
            if s.profile_steps > 0:
                results[sub.name]["profile"] = profile_steps(sub, device, s.profile_steps)
            results[sub.name]["host_syncs"] = audit_host_syncs(sub, device)
            if sub is d2 and s.profile_steps > 0 and (d2.speed_plan or {}).get("compile"):
                # does the compiled code still run after the audit? (on the H100 with torch
                # 2.11 it did not, before CompiledForward's dispatch-mode guard)
                after = profile_steps(sub, device, 1)
                results[sub.name]["compiled_regions_after_audit"] = after.get(
                    "compiled_regions_per_step", after.get("error"))
    dynamo["after_diagnostics"] = _dynamo_counters()
    if d2.speed_plan and d2.speed_plan.get("compile"):
        # torch.compile's counters (process-wide): graphs captured, graph breaks, recompiles.
        # unique_graphs growing during the timed rounds means they recompiled.
        results[d2.name]["dynamo_counters"] = dynamo
        from ..engine.fast_paths import compiled_modules

        # which modules ran compiled, in which mode, and whether one fell back to eager
        results[d2.name]["compiled_modules"] = compiled_modules(d2.model)
        for st in results[d2.name]["compiled_modules"]:
            if st["failed"]:
                print(f"[benchmark] {case.name}: {st['module']} ran eagerly after a compile "
                      f"failure: {st['failed']}", flush=True)
            for mode, secs in st.get("first_call_s", {}).items():  # the compile's cost
                print(f"[benchmark] {case.name}: {st['module']} first compiled call "
                      f"(mode {mode}): {secs:.1f} s", flush=True)
    d2r = results[d2.name]
    plan = d2.speed_plan or {}
    graphs = device.type == "cuda" and bool(plan.get("compile")) and \
        plan.get("compile_mode") in ("reduce-overhead", "max-autotune")
    ratios = {}
    for sub in subjects[1:]:
        rr = results[sub.name]
        ratio = {key: d2r["train_step"][src] / rr["train_step"][src]
                 for key, src in (("train_step_speedup", "img_per_s"),
                                  ("train_step_speedup_median", "img_per_s_median"),
                                  ("train_step_speedup_best", "img_per_s_best"))}
        if "inference" in d2r and "inference" in rr:
            ratio["inference_throughput_speedup"] = (
                d2r["inference"]["throughput_img_per_s"] / rr["inference"]["throughput_img_per_s"])
            ratio["latency_speedup"] = (rr["inference"]["latency_batch1_ms"]
                                        / d2r["inference"]["latency_batch1_ms"])
        a, b = _peak(d2r.get("train_memory")), _peak(rr.get("train_memory"))
        if graphs:
            ratio["train_memory_note"] = (
                "not compared: d2seg trains under CUDA graphs, whose memory pools the "
                "allocated figures leave out (see its warmup_memory.peak_reserved_delta_mb)")
        elif a == a and b == b and b > 0:
            ratio["train_memory_ratio"] = a / b
        ratios[sub.name] = ratio
    out = {
        "name": case.name, "config": os.path.relpath(cfg_file, REPO)
        if cfg_file.startswith(REPO) else cfg_file,
        "case_opts": list(case.opts), "task": task,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "d2seg": d2r, "references": [results[sub.name] for sub in subjects[1:]],
        "skipped_references": skipped, "ratios": ratios, "loop": loop,
        "speed_config": _speed_cfg(cfg), "speed_plan": d2.speed_plan,
        "backend_flags": {"d2seg": d2.backend_flags,
                          "references": plain_flags if len(subjects) > 1 else None},
    }
    for sub in subjects:
        sub.close()
    del subjects, d2, data
    free_memory(device)
    return out


def audit_host_syncs(sub: Subject, device: torch.device) -> Dict[str, object]:
    """One train step of ``sub`` under :class:`~d2seg.benchmark.syncs.HostSyncAudit`:
    {"per_step", "sites" ({"op @ file:line": count}, the first frame outside torch),
    "inner_sites" (the same by the innermost frame, torch's included), "device_ops_per_step"
    (aten operations on device tensors: an upper bound of the kernel launches), "method"}, or
    {"error"}.

    The audit is a ``TorchDispatchMode``: torch.compile'd modules run their eager forward in
    this step (dynamo does not compile under such a mode), so it lists the eager step's
    syncs and operations."""
    from .syncs import HostSyncAudit

    method = "cuda sync debug mode" if device.type == "cuda" else "cpu emulation"
    try:
        roots = [] if device.type == "cuda" else sub.audit_roots()
        with HostSyncAudit(device, roots) as audit:
            sub.train_steps(1)
        sync(device)
        return {"per_step": audit.count, "sites": audit.by_site(),
                "inner_sites": audit.by_inner_site(),
                "device_ops_per_step": audit.device_ops, "method": method}
    except Exception as e:  # noqa: BLE001 - a diagnostic; the timings stand without it
        return {"error": f"{type(e).__name__}: {e}"[:500], "method": method}


def profile_steps(sub: Subject, device: torch.device, steps: int,
                  top: int = 15) -> Dict[str, object]:
    """``steps`` train steps of ``sub`` under ``torch.profiler``.

    Returns {"steps", "wall_s_per_step", "device_s_per_step" (CUDA kernel time; None on CPU),
    "device_busy_fraction" (device / wall: well below 1 means the host, not the GPU, sets the
    pace; kernels overlapping on several streams can push it above 1), "top": [{"name",
    "calls_per_step", "self_device_ms_per_step", "self_host_ms_per_step"}], "top_host" (the
    same rows by host time), "host_op_ms_per_step"}, or {"error"}. Profiler overhead makes the
    wall time longer than the timed rounds'; the fraction is a lower bound."""
    from torch.profiler import profile

    cuda = device.type == "cuda"
    try:
        sync(device)
        with profile(activities=profiler_activities(device)) as prof:
            t0 = time.perf_counter()
            sub.train_steps(steps)
            sync(device)
            wall = time.perf_counter() - t0
        return summarize_profile(prof, wall, steps, cuda, top)
    except Exception as e:  # noqa: BLE001 - a diagnostic; the timings stand without it
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def profiler_activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def summarize_profile(prof, wall: float, steps: int, cuda: bool, top: int = 15
                      ) -> Dict[str, object]:
    """:func:`profile_steps`'s dict from a finished ``torch.profiler.profile`` over ``steps``
    steps that took ``wall`` seconds; "top_host" ranks the operators and CUDA runtime calls
    by their own host time (a host wait shows as ``cudaStreamSynchronize`` /
    ``cudaEventSynchronize`` / a slow ``cudaMemcpyAsync``)."""
    from torch.autograd import DeviceType

    events = prof.key_averages()

    def dev(e) -> float:  # microseconds of device kernels run by this op itself
        return float(getattr(e, "self_device_time_total", 0.0)
                     or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    def on_device(e) -> bool:  # the kernels / copies themselves (not the ops that ran them)
        return getattr(e, "device_type", None) == DeviceType.CUDA

    def row(e) -> Dict[str, object]:
        return {"name": e.key, "calls_per_step": e.count / steps,
                "self_device_ms_per_step": dev(e) / 1e3 / steps,
                "self_host_ms_per_step": float(e.self_cpu_time_total) / 1e3 / steps}

    # each kernel is listed on its own and in its op's self device time: count it once
    device_us = sum(dev(e) for e in events if on_device(e)) if cuda else None
    host_side = [e for e in events if not on_device(e)]
    key = dev if cuda else (lambda e: float(e.self_cpu_time_total))
    by_host = sorted(host_side, key=lambda e: float(e.self_cpu_time_total), reverse=True)
    compiled = sum(e.count for e in host_side if e.key.startswith("Torch-Compiled Region"))
    return {
        "steps": steps, "wall_s_per_step": wall / steps,
        # torch.compile'd regions entered per step: 0 with compilation on means eager ran
        "compiled_regions_per_step": compiled / steps,
        "device_s_per_step": None if device_us is None else device_us / 1e6 / steps,
        "device_busy_fraction": None if device_us is None else device_us / 1e6 / wall,
        "host_op_ms_per_step": sum(float(e.self_cpu_time_total) for e in host_side)
        / 1e3 / steps,
        "top": [row(e) for e in sorted(host_side, key=key, reverse=True)[:top]],
        "top_host": [row(e) for e in by_host[:top]]}


def _dynamo_counters() -> Dict[str, Dict[str, int]]:
    """A copy of ``torch._dynamo``'s counters (empty when unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a diagnostic
        return {}
    out: Dict[str, Dict[str, int]] = {}
    for k, v in counters.items():
        for kk, vv in v.items():  # graph-break reasons are paragraphs: their first line
            key = str(kk).strip().splitlines()[0][:160] if str(kk).strip() else str(kk)
            out.setdefault(k, {})[key] = out.get(k, {}).get(key, 0) + int(vv)
    return out


def _profile_lines(what: str, p: Optional[Dict]) -> List[str]:
    """One line for a profile dict: busy fraction and the top host-time entries."""
    if not p:
        return []
    if "error" in p:
        return [f"{what} profile: {p['error']}"]
    busy = p.get("device_busy_fraction")
    busy_s = "" if busy is None else f", device busy {100 * busy:.0f}%"
    tops = ", ".join(f"{r['name']} {r['self_host_ms_per_step']:.1f} ms"
                     for r in p.get("top_host", [])[:5])
    return [f"{what} profile ({p['steps']} iterations): {1e3 * p['wall_s_per_step']:.1f} ms "
            f"per iteration{busy_s}; compiled regions per iteration "
            f"{p.get('compiled_regions_per_step', 0):g}; host ops {p.get('host_op_ms_per_step', 0):.1f} ms; top "
            f"host time: {tops}"]


def _ms(sec: Optional[float]) -> str:
    return "-" if sec is None else f"{1e3 * sec:.1f} ms"


def _thread_ms(per_iter: Optional[Dict[str, float]], top: int = 5) -> str:
    """"MainThread 17.1 ms, native:pt_autograd_0 5.2 ms" (the busiest ``top`` threads)."""
    if not per_iter:
        return "-"
    return ", ".join(f"{k} {_ms(v)}" for k, v in list(per_iter.items())[:top])


def _peak(mem: Optional[Dict]) -> float:
    if not mem:
        return float("nan")
    return float(mem.get("peak_allocated_delta_mb", mem.get("peak_rss_delta_mb", float("nan"))))


def _speed_cfg(cfg) -> Optional[Dict]:
    """The ``D2SEG.SPEED`` block (fast paths) as the run used it, if the config has one."""
    node = cfg.D2SEG.get("SPEED") if "D2SEG" in cfg else None
    if node is None:
        return None

    def plain(n):
        return {k: plain(v) for k, v in n.items()} if hasattr(n, "items") else (
            list(n) if isinstance(n, tuple) else n)
    return plain(node)


def evaluate_targets(cases: Sequence[Dict], targets: Sequence[Target]) -> List[Dict]:
    """Each target's measured value (from the measured numbers) and pass/fail."""
    by_name = {c["name"]: c for c in cases}
    out = []
    for t in targets:
        row = dataclasses.asdict(t)
        c = by_name.get(t.case)
        value, why = None, ""
        try:
            o = by_name.get(t.other_case) if t.other_case else None
            if c is None:
                why = f"case '{t.case}' was not run"
            elif "error" in c:
                why = f"case '{t.case}' failed: {c['error'][:200]}"
            elif o is not None and "error" in o:
                why = f"case '{t.other_case}' failed: {o['error'][:200]}"
            elif t.kind == "speedup":
                if t.reference in c["ratios"]:
                    value = c["ratios"][t.reference]["train_step_speedup"]
                else:
                    why = c["skipped_references"].get(t.reference, "reference not run")
            elif t.kind == "loop_fraction":
                lp = c.get("loop") or {}
                if "fraction_of_step" in lp and lp.get("sizes_match_step", True):
                    value = lp["fraction_of_step"]
                elif lp.get("pixel_fraction_of_step") is not None:
                    # images of other sizes than the step's: pixels per second compared, not
                    # images (smaller images would earn the loop an unearned lead)
                    value = lp["pixel_fraction_of_step"]
                    why = (f"loop images {lp['input_sizes'][:3]} differ from the step's: "
                           f"compared per pixel")
                elif "fraction_of_step" in lp:
                    why = "loop images differ from the step's and their sizes were not recorded"
                elif c.get("loop"):
                    why = f"train_net loop failed: {c['loop'].get('error', '?')[:200]}"
                else:
                    why = "train_net loop not run"
            elif t.kind == "step_time_ratio":
                if o is None:
                    why = f"case '{t.other_case}' was not run"
                else:
                    value = (c["d2seg"]["train_step"]["s_per_iter"]
                             / o["d2seg"]["train_step"]["s_per_iter"])
            elif t.kind == "reference_img_per_s":
                refs = {r["name"]: r for r in c["references"]}
                if t.reference in refs:
                    value = refs[t.reference]["train_step"]["img_per_s"]
                else:
                    why = c["skipped_references"].get(t.reference, "reference not run")
            else:
                why = f"unknown target kind '{t.kind}'"
        except (KeyError, ZeroDivisionError) as e:
            why = f"missing number: {e}"
        if value is None:
            status = "not measured"
        elif t.kind == "reference_img_per_s" or t.informational:
            status = "info"
        elif t.kind == "step_time_ratio":
            status = "pass" if value <= t.threshold else "FAIL"
        else:
            status = "pass" if value >= t.threshold else "FAIL"
        row.update(value=value, status=status, why=why)
        out.append(row)
    return out


def run_benchmark(cases: Sequence[Case], settings: Settings,
                  targets: Sequence[Target] = (), preset: str = "",
                  scaling: Optional[Dict] = None) -> Dict[str, object]:
    """Run every case (one after the other, same process) and evaluate ``targets``.

    ``scaling``: keyword arguments of :func:`d2seg.benchmark.scaling.run_scaling` (its
    result goes under "scaling"), or None.
    """
    device = resolve_device(settings.device)
    settings = dataclasses.replace(settings, size=tuple(settings.size))
    if settings.ref_backend not in ("plain", "same"):
        raise ValueError(f"ref_backend must be 'plain' or 'same', got '{settings.ref_backend}'")
    if settings.statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got '{settings.statistic}'")
    previous_threads = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    previous_disable = logging.root.manager.disable
    if settings.quiet:
        logging.disable(logging.INFO)
    try:
        return _run(cases, settings, targets, preset, scaling, device)
    finally:
        logging.disable(previous_disable)
        torch.set_num_threads(previous_threads)


def _run(cases, settings, targets, preset, scaling, device) -> Dict[str, object]:
    result: Dict[str, object] = {
        "schema": SCHEMA, "preset": preset, "machine": machine_info(device),
        "settings": dataclasses.asdict(settings), "cases": [], "targets": [],
    }
    result["settings"]["device"] = str(device)
    plain_flags = capture_backend_flags()
    for case in cases:
        print(f"[benchmark] case {case.name}: {case.config_file} on {device}, batch "
              f"{settings.batch}, {settings.size[0]}x{settings.size[1]}, {settings.precision}",
              flush=True)
        try:
            result["cases"].append(run_case(case, settings, device, plain_flags))
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            if is_oom(e):
                msg = f"out of memory: {e}"
            else:
                msg = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"[benchmark] case {case.name} failed: {msg}", flush=True)
            result["cases"].append({"name": case.name, "config": case.config_file,
                                    "case_opts": list(case.opts), "error": msg[:2000]})
            free_memory(device)
    result["targets"] = evaluate_targets(result["cases"], targets)
    if scaling is not None:
        from .scaling import run_scaling

        result["scaling"] = run_scaling(settings=settings, device=device, **scaling)
    return result


# -------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3g}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return fmt.format(x)


def format_report(result: Dict) -> str:
    """Markdown: one table per case, the targets, and the scaling table when present."""
    m = result["machine"]
    st = result["settings"]
    lines = [f"measured on: {m['summary']} ({m['date']})",
             f"settings: device {st['device']}, {st['precision']}, batch {st['batch']}, "
             f"{st['size'][0]}x{st['size'][1]}, {st['iters']} iters x {st['repeats']} rounds "
             f"(+{st['warmup']} warm-up), img/s from the {st.get('statistic', 'median')} "
             f"round; opts {st['opts'] or '[]'}", ""]
    mem_key = "CUDA peak alloc. delta" if str(st["device"]).startswith("cuda") else \
        "peak RSS delta (approx.)"
    for c in result["cases"]:
        if "error" in c:
            lines += [f"### {c['name']} ({c['config']}): FAILED", "", c["error"][:500], ""]
            continue
        lines.append(f"### {c['name']} ({c['config']}, {c['meta_architecture']})")
        lines.append("")
        other = "median" if st.get("statistic", "median") == "min" else "best"
        lines.append(f"| model | params | train img/s | s/iter | d2seg speed-up ({other}) | "
                     f"latency b1 (ms) | infer img/s | train mem MB ({mem_key}) | "
                     f"host syncs/step |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in [c["d2seg"]] + c["references"]:
            rat = c["ratios"].get(r["name"], {})
            ratio = rat.get("train_step_speedup")
            alt = rat.get(f"train_step_speedup_{other}")
            inf = r.get("inference", {})
            lines.append(
                f"| {r['name']} | {r['params'] / 1e6:.2f} M | "
                f"{_f(r['train_step']['img_per_s'])} | {_f(r['train_step']['s_per_iter'])} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x ({alt:.2f}x)'} | "
                f"{_f(inf.get('latency_batch1_ms'))} | {_f(inf.get('throughput_img_per_s'))} | "
                f"{_f(_peak(r.get('train_memory')), '{:.0f}')} | "
                f"{r.get('host_syncs', {}).get('per_step', '-')} |")
        for name, why in c["skipped_references"].items():
            lines.append(f"| {name} | skipped: {why} | | | | | | | |")
        dets = []
        for r in [c["d2seg"]] + c["references"]:
            inf = r.get("inference", {})
            if "detections_batch1" in inf:
                per = "/".join(str(n) for n in inf.get("detections_per_image", []))
                whose = " (on d2seg's weights)" if inf.get("weights") == "d2seg's" else ""
                dets.append(f"{r['name']} {inf['detections_batch1'][0]}; {per}{whose}")
        if dets:  # a detector's inference time grows with its detections
            lines += ["", "inference detections per image (batch 1; throughput batch): "
                      + ", ".join(dets)]
        for r in [c["d2seg"]] + c["references"]:
            pf = r.get("profile")
            if pf and "error" not in pf:
                busy = pf["device_busy_fraction"]
                which = "self_host_ms_per_step" if busy is None else "self_device_ms_per_step"
                gpu = "" if busy is None else (f", GPU kernels {_f(pf['device_s_per_step'])} "
                                               f"s/step ({100 * busy:.0f} % busy)")
                tops = ", ".join(f"{t['name']} {_f(t[which])} ms" for t in pf["top"][:5])
                host = pf.get("host_op_ms_per_step")
                host = "" if host is None else (
                    f"; host ops {host:.1f} ms/step; compiled regions per step "
                    f"{pf.get('compiled_regions_per_step', 0):g}")
                if "compiled_regions_after_audit" in r:
                    host += f" ({r['compiled_regions_after_audit']} after the sync audit)"
                lines += ["", f"profile {r['name']}: {_f(pf['wall_s_per_step'])} s/step under "
                              f"the profiler{gpu}; top: {tops}{host}"]
        ops = [f"{r['name']} {r['host_syncs']['device_ops_per_step']}"
               for r in [c["d2seg"]] + c["references"]
               if "device_ops_per_step" in r.get("host_syncs", {})]
        if ops:
            lines += ["", "device operations per step (an upper bound of kernel launches): "
                      + ", ".join(ops)]
        sites = c["d2seg"].get("host_syncs", {}).get("sites")
        if sites:
            lines += ["", "d2seg host syncs per step: " + "; ".join(
                f"{n}x {k}" for k, n in list(sites.items())[:6])]
            plain = {k.split(" [")[0] for k in sites}  # without the [enter/exit, gc] tags
            inner = {k: n for k, n in (c["d2seg"]["host_syncs"].get("inner_sites")
                                       or {}).items() if k.split(" < ")[0].split(" [")[0]
                     not in plain}
            if inner:  # syncs inside torch code: the frames that waited
                lines.append("  inside torch (innermost frames first): " + "; ".join(
                    f"{n}x {k}" for k, n in list(inner.items())[:6]))
        if c.get("loop") and "error" in c["loop"]:
            lines += ["", f"train_net loop failed: {c['loop']['error'][:300]}"]
        elif c.get("loop"):
            lp = c["loop"]
            same = "" if lp["sizes_match_step"] else \
                f" (loader sizes {lp['input_sizes'][:4]} differ from the step's)"
            lines.append("")
            rng = lp.get("fraction_of_step_range")
            spread = f" ({100 * rng[0]:.1f}-{100 * rng[1]:.1f}% against each step round)" \
                if rng else ""
            lines.append(f"train_net loop with real data: {_f(lp['img_per_s'])} img/s = "
                         f"{100 * lp['fraction_of_step']:.1f}% of the step alone{spread}; mean "
                         f"data_time {_f(lp['data_time_s'])} s; run_step median "
                         f"{_f(lp.get('run_step_median_s'))} s, max "
                         f"{_f(lp.get('run_step_max_s'))} s (loop {_f(lp['s_per_iter'])} "
                         f"s/iter){same}")
            its = lp.get("iteration_times_s") or []
            if its:
                slow = max(range(len(its)), key=its.__getitem__)
                lines.append(f"loop iterations with hooks: median {_f(statistics.median(its))} "
                             f"s, slowest {_f(its[slow])} s (timed iteration {slow + 1} of "
                             f"{len(its)})")
            step = c["d2seg"]["train_step"]
            if step.get("thread_cpu_s_per_iter") or lp.get("thread_cpu_s_per_iter"):
                lines.append(f"host CPU per iteration by thread, step alone "
                             f"({_ms(step['s_per_iter'])} wall): "
                             f"{_thread_ms(step.get('thread_cpu_s_per_iter'))}; loop "
                             f"({_ms(lp['s_per_iter'])} wall): "
                             f"{_thread_ms(lp.get('thread_cpu_s_per_iter'))}")
            lines += _profile_lines("train_net loop", lp.get("profile"))
        lines.append("")
    if result.get("targets"):
        lines += ["### targets", "", "| target | measured | required | result |",
                  "|---|---|---|---|"]
        for t in result["targets"]:
            op = "<=" if t["kind"] == "step_time_ratio" else (
                "stated" if t["kind"] == "reference_img_per_s" else ">=")
            val = "-" if t["value"] is None else f"{t['value']:.3f}"
            res = t["status"] + (f" ({t['why']})" if t["why"] else "")
            lines.append(f"| {t['name']} | {val} | {op} {t['threshold']} | {res} |")
        lines.append("")
    if result.get("scaling"):
        from .scaling import format_scaling

        lines.append(format_scaling(result["scaling"]))
    return "\n".join(lines)
