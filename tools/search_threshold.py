#!/usr/bin/env python
"""Search the foreground threshold that maximises Dice on a validation set (binary problems).

    python tools/search_threshold.py \\
        --config-file configs/ISBI-SemanticSegmentation/unet_cpu.yaml \\
        MODEL.WEIGHTS output/isbi_unet_cpu/model_final.pth
    python tools/search_threshold.py --config-file CFG --dataset isbi2012_membrane_val \\
        --thresholds 0.2:0.8:0.02 --min-area 30 --output thr.json MODEL.WEIGHTS W.pth

Runs the model as ``tools/predict.py`` runs it (post-processing off; the test-time views of
``D2SEG.INFERENCE``: sliding windows, flips, rotations, scales, averaged) on ``--dataset``
(default: the first of ``DATASETS.TEST``), takes the foreground probability (sigmoid of a one-channel model, softmax
of class 1 for two classes), and scores each threshold by the Dice pooled over all valid
pixels, optionally after the mask post-processing (``--open``, ``--close``, ``--min-area``,
``--keep-largest``). Prints the table and the config options that apply the best threshold.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401  (registers datasets and models)


def parse_thresholds(spec: str) -> List[float]:
    """"a:b:step" (inclusive) or "t1,t2,..." -> the thresholds, each in [0, 1]. A spec that is
    neither raises ValueError naming ``--thresholds`` and the value."""
    how = "expected start:stop:step (e.g. 0.05:0.95:0.05) or a comma-separated list"
    is_range = ":" in spec
    try:
        values = [float(x) for x in spec.split(":" if is_range else ",")]
    except ValueError:
        raise ValueError(f"--thresholds '{spec}': {how}") from None
    if is_range:
        if len(values) != 3:
            raise ValueError(f"--thresholds '{spec}': {how}")
        a, b, step = values
        if not step > 0 or a > b:
            raise ValueError(f"--thresholds '{spec}': need start <= stop and step > 0")
        out = [round(float(t), 6) for t in np.arange(a, b + step / 2, step)]
    else:
        out = values
    bad = [t for t in out if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"--thresholds '{spec}': foreground probabilities lie in [0, 1], got "
                         f"{bad[0]:g}")
    return out


def collect(cfg, dataset: str):
    """(foreground probabilities, ground-truth label maps, ignore label) over ``dataset``."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2seg.data.build import build_test_loader
    from d2seg.data.image_io import read_sem_seg
    from d2seg.inference import build_inference_model
    from d2seg.modeling.postprocessing import foreground_probability

    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES > 2:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: "
                         "the threshold search is for binary problems (1 or 2 classes)")
    # the model as tools/predict.py runs it (fast paths, INFERENCE_AMP, the test-time views of
    # D2SEG.INFERENCE: sliding windows, flips, rotations, scales): the threshold then applies
    # to the averaged logits it applies to there
    model = build_inference_model(cfg)
    inf = cfg.D2SEG.INFERENCE
    if min(inf.SLIDING_WINDOW.SIZE) > 0 or inf.FLIP or inf.ROT90 or tuple(inf.SCALES) != (1.0,):
        from d2seg.inference import SemanticSegmentorWithTTA

        model = SemanticSegmentorWithTTA(  # as SegPredictor (tools/predict.py) builds it
            model, flip=bool(inf.FLIP), rot90=bool(inf.ROT90),
            window=tuple(inf.SLIDING_WINDOW.SIZE), overlap=float(inf.SLIDING_WINDOW.OVERLAP),
            scales=tuple(inf.SCALES)).eval()
    gt_files = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(dataset)}
    probs, gts = [], []
    with torch.no_grad():
        for inputs in build_test_loader(cfg, dataset):
            for inp, out in zip(inputs, model(inputs)):
                logits = out.get("sem_seg_logits", out["sem_seg"])
                probs.append(foreground_probability(logits).cpu().numpy())
                gts.append(read_sem_seg(gt_files[inp["file_name"]]))
    return probs, gts, getattr(MetadataCatalog.get(dataset), "ignore_label", 255)


