"""Metric values on hand-made masks, numpy and torch, including the empty cases."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from d2seg.metrics import (
    boundary_iou,
    boundary_mask,
    confusion_matrix,
    dice,
    iou,
    mean_dice,
    mean_iou,
    per_class_dice,
    per_class_iou,
    pixel_accuracy,
    segmentation_metrics,
)


def masks():
    p = np.zeros((4, 4), np.uint8)
    g = np.zeros((4, 4), np.uint8)
    p[0, 0:4] = 1  # 4 predicted pixels
    g[0, 1:4] = 1
    g[1, 0:3] = 1  # 6 true pixels, 3 shared
    return p, g


@pytest.mark.parametrize("to", [np.asarray, torch.from_numpy, lambda a: a.astype(bool),
                                lambda a: torch.from_numpy(a).float()])
def test_iou_dice_values(to):
    p, g = masks()
    assert iou(to(p), to(g)) == pytest.approx(3 / 7)
    assert dice(to(p), to(g)) == pytest.approx(6 / 10)
    assert iou(to(g), to(g)) == 1.0 and dice(to(p), to(p)) == 1.0


def test_empty_cases():
    z = np.zeros((3, 3), bool)
    one = z.copy()
    one[1, 1] = True
    # both empty: empty_score (default 1)
    assert iou(z, z) == 1.0 and dice(z, z) == 1.0
    assert iou(z, z, empty_score=0.0) == 0.0 and dice(torch.tensor(z), torch.tensor(z),
                                                      empty_score=math.nan) != 0.0
    # prediction empty, target not; and the reverse
    assert iou(z, one) == 0.0 and dice(z, one) == 0.0
    assert iou(one, z) == 0.0 and dice(torch.tensor(one), torch.tensor(z)) == 0.0


def test_per_image_scores():
    p, g = masks()
    z = np.zeros_like(p)
    pp, gg = np.stack([p, z, z]), np.stack([g, z, g])
    np.testing.assert_allclose(iou(pp, gg, per_image=True), [3 / 7, 1.0, 0.0])
    got = dice(torch.from_numpy(pp), torch.from_numpy(gg), per_image=True)
    np.testing.assert_allclose(got.numpy(), [0.6, 1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        iou(p, g[:3])


def test_confusion_matrix_and_derived_metrics():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 3]])
    cm = confusion_matrix(pred, gt, num_classes=4, ignore_label=255)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 2
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    expected[2, 0] = 1
    np.testing.assert_array_equal(cm, expected)
    ious = per_class_iou(cm)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: 2/3; class 2: 1/2; class 3: neither -> NaN
    np.testing.assert_allclose(ious[:3], [0.5, 2 / 3, 0.5])
    assert math.isnan(ious[3])
    dices = per_class_dice(cm)
    np.testing.assert_allclose(dices[:3], [4 / 6, 4 / 5, 2 / 3])
    assert mean_iou(cm) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert mean_dice(cm) == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)
    # torch inputs give the same matrix
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(pred), torch.tensor(gt), 4), cm)


def test_class_predicted_but_absent_scores_zero_and_no_valid_pixels():
    gt = np.zeros((2, 2), int)
    pred = np.array([[0, 1], [0, 0]])
    cm = confusion_matrix(pred, gt, 3)
    assert per_class_iou(cm)[1] == 0.0 and per_class_dice(cm)[1] == 0.0
    assert math.isnan(per_class_iou(cm)[2])
    assert mean_iou(cm) == pytest.approx((3 / 4 + 0.0) / 2)
    empty = confusion_matrix(pred, np.full((2, 2), 255), 3)
    assert empty.sum() == 0 and math.isnan(pixel_accuracy(empty)) and math.isnan(mean_iou(empty))
    with pytest.raises(ValueError, match="predicted label outside"):
        confusion_matrix(np.full((2, 2), 5), gt, 3)


def test_segmentation_metrics_names():
    cm = np.array([[3, 1], [0, 4]])
    m = segmentation_metrics(cm, ["cell", "membrane"])
    assert m["IoU-membrane"] == pytest.approx(4 / 5) and m["Dice-cell"] == pytest.approx(6 / 7)
    assert m["pACC"] == pytest.approx(7 / 8)


def square(top, left, size=10, shape=(20, 20)):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def test_boundary_iou_hand_made():
    a = square(2, 2)
    assert boundary_mask(a, 1).sum() == 36  # the 1-pixel ring of a 10x10 square
    assert boundary_iou(a, a) == 1.0
    # shifted right by one pixel: rings share 9 + 9 pixels of the top and bottom rows
    assert boundary_iou(a, square(2, 3)) == pytest.approx(18 / 54)
    assert boundary_iou(a, np.zeros_like(a)) == 0.0
    assert boundary_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    # a mask thinner than the boundary width is all boundary: BIoU = IoU
    thin_p, thin_g = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    thin_p[5, 2:12], thin_g[5, 4:14] = True, True
    assert boundary_iou(thin_p, thin_g) == pytest.approx(iou(thin_p, thin_g))


def _register(name, tmp_path, gts, classes, ignore_label=255):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = []
    for i, g in enumerate(gts):
        f = tmp_path / f"{name}_{i}.png"
        Image.fromarray(np.asarray(g, np.uint8)).save(f)
        dicts.append({"file_name": f"img_{name}_{i}.png", "sem_seg_file_name": str(f),
                      "height": g.shape[0], "width": g.shape[1]})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=classes, ignore_label=ignore_label,
                                  evaluator_type="sem_seg")
    return dicts


def _onehot_logits(label, c):
    return torch.nn.functional.one_hot(torch.as_tensor(label), c).permute(2, 0, 1).float()


@pytest.mark.parametrize("distributed", [False, True])
def test_evaluator_pools_over_images(tmp_path, distributed):
    from d2seg.evaluation import SemSegMetricsEvaluator

    g1 = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    g2 = np.array([[0, 0, 0, 0], [0, 0, 0, 0]])
    p1 = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    p2 = np.array([[0, 0, 0, 0], [0, 0, 0, 1]])
    dicts = _register("d2seg_test_metrics_eval", tmp_path, [g1, g2], ["bg", "fg", "unused"])
    ev = SemSegMetricsEvaluator("d2seg_test_metrics_eval", distributed=distributed,
                                output_dir=str(tmp_path / "out"))
    ev.reset()
    ev.process([{"file_name": d["file_name"]} for d in dicts],
               [{"sem_seg": _onehot_logits(p, 3)} for p in (p1, p2)])
    res = ev.evaluate()["sem_seg_metrics"]
    # pooled: class 1 TP = 2 (g1), FP = 1 (g1) + 1 (g2), FN = 1 (g1) -> IoU 2/5, Dice 4/7
    # class 0: TP = 3 + 7 = 10, FP = 1, FN = 1 + 1 -> IoU 10/13, Dice 20/23
    assert res["IoU-fg"] == pytest.approx(100 * 2 / 5)
    assert res["Dice-fg"] == pytest.approx(100 * 4 / 7)
    assert res["IoU-bg"] == pytest.approx(100 * 10 / 13)
    assert res["Dice-bg"] == pytest.approx(100 * 20 / 23)
    assert math.isnan(res["IoU-unused"]) and math.isnan(res["Dice-unused"])
    assert res["mIoU"] == pytest.approx(100 * (2 / 5 + 10 / 13) / 2)
    assert res["mDice"] == pytest.approx(100 * (4 / 7 + 20 / 23) / 2)
    assert res["pACC"] == pytest.approx(100 * 12 / 15)
    assert all(isinstance(v, float) for v in res.values())
    # mBIoU: the mean over the classes that occur, the absent one (NaN) left out
    assert math.isnan(res["BIoU-unused"])
    assert res["mBIoU"] == pytest.approx((res["BIoU-bg"] + res["BIoU-fg"]) / 2)
    # strict JSON (no NaN token): the class absent from both is null
    written = json.loads((tmp_path / "out" / "sem_seg_metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert written["IoU-unused"] is None and written["IoU-fg"] == pytest.approx(100 * 2 / 5)
    # per image (valid pixels only): image 1 Dice bg 6/8, fg 4/6; image 2 bg 14/15, fg 0 (one
    # false positive pixel, no foreground), "unused" neither present nor predicted: left out
    img = [(6 / 8 + 4 / 6) / 2, (14 / 15 + 0) / 2]
    assert res["mDiceImg"] == pytest.approx(100 * sum(img) / 2)
    assert res["mDiceImgSD"] == pytest.approx(100 * abs(img[0] - img[1]) / math.sqrt(2))
    assert res["DiceImg-fg"] == pytest.approx(100 * (4 / 6 + 0) / 2)
    assert res["DiceImg-bg"] == pytest.approx(100 * (6 / 8 + 14 / 15) / 2)
    assert math.isnan(res["DiceImg-unused"])
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "sem_seg_per_image.csv")))
    assert [r["file_name"] for r in rows] == [d["file_name"] for d in dicts]
    assert float(rows[0]["Dice-fg"]) == pytest.approx(100 * 4 / 6, abs=1e-4)
    assert float(rows[1]["IoU-bg"]) == pytest.approx(100 * 7 / 8, abs=1e-4)
    assert rows[1]["Dice-unused"] == "" and float(rows[1]["Dice-fg"]) == 0.0
    # detectron2's print_csv_format accepts the flat dict
    from detectron2.evaluation import print_csv_format

    print_csv_format({"sem_seg_metrics": res})


def test_evaluator_ignores_the_metadata_ignore_label_everywhere(tmp_path):
    """Pixels labelled with the dataset's ``ignore_label`` (here 2, inside [0, C)) count
    nowhere: not in IoU, pixel accuracy or Boundary IoU, whatever is predicted there."""
    from d2seg.evaluation import SemSegMetricsEvaluator

    g = np.zeros((24, 24), np.uint8)
    g[4:14, 4:14] = 1
    g[16:22, 2:22] = 2  # ignored band
    p = np.where(g == 2, 1, g).astype(np.int64)  # right except in the ignored band
    p[18, 5:9] = 0
    dicts = _register("d2seg_test_metrics_ign", tmp_path, [g], ["bg", "fg", "other"],
                      ignore_label=2)
    ev = SemSegMetricsEvaluator("d2seg_test_metrics_ign")
    ev.reset()
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": _onehot_logits(p, 3)}])
    res = ev.evaluate()["sem_seg_metrics"]
    assert res["IoU-bg"] == res["IoU-fg"] == res["pACC"] == 100.0
    assert res["BIoU-bg"] == res["BIoU-fg"] == res["mBIoU"] == 100.0
    # the same pixels counted when nothing is ignored: the band predicted as fg is wrong
    ev = SemSegMetricsEvaluator("d2seg_test_metrics_ign", ignore_label=255)
    ev.reset()
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": _onehot_logits(p, 3)}])
    assert ev.evaluate()["sem_seg_metrics"]["pACC"] < 100.0


def test_confusion_matrix_ignore_label_inside_the_class_range():
    g = np.array([[0, 1, 2], [0, 2, 1]])
    p = np.array([[1, 1, 2], [2, 0, 1]])
    cm = confusion_matrix(p, g, 3, ignore_label=0)
    assert cm[0].sum() == 0
    assert cm.tolist() == [[0, 0, 0], [0, 2, 0], [1, 0, 1]]


def test_torch_masks_nonzero_foreground_empty_score_and_per_image_shape():
    """Torch masks: any non-zero (also negative) is foreground, empty_score is honoured, and
    per_image needs a batch dimension."""
    p = torch.tensor([[-1, 0], [2, 0]])
    g = torch.tensor([[1, 0], [1, 1]])
    assert iou(p, g) == pytest.approx(2 / 3)
    z = torch.zeros(2, 2)
    assert iou(z, z, empty_score=0.0) == 0.0 and dice(z, z, empty_score=0.25) == 0.25
    with pytest.raises(ValueError, match="per_image=True needs"):
        iou(np.zeros((3, 3)), np.zeros((3, 3)), per_image=True)


def test_confusion_matrix_skips_out_of_range_targets_and_rejects_negative_predictions():
    """Targets outside [0, C) are skipped (also with ignore_label None); a negative
    prediction on a valid pixel raises."""
    g = np.array([0, 1, 3, -1, 1])
    p = np.array([0, 1, 2, 2, 0])
    cm = confusion_matrix(p, g, 3, ignore_label=None)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="predicted label outside"):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)


def test_boundary_at_the_image_border_rounded_width_and_empty_score():
    """The image border counts as background, the width is the rounded ratio x diagonal, and
    boundary_iou returns empty_score for two empty masks."""
    from d2seg.metrics import boundary_counts

    full = np.ones((5, 5), bool)
    assert boundary_mask(full, 1).sum() == 16  # the outer ring
    # 48x64: diagonal 80, 0.02 x 80 = 1.6 -> 2 pixels
    a = np.zeros((48, 64), bool)
    a[10:30, 10:40] = True
    inter, union = boundary_counts(a, a, dilation_ratio=0.02)
    assert inter == union == int(boundary_mask(a, 2).sum()) != int(boundary_mask(a, 1).sum())
    z = np.zeros((4, 4), bool)
    assert boundary_iou(z, z, empty_score=0.0) == 0.0


def test_evaluator_boundary_width_on_wide_images_and_predicted_only_classes(tmp_path):
    """Evaluator: the boundary width uses the image's own diagonal (a wide image), a class
    only predicted scores BIoU 0 (not NaN), and class names fall back to indices when
    num_classes differs from the metadata's."""
    from d2seg.evaluation import SemSegMetricsEvaluator
    from d2seg.metrics import boundary_counts

    g = np.zeros((10, 60), np.uint8)
    g[2:9, 5:50] = 1
    p = g.astype(np.int64).copy()
    p[3:8, 8:20] = 0
    p[0, 55:58] = 2  # class 2 predicted, never present
    dicts = _register("d2seg_test_metrics_wide", tmp_path, [g], ["bg", "fg", "x"])
    ev = SemSegMetricsEvaluator("d2seg_test_metrics_wide", distributed=False,
                                boundary_dilation_ratio=0.05)
    ev.reset()
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": _onehot_logits(p, 3)}])
    res = ev.evaluate()["sem_seg_metrics"]
    inter, union = boundary_counts(p == 1, g == 1, dilation_ratio=0.05)
    assert res["BIoU-fg"] == pytest.approx(100 * inter / union)
    assert res["BIoU-x"] == 0.0 and res["IoU-x"] == 0.0
    ev4 = SemSegMetricsEvaluator("d2seg_test_metrics_wide", distributed=False, num_classes=4)
    ev4.reset()
    ev4.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": _onehot_logits(p, 4)}])
    assert "IoU-3" in ev4.evaluate()["sem_seg_metrics"]


