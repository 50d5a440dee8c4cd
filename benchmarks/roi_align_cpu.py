"""CPU ROIAlign: torchvision's single-threaded kernels against d2seg's
``D2SEG.SPEED.PARALLEL_ROI_ALIGN`` and ``D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD``
(``d2seg/modeling/layers/roi_align.py``).

Two measurements, each with the variants in turns in one process:

1. the training step of a Mask R-CNN config (default: ``make demo``'s R18-FPN) through the
   benchmark harness's ``D2SegSubject`` (d2seg's trainer on a fixed synthetic batch), with
   the key ``--switch`` on and off (the other key at the config's value);
2. ROIAlign alone, forward + backward, at that model's pooler shapes (the box head's 7x7 and
   the mask head's 14x14 on the FPN's stride-4 level): torchvision, the channels split over
   threads, and the split with the sparse input gradient.

    python benchmarks/roi_align_cpu.py --json out.json
    python benchmarks/roi_align_cpu.py --switch SPARSE_ROI_ALIGN_GRAD --json out.json

Prints the medians and the ratios; ``--json`` writes them with the settings and the machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401
from d2seg.benchmark.measure import machine_info  # noqa: E402
from d2seg.config import load_config  # noqa: E402
from d2seg.modeling.layers.roi_align import ParallelROIAlign  # noqa: E402

from detectron2.layers import ROIAlign  # noqa: E402

from switch_ab import interleaved, step_ab, write_json  # noqa: E402  (benchmarks/switch_ab.py)

CONFIG = "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml"


def op_ab(args, channels: int, size: int, rois: int, feat: int, sampling: int) -> dict:
    """ROIAlign forward + backward seconds per round: torchvision, the channel split, and the
    split with the sparse gradient; ``rois`` regions of 2 px to a fifth of the image on a
    channels_last (batch, channels, feat, feat) map, ``sampling`` = the config's
    ``POOLER_SAMPLING_RATIO`` (0: torchvision's adaptive grid)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, channels, feat, feat, generator=g)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    b = torch.randint(0, args.batch, (rois, 1), generator=g).float()
    xy = torch.rand(rois, 2, generator=g) * args.size * 0.8
    wh = torch.rand(rois, 2, generator=g) * args.size * 0.2 + 2
    boxes = torch.cat([b, xy, xy + wh], 1)
    sparse = ParallelROIAlign((size, size), feat / args.size, sampling, True)
    sparse.sparse_grad = True
    mods = {"parallel": ParallelROIAlign((size, size), feat / args.size, sampling, True),
            "parallel_sparse_grad": sparse,
            "torchvision": ROIAlign((size, size), feat / args.size, sampling, True)}

    def run(m):
        x.grad = None
        out = m(x, boxes)
        out.backward(torch.ones_like(out))

    for m in mods.values():
        run(m)
    return interleaved({k: (lambda m=m: run(m)) for k, m in mods.items()}, args.rounds,
                        args.iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", default=CONFIG)
    ap.add_argument("--switch", default="PARALLEL_ROI_ALIGN",
                    choices=("PARALLEL_ROI_ALIGN", "SPARSE_ROI_ALIGN_GRAD"),
                    help="the D2SEG.SPEED key the training step is measured on and off with")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="square synthetic image side")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                    help="bf16: the demo's CPU autocast where it is faster")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=2, help="calls per round")
    ap.add_argument("--ops-only", action="store_true",
                    help="ROIAlign alone: skip the training-step measurement")
    ap.add_argument("--json", default="")
    ap.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                    help="KEY VALUE overrides of both d2seg sides")
    args = ap.parse_args()
    out = {"machine": machine_info(torch.device("cpu")), "settings": vars(args),
           "torch_threads": torch.get_num_threads()}
    logging.disable(logging.INFO)  # detectron2's set-up logging (config dumps)
    step = None if args.ops_only else step_ab(
        args.config_file, f"D2SEG.SPEED.{args.switch}", ["on", "off"], args.precision,
        args.batch, args.size, args.warmup, args.rounds, args.iters, args.opts)
    c = load_config(args.config_file, ["MODEL.DEVICE", "cpu"] + args.opts)
    ch, per_img = c.MODEL.FPN.OUT_CHANNELS, c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    box, mask = c.MODEL.ROI_BOX_HEAD, c.MODEL.ROI_MASK_HEAD
    ops = {"box_7x7": op_ab(args, ch, box.POOLER_RESOLUTION, per_img * args.batch,
                            args.size // 4, box.POOLER_SAMPLING_RATIO),
           "mask_14x14": op_ab(args, ch, mask.POOLER_RESOLUTION, per_img * args.batch // 4,
                               args.size // 4, mask.POOLER_SAMPLING_RATIO)}
    med = statistics.median
    out["sampling_ratio"] = {"box_7x7": box.POOLER_SAMPLING_RATIO,
                             "mask_14x14": mask.POOLER_SAMPLING_RATIO}
    if step is not None:
        out["train_step_s"] = step
        out["train_step_speedup"] = med(step["off"]) / med(step["on"])
    out["roi_align_fwd_bwd_s"] = ops
    out["switch"] = args.switch
    out["roi_align_speedup"] = {k: med(v["torchvision"]) / med(v["parallel"])
                                for k, v in ops.items()}
    out["roi_align_sparse_grad_speedup"] = {
        k: med(v["torchvision"]) / med(v["parallel_sparse_grad"]) for k, v in ops.items()}
    print(f"{os.path.basename(args.config_file)}, batch {args.batch}, {args.size} px, "
          f"{args.precision}, {out['torch_threads']} torch threads")
    if step is not None:
        print(f"train step: {med(step['on']):.3f} s with {args.switch} on, "
              f"{med(step['off']):.3f} s off: {out['train_step_speedup']:.2f}x")
    for k, v in ops.items():
        print(f"ROIAlign {k} forward + backward: {1e3 * med(v['torchvision']):.1f} ms "
              f"torchvision, {1e3 * med(v['parallel']):.1f} ms parallel "
              f"({out['roi_align_speedup'][k]:.2f}x), "
              f"{1e3 * med(v['parallel_sparse_grad']):.1f} ms parallel + sparse gradient "
              f"({out['roi_align_sparse_grad_speedup'][k]:.2f}x)")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
