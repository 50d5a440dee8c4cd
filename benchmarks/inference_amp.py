#!/usr/bin/env python
"""Mixed-precision inference of trained models: fp32 against autocast, same weights, same
images, side by side in one process (``D2SEG.SPEED.INFERENCE_AMP``).

    python benchmarks/inference_amp.py --runs output/isbi/unet_cpu output/isbi/pspnet_cpu \\
        --json benchmarks/results/inference_amp_cpu.json
    python benchmarks/inference_amp.py --config-file CFG --weights model_final.pth

A run is a training output folder (its ``config.yaml`` and ``model_final.pth``, as
``tools/train_net.py`` and ``benchmarks/isbi.py`` leave them). For each run the test set
(``DATASETS.TEST[0]``) is read once into memory; the model is built twice through d2seg's
``Trainer.build_model`` (so with every fast path evaluation uses), ``INFERENCE_AMP`` "off" and
"on", and the two are timed in alternating rounds (forward passes only, median seconds per
image). Each precision's outputs from the last round go through the config's evaluators
(semantic: IoU / Dice; R-CNN: box and mask AP; panoptic: PQ too); for semantic models the share
of pixels whose predicted class differs between the two is reported too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401
from d2seg.benchmark.measure import machine_info, sync  # noqa: E402

PRECISIONS = ("off", "on")


def _build(cfg_file: str, weights: str, device: str, value: str, opts: List[str]):
    from detectron2.checkpoint import DetectionCheckpointer

    from d2seg.config import load_config
    from d2seg.data.catalogs import register_shapes_from_cfg
    from d2seg.data.register import register_datasets_from_cfg
    from d2seg.engine import fast_paths
    from d2seg.engine.trainer import Trainer
    from d2seg.inference import inference_autocast_dtype

    cfg = load_config(cfg_file, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", weights,
                                 "D2SEG.SPEED.INFERENCE_AMP", value] + list(opts))
    register_shapes_from_cfg(cfg)  # as train_net's setup: the config's shapes catalogs
    register_datasets_from_cfg(cfg)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    return cfg, model, inference_autocast_dtype(model)


def compare(cfg_file: str, weights: str, device: str = "cpu", rounds: int = 3,
            opts: Optional[List[str]] = None) -> Dict:
    """fp32 and autocast inference of one trained model: timings, metrics, disagreement."""
    from d2seg.engine import fast_paths
    from d2seg.engine.trainer import Trainer

    opts = list(opts or [])
    built = {v: _build(cfg_file, weights, device, v, opts) for v in PRECISIONS}
    cfg = built["off"][0]
    dataset = cfg.DATASETS.TEST[0]
    batches = list(Trainer.build_test_loader(cfg, dataset))
    n_images = sum(len(b) for b in batches)
    dev = torch.device(device)
    times: Dict[str, List[float]] = {v: [] for v in PRECISIONS}
    outputs: Dict[str, list] = {}
    with torch.no_grad():
        for v in PRECISIONS:  # warm-up (oneDNN primitives, cuDNN plans)
            built[v][1](batches[0])
        for r in range(rounds):
            for v in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
                model = built[v][1]
                sync(dev)
                t = time.perf_counter()
                outs = [model(b) for b in batches]
                sync(dev)
                times[v].append((time.perf_counter() - t) / n_images)
                outputs[v] = outs
    family = fast_paths.model_family(cfg)
    result: Dict = {"config": cfg_file, "weights": weights, "dataset": dataset,
                    "images": n_images, "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
                    "family": family,
                    "auto_dtype": _dtype_name(fast_paths.resolve(
                        _auto_cfg(cfg)).inference_amp_dtype),
                    "precisions": {}}
    for v in PRECISIONS:
        evaluator = Trainer.build_evaluator(cfg, dataset, None)
        evaluator.reset()
        for b, o in zip(batches, outputs[v]):
            evaluator.process(b, o)
        metrics = evaluator.evaluate()
        result["precisions"][v] = {
            "autocast_dtype": _dtype_name(built[v][2]),
            "s_per_image": statistics.median(times[v]), "s_per_image_rounds": times[v],
            "metrics": json.loads(json.dumps(metrics, default=float)),
        }
    differ = total = 0
    for oa, ob in zip(outputs["off"], outputs["on"]):
        for a, b in zip(oa, ob):
            if family != "semantic" or "sem_seg" not in a:
                continue
            la, lb = a["sem_seg"].argmax(0), b["sem_seg"].argmax(0)
            differ += int((la != lb).sum())
            total += la.numel()
    result["pixels_differing"] = differ / total if total else None
    result["speedup"] = (result["precisions"]["off"]["s_per_image"]
                         / result["precisions"]["on"]["s_per_image"])
    return result


def _auto_cfg(cfg):
    c = cfg.clone()
    c.defrost()
    c.D2SEG.SPEED.INFERENCE_AMP = "auto"
    return c


def _dtype_name(d: Optional[torch.dtype]) -> str:
    return str(d).replace("torch.", "") if d is not None else "float32"


def _headline(metrics: Dict) -> Dict[str, float]:
    """mIoU and, per class, IoU and Dice; box / mask AP, AP50, AP75; PQ, SQ, RQ (whichever
    the evaluators reported)."""
    out: Dict[str, float] = {}
    sem = metrics.get("sem_seg", {})
    out.update({k: v for k, v in sem.items() if k == "mIoU" or k.startswith("IoU-")})
    extra = metrics.get("sem_seg_metrics", {})
    out.update({k: v for k, v in extra.items() if k.startswith("Dice-") or k == "mDice"})
    for task in ("bbox", "segm"):
        out.update({f"{task} {k}": v for k, v in metrics.get(task, {}).items()
                    if k in ("AP", "AP50", "AP75")})
    out.update({k: v for k, v in metrics.get("panoptic_seg", {}).items()
                if k in ("PQ", "SQ", "RQ")})
    return out


def table(results: List[Dict]) -> str:
    rows = ["| model | autocast | s/img fp32 | s/img autocast | speed-up | pixels differing | "
            "metrics fp32 -> autocast |", "|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["precisions"]["off"], r["precisions"]["on"]
        ha, hb = _headline(a["metrics"]), _headline(b["metrics"])
        diffs = ", ".join(f"{k} {ha[k]:.2f} -> {hb[k]:.2f}" for k in ha if k in hb)
        differ = ("-" if r["pixels_differing"] is None
                  else f"{100 * r['pixels_differing']:.3f} %")
        rows.append(f"| {os.path.basename(os.path.dirname(r['weights'])) or r['config']} | "
                    f"{b['autocast_dtype']} | {a['s_per_image']:.4f} | {b['s_per_image']:.4f} | "
                    f"{r['speedup']:.2f}x | {differ} | {diffs} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=[],
                    help="training output folders (config.yaml + model_final.pth)")
    ap.add_argument("--config-file", default="")
    ap.add_argument("--weights", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    pairs = []
    for run in args.runs:
        cfg_file, weights = os.path.join(run, "config.yaml"), os.path.join(run, "model_final.pth")
        for p in (cfg_file, weights):
            if not os.path.isfile(p):
                ap.error(f"--runs {run}: {p} not found (a training output folder is needed)")
        pairs.append((cfg_file, weights))
    if args.config_file:
        if not args.weights:
            ap.error("--config-file needs --weights")
        pairs.append((args.config_file, args.weights))
    if not pairs:
        ap.error("give --runs DIR [DIR ...] or --config-file CFG --weights W")
    results = []
    for cfg_file, weights in pairs:
        results.append(compare(cfg_file, weights, args.device, args.rounds, args.opts))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(torch.device(args.device)), "device": args.device,
                       "rounds": args.rounds, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
