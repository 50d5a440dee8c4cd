"""Scaling: how the train step's time and memory grow with image size and batch, and the
largest batch that fits.

* grid: for each size in ``sizes`` and batch in ``batches``: s/iter, img/s and peak memory of
  ``iters`` train steps (after ``warmup``), for d2seg's model (and optionally references).
* largest batch at ``largest_at`` (default the run's size): on CUDA the batch doubles until
  an out-of-memory error (caught; gradients, batch and cached blocks released), then is
  bisected between the last batch that fitted and the first that did not, to within 1/16 of
  the batch (each tried batch costs a cuDNN autotune and a step: the search at 512x512 ran
  past a minute on an H100 when it bisected to one image). The doubling starts at the
  largest batch the grid ran at that size. Once two batches have run, a linear fit of their
  peak allocated memory predicts the batch that fills 92 % of the card; when that lies
  below the next doubling it is tried instead, and if it fits, 1/16 more (about two tries
  where the doubling and the bisection took four or five). On CPU nothing may
  run out of memory (the process would be killed), so the batch doubles while the measured
  peak stays under ``mem_cap_mb`` and the peak predicted for the next batch (linear fit of
  the measured peaks over batch) does too; the fit's own estimate is reported as well.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .measure import MemoryMeter, Timer, backend_flags, capture_backend_flags, free_memory, is_oom

__all__ = ["run_scaling", "format_scaling", "largest_batch"]


def _step_point(sub, cfg, task, n: int, size: Tuple[int, int], device, settings,
                iters: int, warmup: int) -> Dict[str, object]:
    """One (batch, size) measurement; {"status": "ok", ...} or {"status": "oom"}."""
    from .harness import _batch_for

    oom, error = False, None
    row: Dict[str, object] = {"batch": n, "size": list(size)}
    try:
        with backend_flags(sub.backend_flags):
            sub.set_batch(_batch_for(sub, cfg, task, n, size, device, settings))
            sub.train_steps(warmup)
            if device.type == "cuda":  # peak statistics only: measured in the timed steps
                with MemoryMeter(device) as mem, Timer(device) as t:
                    sub.train_steps(iters)
            else:  # a CPU's meter samples RSS from a thread: one untimed step of its own
                with MemoryMeter(device) as mem:
                    sub.train_steps(1)
                with Timer(device) as t:
                    sub.train_steps(iters)
        row.update(status="ok", s_per_iter=t.seconds / iters,
                   img_per_s=n * iters / t.seconds, peak_mb=mem.peak_mb, memory=mem.result)
        if device.type == "cuda":
            row["peak_reserved_mb"] = mem.result["peak_reserved_mb"]
    except Exception as e:  # noqa: BLE001 - OOM, or e.g. BatchNorm refusing batch 1
        oom = is_oom(e)
        error = None if oom else f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if oom or error:
        _release(sub, device)
        row["status"] = "oom" if oom else error
    return row


def _release(sub, device) -> None:
    """Drop what a failed (out-of-memory) step left: gradients, the batch, cached blocks."""
    opt = getattr(getattr(sub, "inner", None), "optimizer", None) or getattr(sub, "opt", None)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    inner = getattr(sub, "inner", None)
    if inner is not None:
        inner.data_loader = None
        inner._data_loader_iter_obj = None
        if hasattr(inner, "_last_batch"):
            inner._last_batch = None
    for attr in ("x", "y", "images", "targets"):
        if hasattr(sub, attr):
            setattr(sub, attr, None)
    # an OOM inside optimizer.step may leave the grad scaler "unscaled" for this optimizer,
    # which would make the next step fail: forget that per-optimizer state
    scaler = getattr(inner, "grad_scaler", None) or getattr(sub, "scaler", None)
    if scaler is not None and hasattr(scaler, "_per_optimizer_states"):
        try:
            import collections

            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            scaler._per_optimizer_states = collections.defaultdict(_refresh_per_optimizer_state)
        except ImportError:  # pragma: no cover - another torch layout
            pass
    free_memory(device)


def _fit(points: Sequence[Tuple[int, float]]) -> Optional[Tuple[float, float]]:
    """Least-squares (intercept, slope) of peak MB over batch; None with < 2 batches."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mm = sum(m for _, m in points) / n
    sxx = sum((b - mb) ** 2 for b, _ in points)
    slope = sum((b - mb) * (m - mm) for b, m in points) / sxx
    return mm - slope * mb, slope


#: share of the card's memory the CUDA prediction may plan for (the rest: CUDA context,
#: cuDNN workspaces, allocator fragmentation)
CUDA_PLANNED_SHARE = 0.92


def _cuda_capacity_mb(device) -> float:
    return CUDA_PLANNED_SHARE * torch.cuda.get_device_properties(device).total_memory / 1024 ** 2