def run(cfg, dataset: str, thresholds: Sequence[float],
        postprocess_kwargs: Optional[Dict] = None) -> Dict:
    from d2seg.modeling.postprocessing import postprocess_mask, search_threshold

    probs, gts, ignore = collect(cfg, dataset)
    post = None
    if postprocess_kwargs and any(postprocess_kwargs.values()):
        post = functools.partial(postprocess_mask, **postprocess_kwargs)
    res = search_threshold(probs, gts, thresholds, ignore_label=ignore, postprocess=post)
    res.update(dataset=dataset, num_images=len(probs), postprocess=postprocess_kwargs or {})
    return res


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--dataset", default="", help="default: the first of DATASETS.TEST")
    ap.add_argument("--thresholds", default="0.05:0.95:0.05", help="a:b:step or t1,t2,...")
    ap.add_argument("--open", type=int, default=0, help="opening kernel (odd; 0 = off)")
    ap.add_argument("--close", type=int, default=0, help="closing kernel (odd; 0 = off)")
    ap.add_argument("--min-area", type=int, default=0, help="remove regions below N pixels")
    ap.add_argument("--keep-largest", action="store_true")
    ap.add_argument("--output", default="", help="write the result as JSON here")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    try:
        thresholds = parse_thresholds(args.thresholds)
    except ValueError as e:
        ap.error(str(e))
    for name in ("open", "close"):
        k = getattr(args, name)
        if k < 0 or (k and k % 2 == 0):
            ap.error(f"--{name} {k}: a kernel size is odd (or 0 = off)")
    if args.min_area < 0:
        ap.error(f"--min-area {args.min_area}: must be >= 0")
    if args.output:
        from d2seg.utils.files import writable_dir_problem

        problem = f"'{args.output}' is a folder, not a file" if os.path.isdir(args.output) else \
            writable_dir_problem(os.path.dirname(os.path.abspath(args.output)))
        if problem:
            ap.error(f"--output: {problem}")

    from d2seg.config import load_config_or_exit
    from d2seg.data.catalogs import register_shapes_from_cfg
    from d2seg.data.register import register_datasets_from_cfg
    from d2seg.inference import cpu_fallback

    cfg = load_config_or_exit(args.config_file, args.opts, "search_threshold.py",
                              () if args.dataset else ("DATASETS.TEST",))
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES > 2:
        sys.exit(f"search_threshold.py: error: {args.config_file} (or the command line): "
                 f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: the "
                 f"threshold search is for binary problems (NUM_CLASSES 1 or 2)")
    cfg = cpu_fallback(cfg, "searching")
    cfg.MODEL.SEM_SEG_POSTPROCESS.ENABLED = False  # raw probabilities
    register_shapes_from_cfg(cfg)
    register_datasets_from_cfg(cfg)  # D2SEG.DATASETS.REGISTER (your own data)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    if not dataset:
        ap.error("no --dataset and DATASETS.TEST is empty")
    from detectron2.data import DatasetCatalog

    from d2seg.data.register import not_registered

    if dataset not in DatasetCatalog.list():
        ap.error(f"--dataset: {not_registered(dataset, DatasetCatalog.list())}")
    post = dict(open_kernel=args.open, close_kernel=args.close, min_area=args.min_area,
                keep_largest=args.keep_largest)
    from d2seg.engine.train_loop import USER_ERRORS

    try:
        res = run(cfg, dataset, thresholds, post)
    except USER_ERRORS as e:  # MODEL.WEIGHTS that do not fit, unreadable data: one line
        sys.exit(f"search_threshold.py: error: {e}")
    print(f"{dataset}: {res['num_images']} images; Dice (pooled) per threshold:")
    for t, d in res["scores"]:
        mark = "  <- best" if t == res["threshold"] else ""
        print(f"  {t:.3f}  {100 * d:6.2f}{mark}")
    opts = ["MODEL.SEM_SEG_POSTPROCESS.ENABLED True",
            f"MODEL.SEM_SEG_POSTPROCESS.THRESHOLD {res['threshold']}"]
    for key, val in (("OPEN_KERNEL", args.open), ("CLOSE_KERNEL", args.close),
                     ("MIN_AREA", args.min_area), ("KEEP_LARGEST", args.keep_largest)):
        if val:
            opts.append(f"MODEL.SEM_SEG_POSTPROCESS.{key} {val}")
    print("apply with: " + " ".join(opts))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
