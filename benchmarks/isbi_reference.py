#!/usr/bin/env python
"""The plain-PyTorch U-Net baseline on ISBI 2012, written the way one would without d2seg.

This is the anchor d2seg's U-Net is compared with (issue 3): the classic U-Net
(:class:`d2seg.benchmark.references.PlainUNet`, plain ``torch.nn``), trained from scratch on
slices 0-24 with Adam (constant lr 1e-3), CE + soft Dice on the membrane probability, random
flips and 90-degree rotations, then evaluated on slices 25-29 at full size. Membrane is label 0
in the label PNGs; here it is class 1, as in d2seg's ``isbi2012_membrane_*`` datasets, and the
Dice / IoU / pixel accuracy are pooled over the five validation slices exactly as d2seg's
``SemSegMetricsEvaluator`` pools them.

    python benchmarks/isbi_reference.py --data ../shared/data                    # anchor
    python benchmarks/isbi_reference.py --data ../shared/data --iters 600 --crop 256 --base 16
    python benchmarks/isbi_reference.py --data ../shared/data --precision bf16   # bf16 autocast

``--precision bf16`` (or ``fp16``, CUDA only, with a gradient scaler) runs the forward pass
under ``torch.autocast`` and the loss in fp32, as d2seg's AMP trainer does. Evaluation runs in
``--eval-precision`` (default fp32; ``benchmarks/isbi.py`` passes the precision d2seg's
evaluation used, ``D2SEG.SPEED.INFERENCE_AMP``).

``benchmarks/isbi.py --reference`` runs it beside d2seg's U-Net with the same schedule.
Prints one JSON line (prefixed ``[reference] result:``) and writes it to ``--out`` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from d2seg.benchmark.references import PlainUNet  # noqa: E402  (plain torch.nn, no detectron2)

MEAN, STD = 125.3, 43.7  # the grey level statistics d2seg's ISBI configs use


def load_slices(root: str, ids: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(n, 512, 512) float32 images (normalised) and (n, 512, 512) int64 labels (1 = membrane)."""
    base = os.path.join(root, "isbi2012_membrane", "train")
    imgs, labels = [], []
    for i in ids:
        img = np.asarray(Image.open(os.path.join(base, "image", f"{i}.png")).convert("L"),
                         dtype=np.float32)
        lab = np.asarray(Image.open(os.path.join(base, "label", f"{i}.png")).convert("L"))
        imgs.append((img - MEAN) / STD)
        labels.append((lab < 128).astype(np.int64))
    return np.stack(imgs), np.stack(labels)


def sample_batch(imgs: np.ndarray, labels: np.ndarray, batch: int, crop: int,
                 rng: random.Random) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    h, w = imgs.shape[1:]
    for _ in range(batch):
        i = rng.randrange(len(imgs))
        y0, x0 = rng.randint(0, h - crop), rng.randint(0, w - crop)
        x = imgs[i, y0:y0 + crop, x0:x0 + crop]
        y = labels[i, y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        k = rng.randrange(4)
        x, y = np.rot90(x, k), np.rot90(y, k)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    x = torch.from_numpy(np.stack(xs))[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(np.stack(ys))


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of the membrane (class 1) probability, smoothing 1."""
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1]
    t = (target == 1).float()
    dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return ce + (1 - dice)


@torch.no_grad()
def evaluate(model: torch.nn.Module, imgs: np.ndarray, labels: np.ndarray,
             device: torch.device, dtype: Optional[torch.dtype] = None) -> dict:
    """Pooled membrane Dice / IoU and pixel accuracy; the forward under autocast to ``dtype``
    (None: fp32)."""
    model.eval()
    tp = fp = fn = correct = 0
    for img, lab in zip(imgs, labels):
        x = torch.from_numpy(img)[None, None].expand(1, 3, -1, -1).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                             enabled=dtype is not None):
            logits = model(x)
        pred = logits.float().argmax(1)[0].cpu().numpy()
        tp += int(((pred == 1) & (lab == 1)).sum())
        fp += int(((pred == 1) & (lab == 0)).sum())
        fn += int(((pred == 0) & (lab == 1)).sum())
        correct += int((pred == lab).sum())
    model.train()
    return {"membrane_dice": 100 * 2 * tp / max(2 * tp + fp + fn, 1),
            "membrane_iou": 100 * tp / max(tp + fp + fn, 1),
            "pixel_accuracy": 100 * correct / labels.size}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding isbi2012_membrane/")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=512, help="square training crop (512 = full)")
    ap.add_argument("--base", type=int, default=64, help="U-Net base channels (64 = classic)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="training precision: bf16 / fp16 = forward under autocast (fp16: CUDA, "
                         "with a gradient scaler)")
    ap.add_argument("--eval-precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="evaluation precision (bf16 / fp16: the forward under autocast)")
    ap.add_argument("--out", default="", help="JSON file to write")
    args = ap.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    amp_dtype = dtypes.get(args.precision)
    eval_dtype = dtypes.get(args.eval_precision)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    train_x, train_y = load_slices(args.data, list(range(25)))
    val_x, val_y = load_slices(args.data, list(range(25, 30)))
    for name, dt in (("--precision", amp_dtype), ("--eval-precision", eval_dtype)):
        if dt is torch.float16 and device.type != "cuda":
            ap.error(f"{name} fp16 needs a CUDA device (CPU autocast: bf16)")
    model = PlainUNet(base=args.base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for it in range(args.iters):
        x, y = sample_batch(train_x, train_y, args.batch, args.crop, rng)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            logits = model(x.to(device))
        loss = ce_dice_loss(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if (it + 1) % 100 == 0 or it == 0:
            print(f"[reference] iter {it + 1}/{args.iters} loss {loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    result = {"arch": "plain_pytorch_unet", **evaluate(model, val_x, val_y, device, eval_dtype),
              "parameters": sum(p.numel() for p in model.parameters()),
              "iters": args.iters, "batch": args.batch, "crop": args.crop, "lr": args.lr,
              "seed": args.seed, "precision": args.precision,
              "inference_precision": args.eval_precision, "train_seconds": round(train_s, 1),
              "device": str(device)}
    print("[reference] result: " + json.dumps(result), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
