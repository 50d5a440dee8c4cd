#!/usr/bin/env python
"""How long COCO evaluation takes, and whether faster-coco-eval agrees with pycocotools.

Instance AP (bbox and segm) runs through detectron2's own ``_evaluate_predictions_on_coco``
(what ``COCOEvaluator`` calls) once with pycocotools' ``COCOeval`` and once with
faster-coco-eval, on the same predictions; every number detectron2 prints (the 12 summary
stats and per-category AP, x100 with 3 decimals) is compared. Panoptic PQ runs panopticapi's
``pq_compute`` (what ``COCOPanopticEvaluator`` calls) on the shapes panoptic validation set.
Semantic evaluation (``--semantic NxHxWxC``) times detectron2's ``SemSegEvaluator`` beside
d2seg's ``SemSegMetricsEvaluator`` against d2seg's one-pass ``SemSegEvaluator``.

    python benchmarks/eval_speed.py                                  # shapes val, 3000 preds
    python benchmarks/eval_speed.py --synthetic 20000
    python benchmarks/eval_speed.py --gt instances.json --results coco_instances_results.json

Predictions: ``--results`` (a COCO results json, e.g. ``coco_instances_results.json`` written by
an evaluation) or ``--synthetic N``: N detections made from the ground truth (shifted and
dilated masks, some with the wrong class, plus random false positives, random scores).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def synthetic_predictions(coco_gt, n: int, seed: int = 0) -> List[Dict]:
    """About ``n`` detections with RLE masks and boxes derived from ``coco_gt``'s annotations."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    anns = list(coco_gt.anns.values())
    cats = sorted(coco_gt.getCatIds())
    out = []
    while len(out) < n:
        a = anns[int(rng.integers(len(anns)))]
        img = coco_gt.imgs[a["image_id"]]
        h, w = img["height"], img["width"]
        if rng.random() < 0.8:
            m = coco_gt.annToMask(a)
            m = np.roll(m, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1))
            if rng.random() < 0.3:
                m = np.maximum(m, np.roll(m, 2, axis=0))
            cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
        else:  # a false positive: a random rectangle
            m = np.zeros((h, w), np.uint8)
            y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            m[y0:y0 + int(rng.integers(4, h // 3)), x0:x0 + int(rng.integers(4, w // 3))] = 1
            cat = int(rng.choice(cats))
        if not m.any():
            continue
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": a["image_id"], "category_id": cat,
                    "bbox": [float(x) for x in mask_util.toBbox(rle)],
                    "score": float(rng.random()), "segmentation": rle})
    return out


def printed_numbers(coco_eval, iou_type: str, class_names: List[str]) -> Dict[str, float]:
    """What detectron2's COCOEvaluator reports (its ``_derive_coco_results``), rounded as printed."""
    from detectron2.evaluation import COCOEvaluator

    quiet = COCOEvaluator.__new__(COCOEvaluator)
    import logging

    quiet._logger = logging.getLogger("eval_speed_quiet")
    quiet._logger.disabled = True
    res = COCOEvaluator._derive_coco_results(quiet, coco_eval, iou_type, class_names)
    stats = {f"stat{i}": round(float(s) * 100, 3) for i, s in enumerate(coco_eval.stats[:12])}
    return {**{k: round(float(v), 3) for k, v in res.items()}, **stats}


def time_instances(gt_file: str, results: List[Dict], repeats: int) -> Dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco

    from d2seg.evaluation.coco_backend import _faster_cocoeval_class, faster_coco_eval_available

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_file)
    names = [c["name"] for c in coco_gt.loadCats(sorted(coco_gt.getCatIds()))]
    impls = {"pycocotools": COCOeval}
    if faster_coco_eval_available():
        impls["faster_coco_eval"] = _faster_cocoeval_class()
    out: Dict = {"num_predictions": len(results), "num_images": len(coco_gt.imgs),
                 "num_gt_instances": len(coco_gt.anns)}
    for iou_type in ("bbox", "segm"):
        numbers, seconds = {}, {}
        for name, fn in impls.items():
            times = []
            for _ in range(repeats):
                res = copy.deepcopy(results)  # pycocotools' loadRes mutates its input
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    ev = _evaluate_predictions_on_coco(coco_gt, res, iou_type, cocoeval_fn=fn)
                times.append(time.perf_counter() - t0)
            seconds[name] = round(min(times), 3)
            numbers[name] = printed_numbers(ev, iou_type, names)
        row = {"seconds": seconds, "AP": numbers["pycocotools"]["AP"]}
        if "faster_coco_eval" in numbers:
            a, b = numbers["pycocotools"], numbers["faster_coco_eval"]
            row["mismatches"] = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)
                                 and not (np.isnan(a[k]) and np.isnan(b.get(k, np.nan)))}
            row["numbers_compared"] = len(a)
            row["speedup"] = round(seconds["pycocotools"] / seconds["faster_coco_eval"], 2)
        out[iou_type] = row
    return out


