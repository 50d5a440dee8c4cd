"""One ``D2SEG.SPEED`` switch on and off, side by side in one process: d2seg's training step
(the benchmark harness's ``D2SegSubject``: d2seg's trainer on a fixed synthetic batch) for
each value, in alternating rounds, median.

    python benchmarks/switch_ab.py --config-file configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml \\
        --key D2SEG.SPEED.CHANNELS_LAST --precision bf16 --json out.json
    python benchmarks/switch_ab.py --config-file configs/ISBI-SemanticSegmentation/unet_cpu.yaml \\
        --key precision --values bf16,fp32      # the training precision itself

How the fast-path defaults on CPU were decided (docs/benchmarks.md, "Fast paths"): a
decision made from two processes moves with whatever else the shared machine runs; turns in
one process see the same machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401
from d2seg.benchmark import harness  # noqa: E402
from d2seg.benchmark.measure import machine_info  # noqa: E402
from d2seg.benchmark.subjects import D2SegSubject, task_of  # noqa: E402


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int,
                per_round: int) -> Dict[str, List[float]]:
    """{name: [seconds per call, one per round]}, the order reversed every other round."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            for _ in range(per_round):
                fns[k]()
            times[k].append((time.perf_counter() - t) / per_round)
    return times


def step_ab(config_file: str, key: str, values: Sequence[str], precision: str, batch: int,
            size: int, warmup: int, rounds: int, iters: int, opts: Sequence[str] = (),
            plans: Optional[Dict[str, dict]] = None,
            first: Optional[Dict[str, float]] = None) -> Dict[str, List[float]]:
    """Train-step seconds per round for each value of ``key`` (see the module docstring).
    ``key`` "precision" compares precisions ("fp32", "bf16") instead of a config key.
    ``plans``, when given, receives each value's resolved ``D2SEG.SPEED`` plan; ``first`` the
    seconds of each value's first step (one-off costs: a ``torch.compile``, a first-call
    allocation), which the warm-up then absorbs (``warmup`` >= 1)."""
    dev = torch.device("cpu")
    if key == "precision":
        subs = {v: D2SegSubject(config_file, list(opts), dev, v, batch, max_iter=10 ** 6)
                for v in values}
    else:
        subs = {v: D2SegSubject(config_file, [key, v] + list(opts), dev, precision, batch,
                                max_iter=10 ** 6) for v in values}
    lead = subs[values[0]]
    s = harness.Settings(device="cpu", precision=lead.precision, batch=batch,
                         size=(size, size))
    data = harness._batch_for(lead, lead.cfg, task_of(lead.cfg), batch, (size, size), dev, s)
    if plans is not None:
        plans.update({v: sub.speed_plan for v, sub in subs.items()})
    for v, sub in subs.items():
        sub.set_batch(data)
        t = time.perf_counter()
        sub.train_steps(1)
        if first is not None:
            first[v] = time.perf_counter() - t
        if warmup > 1:
            sub.train_steps(warmup - 1)
    times = interleaved({v: (lambda sub=sub: sub.train_steps(1)) for v, sub in subs.items()},
                        rounds, iters)
    for sub in subs.values():
        sub.close()
    return times


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` (folders made as needed); nothing for an empty path."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--key", required=True,
                    help="e.g. D2SEG.SPEED.CHANNELS_LAST; 'precision' compares --values "
                         "fp32,bf16 (then --precision is unused)")
    ap.add_argument("--values", default="on,off", help="the two (or more) values, comma-separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="square synthetic image side")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per value (>= 1); the first one's seconds are recorded "
                         "as first_step_s (a torch.compile's cost, for instance)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=2, help="steps per round")
    ap.add_argument("--json", default="")
    ap.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                    help="KEY VALUE overrides of every side")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error(f"--warmup must be >= 1, got {args.warmup}")
    values = [v for v in args.values.split(",") if v]
    logging.disable(logging.INFO)  # detectron2's set-up logging (config dumps)
    plans: Dict[str, dict] = {}
    first: Dict[str, float] = {}
    times = step_ab(args.config_file, args.key, values, args.precision, args.batch, args.size,
                    args.warmup, args.rounds, args.iters, args.opts, plans, first)
    med = {v: statistics.median(t) for v, t in times.items()}
    settings = dict(vars(args))
    if args.key == "precision":
        settings["precision"] = "per value"  # --precision is unused then
    out = {"machine": machine_info(torch.device("cpu")), "settings": settings,
           "torch_threads": torch.get_num_threads(), "train_step_s": times,
           "median_s": med, "first_step_s": first,
           "speedup_vs_last": {v: med[values[-1]] / med[v] for v in values},
           "speed_plans": plans}
    prec = "" if args.key == "precision" else f", {args.precision}"
    print(f"{os.path.basename(args.config_file)}, {args.key}, batch {args.batch}, {args.size} "
          f"px{prec}, {out['torch_threads']} torch threads")
    for v in values:
        print(f"  {v}: {med[v]:.3f} s/step (rounds {[round(x, 3) for x in times[v]]}), "
              f"{out['speedup_vs_last'][v]:.3f}x '{values[-1]}'; first step {first[v]:.1f} s")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
