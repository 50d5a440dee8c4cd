#!/usr/bin/env python
"""Train each semantic architecture from scratch on ISBI 2012 (slices 0-24) and evaluate on
slices 25-29, through train_net's code path; print and save membrane Dice / IoU / pixel
accuracy with times and the machine.

    python benchmarks/isbi.py --data ../shared/data                     # CPU configs
    python benchmarks/isbi.py --data ../shared/data --preset gpu        # full-size configs
    python benchmarks/isbi.py --data ../shared/data --preset gpu --archs unet --reference
        # the issue-3 anchor: d2seg's U-Net and the plain-PyTorch U-Net, same schedule, one run
    python benchmarks/isbi.py --data ../shared/data --archs unet --iters 600 \\
        --opts MODEL.UNET.BASE_CHANNELS 16

Each architecture runs ``tools/train_net.py`` in its own process, one after the other.
Metrics come from d2seg's ``SemSegMetricsEvaluator`` (pooled over the 5 validation slices,
membrane = class 1) and detectron2's ``SemSegEvaluator`` (mIoU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "ISBI-SemanticSegmentation")
ARCHS = ("unet", "deeplabv3", "deeplabv3plus", "pspnet", "semantic_fpn", "segformer",
         "hrnet")
FULL = {"unet": "unet.yaml", "deeplabv3": "deeplabv3_R_50.yaml",
        "deeplabv3plus": "deeplabv3plus_R_50.yaml", "pspnet": "pspnet_R_50.yaml",
        "semantic_fpn": "semantic_fpn_R_50.yaml", "segformer": "segformer_b2.yaml",
        "hrnet": "hrnet_w18.yaml"}
# CPU configs not named "<arch>_cpu.yaml"
CPU = {"segformer": "segformer_b0_cpu.yaml", "hrnet": "hrnet_w18_small_cpu.yaml"}
VAL = "isbi2012_membrane_val"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU (no GPU): {cpu}; torch {torch.__version__}"


def model_facts(cfg_file: str, opts: List[str]) -> Dict:
    """Parameter count and the config's SOLVER.MAX_ITER / IMS_PER_BATCH / crop."""
    import d2seg  # noqa: F401  (registers the models)
    from detectron2.modeling import build_model

    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    crop = list(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else "full image"
    facts = {"parameters": sum(p.numel() for p in build_model(cfg).parameters()),
             "iters": cfg.SOLVER.MAX_ITER, "batch": cfg.SOLVER.IMS_PER_BATCH, "crop": crop}
    if cfg.MODEL.META_ARCHITECTURE == "UNet":
        facts["base_channels"] = cfg.MODEL.UNET.BASE_CHANNELS
    return facts


def run_reference(unet_row: Dict, out: str, data: str, device: str) -> Dict:
    """The plain-PyTorch U-Net (benchmarks/isbi_reference.py) on d2seg U-Net's schedule:
    same iterations, batch, crop, width, training and evaluation precision."""
    crop = unet_row["crop"]
    crop = 512 if crop == "full image" else int(crop[0])
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "isbi_reference.py"), "--data", data,
           "--iters", str(unet_row["iters"]), "--batch", str(unet_row["batch"]),
           "--crop", str(crop), "--base", str(unet_row["base_channels"]),
           "--precision", unet_row["precision"],
           "--eval-precision", unet_row.get("inference_precision", "fp32"),
           "--out", os.path.join(out, "result.json")]
    if device:
        cmd += ["--device", device]
    print(f"[isbi] reference: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmark_stdout.txt"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"reference failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    with open(os.path.join(out, "result.json")) as f:
        r = json.load(f)
    r.update(config="benchmarks/isbi_reference.py", opts=[], wall_seconds=round(time.time() - t0, 1),
             crop=unet_row["crop"])
    return r


def parse_train_seconds(log: str) -> float:
    m = re.findall(r"Total training time: (\d+):(\d+):(\d+)", log)
    if not m:
        return float("nan")
    h, mi, s = (int(x) for x in m[-1])
    return 3600 * h + 60 * mi + s


def parse_precision(log: str, key: str = "amp") -> str:
    """A precision d2seg's "Fast paths:" log line reports: "bf16", "fp16" or "fp32". ``key``
    "amp": training (``SOLVER.AMP.ENABLED`` off, or turned off on a CPU where bf16 is not
    faster: fp32); "inference_amp": evaluation (``D2SEG.SPEED.INFERENCE_AMP``; fp32 in logs
    of d2seg before session 17, which had no such key)."""
    m = re.findall(r"Fast paths: .*?\b" + re.escape(key) + r"=(\S+)", log)
    return {"bfloat16": "bf16", "float16": "fp16"}.get(m[-1] if m else "off", "fp32")


def run_one(arch: str, cfg_file: str, out: str, iters: int, opts: List[str], data: str) -> Dict:
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", cfg_file,
           "OUTPUT_DIR", out, *(["SOLVER.MAX_ITER", str(iters)] if iters else []), *opts]
    env = dict(os.environ, D2SEG_SHARED_DATA=os.path.abspath(data))
    print(f"[isbi] {arch}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.time() - t0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "benchmark_stdout.txt"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{arch} failed (exit {proc.returncode}); see "
                           f"{out}/benchmark_stdout.txt:\n{proc.stdout[-3000:]}")
    with open(os.path.join(out, "inference", VAL, "sem_seg_metrics.json")) as f:
        m = json.load(f)
    d2_miou = re.findall(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*copypaste: ([\d.]+),", proc.stdout)
    return {
        "arch": arch,
        "config": os.path.relpath(cfg_file, REPO),
        "opts": opts,
        "membrane_dice": m["Dice-membrane"],
        "membrane_iou": m["IoU-membrane"],
        "pixel_accuracy": m["pACC"],
        "mIoU": m["mIoU"],
        "mDice": m["mDice"],
        "membrane_boundary_iou": m.get("BIoU-membrane"),
        "d2_mIoU": float(d2_miou[-1]) if d2_miou else None,
        **model_facts(cfg_file, opts + (["SOLVER.MAX_ITER", str(iters)] if iters else [])),
        "precision": parse_precision(proc.stdout),
        "inference_precision": parse_precision(proc.stdout, "inference_amp"),
        "train_seconds": parse_train_seconds(proc.stdout),
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True,
                    help="the shared data folder holding isbi2012_membrane/")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: *_cpu.yaml configs; gpu: full-size configs")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--iters", type=int, default=0, help="SOLVER.MAX_ITER (0: the config's)")
    ap.add_argument("--output-dir", default=os.path.join(REPO, "output", "isbi_benchmark"))
    ap.add_argument("--results", default="", help="JSON file to write (default: in output-dir)")
    ap.add_argument("--reference", action="store_true",
                    help="also train the plain-PyTorch U-Net (benchmarks/isbi_reference.py) "
                         "on the d2seg U-Net's schedule, in the same run (needs 'unet' in --archs)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                    help="KEY VALUE pairs passed to every run")
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "isbi2012_membrane")):
        sys.exit(f"--data {args.data}: no isbi2012_membrane/ inside")
    import torch

    if args.preset == "gpu" and not torch.cuda.is_available():
        sys.exit("--preset gpu: no CUDA device here (the full-size schedules take hours on a "
                 "CPU); use --preset cpu")
    rows = []
    for arch in args.archs:
        name = CPU.get(arch, f"{arch}_cpu.yaml") if args.preset == "cpu" else FULL[arch]
        out = os.path.join(args.output_dir, f"{arch}_{args.preset}")
        rows.append(run_one(arch, os.path.join(CONFIG_DIR, name), out, args.iters, args.opts,
                            args.data))
        r = rows[-1]
        print(f"[isbi] {arch} ({r['precision']}): membrane Dice {r['membrane_dice']:.2f}  IoU "
              f"{r['membrane_iou']:.2f}  pACC {r['pixel_accuracy']:.2f}  train "
              f"{r['train_seconds']:.0f} s", flush=True)
    if args.reference:
        unet = [r for r in rows if r["arch"] == "unet"]
        if not unet:
            sys.exit("--reference needs 'unet' among --archs")
        device = "cuda" if torch.cuda.is_available() and args.preset == "gpu" else "cpu"
        rows.append(run_reference(unet[0], os.path.join(args.output_dir, "reference"), args.data,
                                  device))
        r = rows[-1]
        print(f"[isbi] plain PyTorch U-Net: membrane Dice {r['membrane_dice']:.2f}  "
              f"train {r['train_seconds']:.0f} s", flush=True)
    result = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "preset": args.preset, "runs": rows}
    path = args.results or os.path.join(args.output_dir, f"results_{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nmeasured on: {result['machine']}  ({result['date']})")
    print("| architecture | config | precision (train / eval) | params | iterations x batch (crop) "
          "| membrane Dice | membrane IoU | pixel acc. | train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        prec = f"{r['precision']} / {r.get('inference_precision', 'fp32')}"
        print(f"| {r['arch']} | {r['config']} | {prec} | {r['parameters'] / 1e6:.2f} M | "
              f"{r['iters']} x {r['batch']} ({r['crop']}) | "
              f"{r['membrane_dice']:.2f} | {r['membrane_iou']:.2f} | {r['pixel_accuracy']:.2f} | "
              f"{r['train_seconds']:.0f} s |")
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