def time_panoptic(dataset: str, workdir: str) -> Dict:
    """pq_compute on a panoptic dataset with predictions = ground truth with every third
    segment dropped (so matching does real work)."""
    from detectron2.data import MetadataCatalog
    from PIL import Image
    from panopticapi.evaluation import pq_compute

    from d2seg.data.catalogs import prepare_dataset

    prepare_dataset(dataset)
    meta = MetadataCatalog.get(dataset)
    with open(meta.panoptic_json) as f:
        gt = json.load(f)
    pred_dir = os.path.join(workdir, "pred")
    os.makedirs(pred_dir, exist_ok=True)
    anns = []
    for ann in gt["annotations"]:
        png = np.asarray(Image.open(os.path.join(meta.panoptic_root, ann["file_name"])),
                         dtype=np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        keep = ann["segments_info"][::3] + ann["segments_info"][1::3]
        dropped = {s["id"] for s in ann["segments_info"][2::3]}
        ids[np.isin(ids, list(dropped))] = 0
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(pred_dir, ann["file_name"]))
        anns.append({**ann, "segments_info": keep})
    pred_json = os.path.join(workdir, "pred.json")
    with open(pred_json, "w") as f:
        json.dump({**gt, "annotations": anns}, f)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        res = pq_compute(meta.panoptic_json, pred_json, gt_folder=meta.panoptic_root,
                         pred_folder=pred_dir)
    return {"dataset": dataset, "num_images": len(anns), "seconds": round(time.perf_counter() - t0, 3),
            "PQ": round(100 * res["All"]["pq"], 3), "workers": os.cpu_count()}


