"""PQ through the panopticapi that detectron2's COCOPanopticEvaluator imports (installed from
PyPI as ``panopticapi-lite``), checked against the published definition on real COCO panoptic
ground truth (../shared/data/coco_panoptic_sample):

    PQ_c = sum_{matched (IoU > 0.5)} IoU / (TP + FP/2 + FN/2),   PQ = mean over categories
    that have at least one TP, FP or FN (crowd regions neither match nor count as FN).
"""
import copy
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

panoptic_eval = pytest.importorskip("panopticapi.evaluation")


def _ids(png):
    rgb = np.asarray(Image.open(png)).astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _save_ids(ids, png):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(png)


@pytest.fixture()
def sample(shared_data, tmp_path):
    root = os.path.join(shared_data, "coco_panoptic_sample")
    gt_json = os.path.join(root, "panoptic_examples.json")
    gt_dir = os.path.join(root, "panoptic_examples")
    gt = json.load(open(gt_json))
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_dir, pred_dir)
    pred = {"annotations": copy.deepcopy(gt["annotations"])}

    def evaluate():
        pj = tmp_path / "pred.json"
        pj.write_text(json.dumps(pred))
        res = panoptic_eval.pq_compute(gt_json, str(pj), gt_dir, str(pred_dir))
        return res["All"]["pq"] * 100

    # per category: number of non-crowd GT segments
    n_c = Counter(s["category_id"] for a in gt["annotations"] for s in a["segments_info"]
                  if not s["iscrowd"])
    return gt, pred, pred_dir, evaluate, n_c


def _pick(gt, n_c, min_count=2):
    """First non-crowd segment of a category that has >= min_count segments."""
    for a in gt["annotations"]:
        for s in a["segments_info"]:
            if not s["iscrowd"] and n_c[s["category_id"]] >= min_count:
                return a, s
    raise AssertionError("no segment to perturb")


def test_ground_truth_as_prediction_is_100(sample):
    *_, evaluate, _ = sample
    assert evaluate() == pytest.approx(100.0)


def test_missing_segment(sample):
    gt, pred, pred_dir, evaluate, n_c = sample
    a, s = _pick(gt, n_c)
    png = pred_dir / a["file_name"]
    ids = _ids(png)
    ids[ids == s["id"]] = 0  # VOID
    _save_ids(ids, png)
    p = next(x for x in pred["annotations"] if x["image_id"] == a["image_id"])
    p["segments_info"] = [x for x in p["segments_info"] if x["id"] != s["id"]]
    n, N = n_c[s["category_id"]], len(n_c)
    # the category loses one TP to one FN
    expected = 100 * ((N - 1) + (n - 1) / ((n - 1) + 0.5)) / N
    assert evaluate() == pytest.approx(expected, abs=1e-9)
    assert expected < 100


@pytest.mark.parametrize("keep", [0.75, 0.4])
def test_shrunk_segment(sample, keep):
    gt, pred, pred_dir, evaluate, n_c = sample
    a, s = _pick(gt, n_c)
    png = pred_dir / a["file_name"]
    ids = _ids(png)
    ys, xs = np.nonzero(ids == s["id"])
    k = int(round(len(ys) * (1 - keep)))
    ids[ys[:k], xs[:k]] = 0  # first k pixels in raster order become VOID
    _save_ids(ids, png)
    n, N = n_c[s["category_id"]], len(n_c)
    iou = (len(ys) - k) / s["area"]  # intersection = what is left; union = the GT segment
    if iou > 0.5:  # still a match: contributes its IoU
        pq_c = ((n - 1) + iou) / n
    else:  # no match: one FN and one FP
        pq_c = (n - 1) / ((n - 1) + 0.5 + 0.5)
    expected = 100 * ((N - 1) + pq_c) / N
    assert evaluate() == pytest.approx(expected, abs=1e-9)


def test_wrong_category(sample):
    gt, pred, pred_dir, evaluate, n_c = sample
    a, s = _pick(gt, n_c)
    absent = next(c["id"] for c in gt["categories"] if c["id"] not in n_c and c["isthing"])
    p = next(x for x in pred["annotations"] if x["image_id"] == a["image_id"])
    next(x for x in p["segments_info"] if x["id"] == s["id"])["category_id"] = absent
    n, N = n_c[s["category_id"]], len(n_c)
    # true category: one FN; the wrong one enters the average with one FP and PQ 0
    expected = 100 * ((N - 1) + (n - 1) / ((n - 1) + 0.5) + 0.0) / (N + 1)
    assert evaluate() == pytest.approx(expected, abs=1e-9)
