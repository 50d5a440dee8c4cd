"""What the training process pays to receive batches from the data-loader workers.

For one config, builds d2seg's training loader (train_net's, with real data and the config's
mapper) with each ``D2SEG.SPEED.PACK_SAMPLES`` setting (and optionally each torch sharing
strategy), interleaved over ``--repeats`` rounds, and measures per batch:

* ``img_per_s``: images per second out of the loader (workers + transfer);
* ``main_cpu_ms_per_batch``: CPU time of the training process while it takes ``--batches``
  batches (unpickling, shared-memory handshakes, detectron2's batching): the time that
  competes with queuing the training step.

(``D2SEG.SPEED.SHARING_STRATEGY`` and ``PACK_SAMPLES`` are set through the config, as a user
would.)

    python benchmarks/loader_transfer.py --config-file \\
        configs/Shapes-SemanticSegmentation/unet_cpu.yaml --size 512 --workers 2 \\
        --json benchmarks/results/loader_transfer_cpu.json

Each measurement runs in a fresh process (the sharing strategy is process-wide).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(args: argparse.Namespace) -> None:
    """Child process: one setting, one JSON line on stdout."""
    import logging

    sys.path.insert(0, ROOT)
    from d2seg.data.build import build_train_loader
    from d2seg.engine.train_loop import setup

    logging.disable(logging.WARNING)
    size = args.size
    opts = ["OUTPUT_DIR", os.path.join(args.tmp, "out"), "SOLVER.IMS_PER_BATCH", str(args.batch),
            "DATALOADER.NUM_WORKERS", str(args.workers), "D2SEG.SPEED.PACK_SAMPLES", args.pack,
            "D2SEG.SPEED.SHARING_STRATEGY", args.strategy]
    if args.size:
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(2 * size),
                 "D2SEG.SHAPES.IMAGE_SIZE", str(size)]
        if args.crop:
            opts += ["INPUT.CROP.SIZE", f"({size}, {size})"]
    ns = argparse.Namespace(config_file=args.config_file, opts=opts + list(args.opts),
                            resume=False, eval_only=False, num_gpus=1, num_machines=1,
                            machine_rank=0, dist_url="auto")
    cfg = setup(ns)
    it = iter(build_train_loader(cfg))
    for _ in range(args.warmup):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(it)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"img_per_s": args.batches * args.batch / wall,
                      "main_cpu_ms_per_batch": 1000 * cpu / args.batches}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--size", type=int, default=0, help="image short side (0: the config's)")
    p.add_argument("--crop", action="store_true", help="also crop to size x size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strategies", default="file_descriptor",
                   help="comma-separated torch sharing strategies to compare")
    p.add_argument("--json", default="")
    p.add_argument("--tmp", default="/tmp/d2seg_loader_transfer")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="file_descriptor", help=argparse.SUPPRESS)
    p.add_argument("--pack", default="auto", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args()
    if args.child:
        _measure(args)
        return
    settings = [(s, pk) for s in args.strategies.split(",") for pk in ("off", "on")]
    runs = {f"{s} pack={pk}": [] for s, pk in settings}
    base = [sys.executable, os.path.abspath(__file__), "--child", "--config-file",
            args.config_file, "--size", str(args.size), "--batch", str(args.batch),
            "--workers", str(args.workers), "--batches", str(args.batches), "--warmup",
            str(args.warmup), "--tmp", args.tmp] + (["--crop"] if args.crop else [])
    for r in range(args.repeats):  # interleaved: machine load drifts between rounds
        for s, pk in settings:
            out = subprocess.run(base + ["--strategy", s, "--pack", pk] + list(args.opts),
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"measurement failed ({s}, pack {pk}):\n{out.stderr[-3000:]}")
            runs[f"{s} pack={pk}"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    print(f"{args.config_file} size {args.size or 'config'} batch {args.batch} "
          f"workers {args.workers} ({args.repeats} rounds, median)")
    print(f"{'setting':34s} {'img/s':>8s} {'main CPU ms/batch':>18s}")
    for k, v in runs.items():
        med = {m: statistics.median(x[m] for x in v) for m in v[0]}
        summary[k] = {"median": med, "runs": v}
        print(f"{k:34s} {med['img_per_s']:8.1f} {med['main_cpu_ms_per_batch']:18.1f}")
    if args.json:
        import torch

        rec = {"command": " ".join(sys.argv), "machine": {
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "settings": {k: v for k, v in vars(args).items() if k not in ("child",)},
            "results": summary}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