def time_semantic(n: int, h: int, w: int, classes: int, workdir: str, repeats: int) -> Dict:
    """Semantic evaluation per image: detectron2's ``SemSegEvaluator`` beside d2seg's
    ``SemSegMetricsEvaluator`` (each reading the label maps and taking the argmax itself, as
    train_net ran them before session 27) against d2seg's one-pass ``SemSegEvaluator`` feeding
    the same metrics; blocky random label maps (ignore pixels included) and random scores.
    The results must be identical."""
    import math

    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator
    from PIL import Image

    from d2seg.engine.trainer import load_sem_seg_gt
    from d2seg.evaluation import SemSegEvaluator, SemSegMetricsEvaluator
    from d2seg.modeling.postprocessing import pixel_major

    rng = np.random.default_rng(0)
    dicts = []
    for i in range(n):
        g = rng.integers(0, classes, (h // 32 + 1, w // 32 + 1)).repeat(32, 0).repeat(32, 1)
        g = g[:h, :w].astype(np.uint8)
        g[rng.random((h, w)) < 0.02] = 255
        path = os.path.join(workdir, f"{i}.png")
        Image.fromarray(g).save(path)
        dicts.append({"file_name": f"img{i}.jpg", "sem_seg_file_name": path,
                      "height": h, "width": w})
    name = "eval_speed_semantic"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=[f"c{c}" for c in range(classes)],
                                  ignore_label=255)
    # stored with the classes innermost, as d2seg's models return CPU scores (pixel_major;
    # detectron2's argmax(0) over a (K, H, W)-contiguous map is several times slower)
    scores = [pixel_major(torch.nn.functional.interpolate(
        torch.randn(1, classes, h // 4, w // 4), (h, w), mode="bilinear")[0])
        for _ in range(min(n, 4))]

    def run(evaluators) -> tuple:
        best, res = float("inf"), {}
        for _ in range(repeats):
            for ev in evaluators:
                ev.reset()
            t0 = time.perf_counter()
            for i, d in enumerate(dicts):
                for ev in evaluators:
                    ev.process([{"file_name": d["file_name"]}], [{"sem_seg": scores[i % 4]}])
            res = {}
            for ev in evaluators:
                res.update(ev.evaluate())
            best = min(best, time.perf_counter() - t0)
        return best, res

    reference = D2SemSegEvaluator(name, distributed=False, sem_seg_loading_fn=load_sem_seg_gt)
    # d2seg leaves out detectron2's multi-class boundary IoU (not per class; d2seg's metrics
    # have a per-class one): the reference runs without it too, so both compute the same
    reference._compute_boundary_iou = False
    two, res_two = run([reference, SemSegMetricsEvaluator(name, distributed=False)])
    one, res_one = run([SemSegEvaluator(name, distributed=False, metrics=SemSegMetricsEvaluator(
        name, distributed=False))])
    same = all(k in res_one and all(
        (math.isnan(v) and math.isnan(res_one[k][m])) or v == res_one[k][m]
        for m, v in res_two[k].items()) for k in res_two)
    return {"images": n, "size": [h, w], "classes": classes,
            "ms_per_image_detectron2_plus_metrics": round(1e3 * two / n, 1),
            "ms_per_image_one_pass": round(1e3 * one / n, 1),
            "speedup": round(two / one, 2), "results_identical": bool(same),
            "mIoU": round(float(res_one["sem_seg"]["mIoU"]), 3)}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", default="", help="COCO instances json (default: shapes_instance_val)")
    ap.add_argument("--results", default="", help="COCO results json to evaluate")
    ap.add_argument("--synthetic", type=int, default=3000,
                    help="number of synthetic predictions when --results is not given")
    ap.add_argument("--repeats", type=int, default=2, help="timings are the best of this many")
    ap.add_argument("--panoptic", default="shapes_panoptic_val",
                    help="panoptic dataset to time PQ on ('' to skip)")
    ap.add_argument("--semantic", default="40x512x512x19", metavar="NxHxWxC",
                    help="semantic evaluation: N label maps of HxW with C classes ('' to skip)")
    ap.add_argument("--out", default="", help="JSON file to write")
    args = ap.parse_args(argv)

    import d2seg  # noqa: F401  (registers the shapes datasets)
    from detectron2.data import MetadataCatalog

    from d2seg.data.catalogs import prepare_dataset

    gt_file = args.gt
    if not gt_file:
        prepare_dataset("shapes_instance_val")
        gt_file = MetadataCatalog.get("shapes_instance_val").json_file
    if args.results:
        with open(args.results) as f:
            results = json.load(f)
    else:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            results = synthetic_predictions(COCO(gt_file), args.synthetic)
    report = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "gt": gt_file, "results": args.results or f"synthetic ({args.synthetic})",
              "instances": time_instances(gt_file, results, args.repeats)}
    if args.panoptic:
        with tempfile.TemporaryDirectory() as tmp:
            report["panoptic"] = time_panoptic(args.panoptic, tmp)
    if args.semantic:
        n, h, w, c = (int(x) for x in args.semantic.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            report["semantic"] = time_semantic(n, h, w, c, tmp, args.repeats)
    inst = report["instances"]
    print(f"{inst['num_predictions']} predictions on {inst['num_images']} images "
          f"({inst['num_gt_instances']} ground-truth instances), {report['machine']}")
    print("| task | pycocotools | faster-coco-eval | speed-up | numbers identical |")
    print("|---|---|---|---|---|")
    for t in ("bbox", "segm"):
        r = inst[t]
        fast = r["seconds"].get("faster_coco_eval")
        same = (f"{r['numbers_compared'] - len(r['mismatches'])}/{r['numbers_compared']}"
                if fast is not None else "n/a")
        print(f"| {t} (AP {r['AP']:.3f}) | {r['seconds']['pycocotools']:.2f} s | "
              f"{'%.2f s' % fast if fast is not None else 'not installed'} | "
              f"{r.get('speedup', '')} | {same} |")
    if "panoptic" in report:
        p = report["panoptic"]
        print(f"PQ ({p['dataset']}, {p['num_images']} images): {p['seconds']:.2f} s, "
              f"PQ {p['PQ']:.3f}")
    if "semantic" in report:
        s = report["semantic"]
        print(f"semantic ({s['images']} images {s['size'][0]}x{s['size'][1]}, {s['classes']} "
              f"classes): detectron2's SemSegEvaluator + SemSegMetricsEvaluator "
              f"{s['ms_per_image_detectron2_plus_metrics']} ms/image, d2seg's one pass "
              f"{s['ms_per_image_one_pass']} ms/image ({s['speedup']}x), results identical: "
              f"{s['results_identical']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
