"""Host cost of detectron2's per-image R-CNN proposal / target code against
``D2SEG.SPEED.RCNN_BATCHED`` (``d2seg/modeling/batched_rcnn.py``).

Runs the three places the switch changes - RPN anchor targets + RPN losses, proposal selection
(checks, clipping, small-box filter, NMS), ROI-head proposal targets + the mask head's
foreground selection - on the RPN and ROI heads of a model built from a config, for one
batch, detectron2's way and the batched way, in turns. With few anchors and proposals per
image (e.g. ``--anchors 300``) the arithmetic is negligible, so the time is what these sections
cost the host: Python, dispatch and one launch per operation; the default ``--anchors 3000``
is nearer a real image, where NMS takes a larger share. On a GPU that time is exposed - the
device waits - because these sections run after the first host synchronisation of the step.
It also counts the operations and the host synchronisations of each way (CPU emulation,
``d2seg.benchmark.syncs.HostSyncAudit``).

    python benchmarks/rcnn_batched.py --batch 16 --json out.json

Prints a table; ``--json`` writes the numbers, settings and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401
from d2seg.benchmark.measure import machine_info  # noqa: E402
from d2seg.benchmark.syncs import HostSyncAudit  # noqa: E402
from d2seg.config import load_config  # noqa: E402
from d2seg.engine import Trainer  # noqa: E402
from d2seg.modeling import batched_rcnn as br  # noqa: E402

from detectron2.modeling.proposal_generator.proposal_utils import \
    find_top_rpn_proposals  # noqa: E402
from detectron2.modeling.proposal_generator.rpn import RPN  # noqa: E402
from detectron2.modeling.roi_heads.roi_heads import (ROIHeads,  # noqa: E402
                                                     select_foreground_proposals)
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

CONFIG = "configs/Shapes-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_frozenbn.yaml"


def _boxes(gen, n, size):
    xy = torch.rand(n, 2, generator=gen) * size * 0.8
    wh = torch.rand(n, 2, generator=gen) * size * 0.3 + 4
    return torch.cat([xy, xy + wh], 1)


def _inputs(args, gen):
    b, size = args.batch, args.image
    per_level = [args.anchors // 5] * 5
    anchors = [Boxes(_boxes(gen, n, size)) for n in per_level]
    gts = []
    for _ in range(b):
        t = Instances((size, size))
        t.gt_boxes = Boxes(_boxes(gen, args.objects, size))
        t.gt_classes = torch.randint(0, 3, (args.objects,), generator=gen)
        t.gt_masks = BitMasks(torch.zeros(args.objects, 8, 8, dtype=torch.bool))
        gts.append(t)
    logits = [torch.randn(b, n, generator=gen) for n in per_level]
    deltas = [torch.randn(b, n, 4, generator=gen) * 0.1 for n in per_level]
    proposals = [torch.stack([a.tensor] * b) + torch.randn(b, len(a), 4, generator=gen)
                 for a in anchors]
    return anchors, gts, logits, deltas, proposals


def _sections(rpn, heads, data, batched: bool, props=None):
    anchors, gts, logits, deltas, proposals = data
    sizes = [t.image_size for t in gts]

    def rpn_targets():
        if batched:
            lab, box = br.rpn_label_and_sample(rpn, anchors, gts)
            return br.rpn_losses(rpn, anchors, logits, lab, deltas, box)
        lab, box = RPN.label_and_sample_anchors(rpn, anchors, gts)
        return RPN.losses(rpn, anchors, logits, lab, deltas, box)

    top = (proposals, logits, sizes, rpn.nms_thresh, rpn.pre_nms_topk[True],
           rpn.post_nms_topk[True], rpn.min_box_size, True)

    def select():
        return (br.find_top_proposals if batched else find_top_rpn_proposals)(*top)

    if props is None:
        props = find_top_rpn_proposals(*top)

    def roi_targets():
        if batched:
            out = br.roi_label_and_sample(heads, props, gts)
            return [x[:x._d2seg_num_fg] for x in out]
        out = ROIHeads.label_and_sample_proposals(heads, props, gts)
        return select_foreground_proposals(out, heads.num_classes)[0]

    return {"rpn_targets_and_losses": rpn_targets, "proposal_selection": select,
            "roi_targets_and_foreground": roi_targets}, props


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-file", default=CONFIG)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=3000, help="anchors per image (all levels)")
    ap.add_argument("--objects", type=int, default=7, help="objects per image")
    ap.add_argument("--image", type=int, default=256, help="image side (px)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.RCNN_BATCHED", "off",
                                         "MODEL.WEIGHTS", ""])
    model = Trainer.build_model(cfg).train()
    rpn, heads = model.proposal_generator, model.roi_heads
    gen = torch.Generator().manual_seed(0)
    data = _inputs(args, gen)
    ways, props = {}, None
    for w in (False, True):  # both ways sample from the same proposals
        ways[w], props = _sections(rpn, heads, data, w, props)
    times = {(w, k): [] for w in ways for k in ways[w]}
    with EventStorage(0):
        for r in range(args.rounds + 1):  # the first round warms up
            for w in ((False, True) if r % 2 else (True, False)):
                for k, fn in ways[w].items():
                    t0 = time.perf_counter()
                    fn()
                    if r:
                        times[(w, k)].append(time.perf_counter() - t0)
        audits = {}
        for w in ways:
            for k, fn in ways[w].items():
                roots = [a.tensor for a in data[0]] + data[2] + data[3] + data[4]
                roots += [t.gt_boxes.tensor for t in data[1]] + [t.gt_classes for t in data[1]]
                roots += [p.proposal_boxes.tensor for p in props]
                roots += [p.objectness_logits for p in props]
                with HostSyncAudit(torch.device("cpu"), roots) as a:
                    fn()
                audits[(w, k)] = (a.count, a.device_ops)
    rows = []
    for k in ways[False]:
        d2, ours = (statistics.median(times[(w, k)]) * 1e3 for w in (False, True))
        rows.append({"section": k, "detectron2_ms": d2, "batched_ms": ours, "speedup": d2 / ours,
                     "detectron2_syncs": audits[(False, k)][0], "batched_syncs": audits[(True, k)][0],
                     "detectron2_ops": audits[(False, k)][1], "batched_ops": audits[(True, k)][1]})
    total = {key: sum(r[key] for r in rows) for key in rows[0] if key not in ("section", "speedup")}
    total["speedup"] = total["detectron2_ms"] / total["batched_ms"]
    rows.append({"section": "total", **total})
    print(f"{args.batch} images, {args.anchors} anchors and {args.objects} objects per image, "
          f"{args.rounds} rounds (median), {args.threads} thread(s)")
    print("| section | detectron2 ms | batched ms | speed-up | host syncs | device ops |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['section']} | {r['detectron2_ms']:.1f} | {r['batched_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['detectron2_syncs']} -> {r['batched_syncs']} | "
              f"{r['detectron2_ops']} -> {r['batched_ops']} |")
    result = {"settings": vars(args), "machine": machine_info(torch.device("cpu")),
              "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