def test_evaluator_reads_the_input_gt_path_and_returns_empty_without_images(tmp_path):
    """The input's own sem_seg_file_name wins, a grey label map saved as RGB is read as its
    ids, and evaluate() without any image returns {}."""
    from d2seg.evaluation import SemSegMetricsEvaluator

    g = np.array([[0, 1], [1, 1]], np.uint8)
    dicts = _register("d2seg_test_metrics_rgb", tmp_path, [np.zeros_like(g)], ["bg", "fg"])
    rgb = np.stack([g, g, g], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb_gt.png")
    ev = SemSegMetricsEvaluator("d2seg_test_metrics_rgb", distributed=False,
                                boundary_iou=False)
    ev.reset()
    assert ev.evaluate() == {}
    ev.process([{"file_name": dicts[0]["file_name"],
                 "sem_seg_file_name": str(tmp_path / "rgb_gt.png")}],
               [{"sem_seg": _onehot_logits(g.astype(np.int64), 2)}])
    assert ev.evaluate()["sem_seg_metrics"]["pACC"] == 100.0


@pytest.mark.parametrize("num_classes,shape,dilation", [(3, (40, 57), 1), (19, (64, 48), 3),
                                                        (300, (33, 31), 2), (2, (5, 7), 9)])
def test_class_boundary_counts_equal_the_per_class_masks(num_classes, shape, dilation):
    """One erosion + dilation of each label map gives, for every class, the counts of
    boundary_mask(pred == c) and boundary_mask(target == c) on the valid pixels."""
    from d2seg.metrics import class_boundary_counts

    rng = np.random.default_rng(num_classes)
    h, w = shape
    blocks = lambda: rng.integers(0, num_classes, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(
        4, 1)[:h, :w]
    pred, gt = blocks(), blocks()
    gt[rng.random(shape) < 0.1] = 255 if num_classes < 255 else -1  # ignored pixels
    gt[0, 0] = num_classes  # outside [0, C): skipped like the ignore label
    pred[rng.random(shape) < 0.05] = rng.integers(0, num_classes)  # speckle
    inter, union = class_boundary_counts(pred, gt, num_classes, 255, dilation=dilation)
    valid = (gt >= 0) & (gt < num_classes) & (gt != 255)
    want_i, want_u = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        bp = boundary_mask(pred == c, dilation) & valid
        bg = boundary_mask(gt == c, dilation) & valid
        want_i[c], want_u[c] = (bp & bg).sum(), (bp | bg).sum()
    assert want_u.sum() > 0
    np.testing.assert_array_equal(inter, want_i)
    np.testing.assert_array_equal(union, want_u)
    with pytest.raises(ValueError, match="predicted label outside"):
        class_boundary_counts(np.full(shape, num_classes), gt, num_classes, 255, dilation=1)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.mark.parametrize("write_predictions", [False, True])
def test_d2seg_sem_seg_evaluator_gives_detectron2s_and_d2segs_results(tmp_path,
                                                                     write_predictions):
    """One reading of each label map: "sem_seg" exactly detectron2's SemSegEvaluator's
    (boundary IoU, a class absent from the ground truth, ignored pixels), "sem_seg_metrics"
    exactly the standalone SemSegMetricsEvaluator's; the RLE json only on request."""
    from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator

    from d2seg.engine.trainer import load_sem_seg_gt
    from d2seg.evaluation import SemSegEvaluator, SemSegMetricsEvaluator

    rng = np.random.default_rng(3)
    gts, preds = [], []
    for _ in range(3):
        g = rng.integers(0, 3, (6, 8)).repeat(4, 0).repeat(4, 1)  # class 3 never in the gt
        g[rng.random(g.shape) < 0.1] = 255
        gts.append(g)
        preds.append(rng.integers(0, 4, (6, 8)).repeat(4, 0).repeat(4, 1))
    classes = ["a", "b", "c", "d"]
    dicts = _register("d2seg_test_metrics_both", tmp_path, gts, classes)
    inputs = [{"file_name": d["file_name"]} for d in dicts]
    outputs = [{"sem_seg": _onehot_logits(p, 4)} for p in preds]

    def run(ev):
        ev.reset()
        for i, o in zip(inputs, outputs):
            ev.process([i], [o])
        return ev.evaluate()

    ref_dir, out_dir = tmp_path / "ref", tmp_path / "out"
    ref = run(D2SemSegEvaluator("d2seg_test_metrics_both", distributed=False,
                                output_dir=str(ref_dir), sem_seg_loading_fn=load_sem_seg_gt))
    ref_m = run(SemSegMetricsEvaluator("d2seg_test_metrics_both", distributed=False))
    ev = SemSegEvaluator("d2seg_test_metrics_both", distributed=False, output_dir=str(out_dir),
                         metrics=SemSegMetricsEvaluator("d2seg_test_metrics_both",
                                                        distributed=False),
                         write_predictions=write_predictions)
    got = run(ev)
    assert list(got) == ["sem_seg", "sem_seg_metrics"]
    # detectron2's results without its multi-class "boundary IoU" (not per class)
    assert math.isnan(got["sem_seg"]["IoU-d"])
    boundary = [k for k in ref["sem_seg"] if "B-Iou" in k or k.startswith("BoundaryIoU-")]
    assert len(boundary) == 8 and not set(boundary) & set(got["sem_seg"])
    ref["sem_seg"] = {k: v for k, v in ref["sem_seg"].items() if k not in boundary}
    assert _same(got["sem_seg"], ref["sem_seg"])
    assert _same(got["sem_seg_metrics"], ref_m["sem_seg_metrics"])
    assert got["sem_seg_metrics"]["IoU-d"] == 0.0  # predicted, never present
    assert _same(torch.load(out_dir / "sem_seg_evaluation.pth", weights_only=False), ref["sem_seg"])
    if write_predictions:
        assert (json.loads((out_dir / "sem_seg_predictions.json").read_text())
                == json.loads((ref_dir / "sem_seg_predictions.json").read_text()))
    else:
        assert not (out_dir / "sem_seg_predictions.json").exists()
    # without metrics: detectron2's results only; a size mismatch names the file
    alone = SemSegEvaluator("d2seg_test_metrics_both", distributed=False)
    assert list(run(alone)) == ["sem_seg"]
    with pytest.raises(ValueError, match=r"img_d2seg_test_metrics_both_0.png: prediction"):
        alone.process(inputs[:1], [{"sem_seg": torch.zeros(4, 3, 3)}])
    with pytest.raises(ValueError, match=r"labels 0..5 outside \[0, 4\): the model has more"):
        alone.process(inputs[:1], [{"sem_seg": _onehot_logits(np.eye(24, 32, dtype=int) * 5, 6)}])
    # a metrics evaluator with its own ignore label counts its own confusion matrix
    own = SemSegEvaluator("d2seg_test_metrics_both", distributed=False,
                          metrics=SemSegMetricsEvaluator("d2seg_test_metrics_both",
                                                         distributed=False, ignore_label=0))
    want = run(SemSegMetricsEvaluator("d2seg_test_metrics_both", distributed=False,
                                      ignore_label=0))["sem_seg_metrics"]
    assert _same(run(own)["sem_seg_metrics"], want)
    assert want["mIoU"] != got["sem_seg_metrics"]["mIoU"]


def test_build_evaluators_reads_each_semantic_label_map_once(tmp_path):
    from d2seg.config import get_cfg
    from d2seg.engine.trainer import build_evaluators
    from d2seg.evaluation import SemSegEvaluator, SemSegMetricsEvaluator

    _register("d2seg_test_metrics_build", tmp_path, [np.zeros((4, 4), np.uint8)], ["a", "b"])
    cfg = get_cfg()
    ev = build_evaluators(cfg, "d2seg_test_metrics_build", str(tmp_path))
    assert isinstance(ev, SemSegEvaluator) and isinstance(ev._metrics, SemSegMetricsEvaluator)
    assert not ev._write_predictions
    cfg.D2SEG.EVAL.SEM_SEG_PREDICTIONS_JSON = True
    assert build_evaluators(cfg, "d2seg_test_metrics_build", str(tmp_path))._write_predictions


def _brute_surface_distances(a, b):
    """All-pairs version: surface = mask pixels with a background 4-neighbour (outside the
    image is background); distances to the other surface's nearest pixel, both directions."""
    def surface(m):
        p = np.pad(m, 1)
        out = np.zeros_like(m)
        for y, x in zip(*np.nonzero(m)):
            out[y, x] = not (p[y, x + 1] and p[y + 2, x + 1] and p[y + 1, x] and p[y + 1, x + 2])
        return np.argwhere(out)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)  # a -> b, b -> a


def test_surface_distances_hd95_assd_against_all_pairs():
    from d2seg.metrics import average_surface_distance, hausdorff95, surface_distances

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = np.zeros((24, 30), bool)
        b = np.zeros((24, 30), bool)
        for m in (a, b):
            y, x = rng.integers(0, 18), rng.integers(0, 24)
            m[y:y + rng.integers(2, 7), x:x + rng.integers(2, 7)] = True
            m[rng.random(m.shape) < 0.02] = True  # scattered pixels: several components
        ab, ba = _brute_surface_distances(a, b)
        got = surface_distances(a, b)
        assert np.allclose(np.sort(got), np.sort(np.concatenate([ab, ba])))
        # MONAI: the larger directed 95th percentile; ASSD over both directions
        assert hausdorff95(a, b) == pytest.approx(max(np.percentile(ab, 95),
                                                      np.percentile(ba, 95)))
        assert average_surface_distance(a, b) == pytest.approx(np.concatenate([ab, ba]).mean())
    empty = np.zeros((5, 5), bool)
    one = empty.copy()
    one[2, 2] = True
    assert hausdorff95(empty, empty) == 0.0 and math.isinf(hausdorff95(one, empty))
    assert math.isinf(average_surface_distance(empty, one)) and hausdorff95(one, one) == 0.0
    # MONAI 1.4's compute_hausdorff_distance(percentile=95) / compute_average_surface_distance
    # (symmetric=True) on these masks (computed once with MONAI; float32 results)
    yy, xx = np.mgrid[:64, :64]
    for p, t, hd, asd in (
            ((yy - 32) ** 2 + (xx - 32) ** 2 <= 100, (yy - 32) ** 2 + (xx - 32) ** 2 <= 169,
             3.1622776985168457, 2.7786922454833984),
            ((yy - 30) ** 2 + (xx - 30) ** 2 <= 144, (yy - 33) ** 2 + (xx - 30) ** 2 <= 144,
             3.0, 1.8218436241149902),
            ((yy < 20) & (xx < 30), (yy < 24) & (xx > 5) & (xx < 40), 10.0, 4.241251468658447)):
        assert hausdorff95(p, t) == pytest.approx(hd, rel=1e-6)
        assert average_surface_distance(p, t) == pytest.approx(asd, rel=1e-6)
    # spacing: anisotropic pixels (row, column size)
    a, b = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    a[4, 2], b[4, 6] = True, True
    assert hausdorff95(a, b, spacing=(1.0, 0.5)) == pytest.approx(2.0)


def test_evaluator_surface_distances_per_class_and_image(tmp_path):
    from d2seg.evaluation import SemSegMetricsEvaluator
    from d2seg.metrics import average_surface_distance, hausdorff95

    g1 = np.zeros((20, 20), np.int64)
    g1[4:10, 4:10] = 1
    g2 = np.zeros((20, 20), np.int64)  # no foreground
    p1 = np.zeros((20, 20), np.int64)
    p1[5:12, 4:9] = 1
    p2 = np.zeros((20, 20), np.int64)
    p2[0, 0] = 1  # a false positive: only predicted, distance inf
    dicts = _register("d2seg_test_surface", tmp_path, [g1, g2], ["bg", "fg"])
    ev = SemSegMetricsEvaluator("d2seg_test_surface", distributed=False,
                                output_dir=str(tmp_path / "out"), surface_distance=True)
    ev.reset()
    ev.process([{"file_name": d["file_name"]} for d in dicts],
               [{"sem_seg": _onehot_logits(p, 2)} for p in (p1, p2)])
    res = ev.evaluate()["sem_seg_metrics"]
    # fg: image 2 has it predicted but not present: a miss, scored as the image's diagonal
    # (skipped, a model that misses objects would score better)
    diag = math.hypot(20, 20)
    assert res["HD95-fg"] == pytest.approx((hausdorff95(p1 == 1, g1 == 1) + diag) / 2)
    assert res["ASSD-fg"] == pytest.approx((average_surface_distance(p1 == 1, g1 == 1)
                                            + diag) / 2)
    bg = [hausdorff95(p == 0, g == 0) for p, g in ((p1, g1), (p2, g2))]
    assert res["HD95-bg"] == pytest.approx(np.mean(bg))
    assert res["mHD95"] == res["HD95-fg"]  # class 0 is background, left out as MONAI does
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "sem_seg_per_image.csv")))
    assert float(rows[1]["HD95-fg"]) == pytest.approx(diag, abs=1e-3)
    assert float(rows[0]["HD95-fg"]) == pytest.approx(hausdorff95(p1 == 1, g1 == 1), abs=1e-3)
    # in mm: D2SEG.EVAL.PIXEL_SPACING (row, column), the miss bound in mm as well
    mm = SemSegMetricsEvaluator("d2seg_test_surface", distributed=False, surface_distance=True,
                                pixel_spacing=(0.5, 2.0))
    mm.process([{"file_name": d["file_name"]} for d in dicts],
               [{"sem_seg": _onehot_logits(p, 2)} for p in (p1, p2)])
    got = mm.evaluate()["sem_seg_metrics"]
    assert got["HD95-fg"] == pytest.approx(
        (hausdorff95(p1 == 1, g1 == 1, spacing=(0.5, 2.0)) + math.hypot(10, 40)) / 2)
    # off by default: no distance keys
    ev = SemSegMetricsEvaluator("d2seg_test_surface", distributed=False)
    ev.process([{"file_name": dicts[0]["file_name"]}], [{"sem_seg": _onehot_logits(p1, 2)}])
    assert not [k for k in ev.evaluate()["sem_seg_metrics"] if "HD95" in k]