def _predicted_fit(points: Sequence[Tuple[int, float]], capacity_mb: float) -> Optional[int]:
    """The batch whose linearly predicted peak reaches ``capacity_mb``; None without a fit."""
    fit = _fit(points)
    if fit is None or fit[1] <= 0:
        return None
    return int(math.floor((capacity_mb - fit[0]) / fit[1]))


def largest_batch(sub, cfg, task, size, device, settings, *, mem_cap_mb: float = 0.0,
                  max_batch: int = 1024, iters: int = 1, warmup: int = 1,
                  start: int = 1, capacity_mb: Optional[float] = None) -> Dict[str, object]:
    """The largest training batch at ``size`` (see the module docstring for the rules).

    ``start``: the first batch tried (one known to fit saves the doubling up to it).
    ``capacity_mb`` (CUDA): the memory the prediction plans for (default
    :data:`CUDA_PLANNED_SHARE` of the card's).

    Returns {"largest_batch", "first_failing_batch", "tried": [rows], "rule", and on CPU
    "cap_mb", "predicted_largest_batch" (from the linear fit, may exceed ``max_batch``)}.
    """
    tried: List[Dict] = []
    cuda = device.type == "cuda"
    if not cuda and mem_cap_mb <= 0:
        raise ValueError("on CPU the largest batch needs a memory cap (--mem-cap-gb > 0)")
    good, bad, n = 0, None, max(1, min(int(start), max_batch))
    points: List[Tuple[int, float]] = []
    abs_points: List[Tuple[int, float]] = []  # CUDA: absolute peak allocated, for the jump
    predicted = None  # the batch n was chosen by the prediction
    while n <= max_batch:
        if not cuda:
            fit = _fit(points)
            if fit is not None and fit[0] + fit[1] * n > mem_cap_mb:
                bad = n
                tried.append({"batch": n, "status": "skipped",
                              "predicted_peak_mb": fit[0] + fit[1] * n})
                break
        row = _step_point(sub, cfg, task, n, size, device, settings, iters, warmup)
        tried.append(row)
        if n == 1 and str(row["status"]).startswith("error"):  # e.g. BatchNorm at batch 1
            n = 2
            continue
        if row["status"] != "ok" or (not cuda and row["peak_mb"] > mem_cap_mb):
            bad = n
            break
        points.append((n, float(row["peak_mb"])))
        good, nxt = n, n * 2
        peak_abs = (row.get("memory") or {}).get("peak_allocated_mb")
        if cuda and peak_abs is not None:
            if capacity_mb is None:
                capacity_mb = _cuda_capacity_mb(device)
            abs_points.append((n, float(peak_abs)))
            p = _predicted_fit(abs_points, capacity_mb)
            if predicted == n:  # the prediction fitted: one step of 1/16 above it
                nxt = n + max(1, n // 16)
                predicted = None
            elif p is not None and n < p < nxt:  # the limit is predicted before the doubling
                nxt = predicted = p
        n = nxt
    if cuda and bad is not None:  # bisect (good, bad)
        while bad - good > max(1, good // 16) and len(tried) < 24:
            mid = (good + bad) // 2
            row = _step_point(sub, cfg, task, mid, size, device, settings, iters, warmup)
            tried.append(row)
            if row["status"] == "ok":
                good = mid
            else:
                bad = mid
    out: Dict[str, object] = {"size": list(size), "largest_batch": good, "tried": tried,
                              "first_failing_batch": bad, "max_batch": max_batch}
    if cuda:
        out["rule"] = ("CUDA: doubled until out of memory (or, once the linear fit of the peak "
                       "allocated memory predicts the limit below the next doubling, the "
                       "predicted batch, then 1/16 more), then bisected to within 1/16 of the "
                       "batch")
        p = _predicted_fit(abs_points, capacity_mb) if abs_points else None
        if p is not None:
            out["predicted_largest_batch"] = p
            out["capacity_mb"] = capacity_mb
    else:
        fit = _fit(points)
        out["rule"] = ("CPU: doubled while the measured peak RSS increase and the linear-fit "
                       "prediction for the next batch stay under the cap")
        out["cap_mb"] = mem_cap_mb
        if fit is not None and fit[1] > 0:
            out["predicted_largest_batch"] = int(math.floor((mem_cap_mb - fit[0]) / fit[1]))
            out["fit_mb"] = {"intercept": fit[0], "per_image": fit[1]}
    return out


def run_scaling(*, settings, device: torch.device, config_file: str,
                opts: Sequence[str] = (), sizes: Sequence[int] = (128, 256),
                batches: Sequence[int] = (1, 2, 4), iters: int = 2, warmup: int = 1,
                references: Sequence[str] = (), mem_cap_mb: float = 0.0,
                max_batch: int = 256, largest_at: Optional[Tuple[int, int]] = None,
                find_largest: bool = True) -> Dict[str, object]:
    """The scaling grid for d2seg's model of ``config_file`` (+ ``references``) and the
    largest batch that fits. ``sizes``: square sides. Returns the "scaling" JSON dict."""
    previous = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    try:
        return _run_scaling(settings, device, config_file, opts, sizes, batches, iters, warmup,
                            references, mem_cap_mb, max_batch, largest_at, find_largest)
    finally:
        torch.set_num_threads(previous)


def _run_scaling(settings, device, config_file, opts, sizes, batches, iters, warmup,
                 references, mem_cap_mb, max_batch, largest_at, find_largest):
    from .harness import _config_path
    from .references import reference_unavailable
    from .subjects import D2SegSubject, build_reference_subject, task_of

    plain = capture_backend_flags()
    d2 = D2SegSubject(_config_path(config_file),
                      list(opts) + ["SOLVER.BASE_LR", str(settings.lr)] + list(settings.opts),
                      device, settings.precision, max(batches), max_iter=2,
                      name="d2seg " + str(config_file).rsplit("/", 1)[-1])
    cfg, task = d2.cfg, task_of(d2.cfg)
    subjects = [d2]
    skipped = {}
    for name in references:
        why = reference_unavailable(name)
        if why:
            skipped[name] = why
            continue
        ref = build_reference_subject(name, cfg, device, settings.precision)
        ref.backend_flags = dict(plain)
        subjects.append(ref)
    grid: List[Dict] = []
    largest: Dict[str, Dict] = {}
    for sub in subjects:
        for side in sizes:
            for n in batches:
                if not device.type == "cuda" and mem_cap_mb > 0:
                    prev = [(r["batch"], r["peak_mb"]) for r in grid
                            if r["model"] == sub.name and r["size"] == [side, side]
                            and r["status"] == "ok"]
                    fit = _fit(prev)
                    if fit is not None and fit[0] + fit[1] * n > mem_cap_mb:
                        grid.append({"model": sub.name, "batch": n, "size": [side, side],
                                     "status": "skipped (predicted over the memory cap)"})
                        continue
                row = _step_point(sub, cfg, task, n, (side, side), device, settings, iters,
                                  warmup)
                row["model"] = sub.name
                grid.append(row)
                print(f"[scaling] {sub.name} {side}x{side} batch {n}: "
                      + (f"{row['s_per_iter']:.4f} s/iter, {row['peak_mb']:.0f} MB"
                         if row["status"] == "ok" else row["status"]), flush=True)
        if find_largest:
            at = tuple(largest_at or settings.size)
            fitted = [r["batch"] for r in grid if r.get("model") == sub.name
                      and r.get("status") == "ok" and tuple(r.get("size", ())) == at]
            largest[sub.name] = largest_batch(sub, cfg, task, at, device, settings,
                                              mem_cap_mb=mem_cap_mb, max_batch=max_batch,
                                              start=max(fitted, default=1))
            print(f"[scaling] {sub.name}: largest batch at {at[0]}x{at[1]}: "
                  f"{largest[sub.name]['largest_batch']}", flush=True)
    for sub in subjects:
        sub.close()
    free_memory(device)
    return {"config": str(config_file), "opts": list(opts), "iters": iters, "warmup": warmup,
            "precision": settings.precision, "mem_cap_mb": mem_cap_mb, "grid": grid,
            "largest_batch": largest, "skipped_references": skipped,
            "memory_kind": "cuda_peak_allocated_delta" if device.type == "cuda"
            else "cpu_peak_rss_delta_approx"}


def format_scaling(sc: Dict) -> str:
    """The scaling grid and largest batches as markdown."""
    mem = "CUDA peak alloc. delta MB" if sc["memory_kind"].startswith("cuda") else \
        "peak RSS delta MB (approx.)"
    lines = [f"### scaling ({sc['config']}, {sc['precision']})", "",
             f"| model | size | batch | s/iter | img/s | {mem} |", "|---|---|---|---|---|---|"]
    for r in sc["grid"]:
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} | "
                         f"{r['s_per_iter']:.4g} | {r['img_per_s']:.3g} | {r['peak_mb']:.0f} |")
        else:
            lines.append(f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} | "
                         f"{r['status']} | | |")
    for name, lb in sc.get("largest_batch", {}).items():
        extra = ""
        if "predicted_largest_batch" in lb:
            if "cap_mb" in lb:
                extra = (f"; linear fit predicts {lb['predicted_largest_batch']} under the "
                         f"{lb['cap_mb']:.0f} MB cap")
            else:
                extra = (f"; linear fit predicted {lb['predicted_largest_batch']} in "
                         f"{lb['capacity_mb']:.0f} MB")
        lines.append("")
        lines.append(f"largest batch for {name} at {lb['size'][0]}x{lb['size'][1]}: "
                     f"{lb['largest_batch']} (search limit {lb['max_batch']}; {lb['rule']}"
                     f"{extra})")
    return "\n".join(lines) + "\n"
