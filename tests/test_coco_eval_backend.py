"""D2SEG.EVAL.COCO_BACKEND: faster-coco-eval gives every number detectron2 prints exactly as
pycocotools does, and the config selects the implementation COCOEvaluator runs."""
import contextlib
import copy
import io

import pytest

import d2seg  # noqa: F401
from detectron2.data import MetadataCatalog

from benchmarks.eval_speed import printed_numbers, synthetic_predictions, time_instances
from d2seg.config import get_cfg
from d2seg.data.catalogs import prepare_dataset, register_shapes_catalogs
from d2seg.engine.trainer import build_evaluators
from d2seg.evaluation.coco_backend import (
    coco_evaluator_kwargs,
    faster_coco_eval_available,
    resolve_backend,
)

needs_fce = pytest.mark.skipif(not faster_coco_eval_available(),
                               reason="faster-coco-eval is not installed")


@pytest.fixture(scope="module")
def gt_file():
    register_shapes_catalogs(num_train=2, num_val=12, image_size=128, prefix="cocoeval_shapes")
    prepare_dataset("cocoeval_shapes_instance_val")
    return MetadataCatalog.get("cocoeval_shapes_instance_val").json_file


def test_resolve_backend_names():
    assert resolve_backend("pycocotools") == "pycocotools"
    assert resolve_backend("auto") in ("detectron2_cpp", "faster_coco_eval", "pycocotools")
    with pytest.raises(ValueError, match="COCO_BACKEND.*'cocoeval'"):
        resolve_backend("cocoeval")
    assert coco_evaluator_kwargs("pycocotools") == {"use_fast_impl": False}


@needs_fce
def test_faster_coco_eval_matches_pycocotools_to_the_printed_digit(gt_file):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        preds = synthetic_predictions(COCO(gt_file), 400, seed=3)
    report = time_instances(gt_file, preds, repeats=1)
    for iou_type in ("bbox", "segm"):
        row = report[iou_type]
        assert row["numbers_compared"] >= 12 + 6
        assert row["mismatches"] == {}, row["mismatches"]
        assert 0 < row["AP"] < 100  # the predictions are imperfect: a real comparison


@needs_fce
def test_printed_numbers_detect_a_difference(gt_file):
    """The comparison is not vacuous: changing the predictions changes the printed numbers."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        preds = synthetic_predictions(gt, 300, seed=1)
        a = _evaluate_predictions_on_coco(gt, copy.deepcopy(preds), "bbox", cocoeval_fn=COCOeval)
        worse = [dict(p, score=1.0 - p["score"]) for p in preds]
        b = _evaluate_predictions_on_coco(gt, worse, "bbox", cocoeval_fn=COCOeval)
    names = [c["name"] for c in gt.loadCats(sorted(gt.getCatIds()))]
    assert printed_numbers(a, "bbox", names) != printed_numbers(b, "bbox", names)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_config_selects_backend(gt_file, tmp_path, backend):
    if backend == "faster_coco_eval" and not faster_coco_eval_available():
        pytest.skip("faster-coco-eval is not installed")
    from detectron2.evaluation import COCOEvaluator
    from detectron2.evaluation import coco_evaluation

    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.D2SEG.EVAL.COCO_BACKEND = backend
    ev = build_evaluators(cfg, "cocoeval_shapes_instance_val", str(tmp_path))
    assert isinstance(ev, COCOEvaluator)
    assert ev._use_fast_impl == (backend != "pycocotools")
    if backend == "faster_coco_eval":
        assert getattr(coco_evaluation.COCOeval_opt, "_d2seg_faster_coco_eval", False)


def test_the_chosen_implementation_is_logged_once(monkeypatch, caplog):
    """Not only faster-coco-eval: "auto" falling back to pycocotools says so (and why)."""
    import logging

    from d2seg.evaluation import coco_backend

    monkeypatch.setattr(coco_backend, "_said", {})
    monkeypatch.setattr(coco_backend, "_detectron2_cpp_available", lambda: False)
    monkeypatch.setattr(coco_backend, "faster_coco_eval_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="d2seg.evaluation.coco_backend"):
        assert coco_backend.coco_evaluator_kwargs("auto") == {"use_fast_impl": False}
        coco_backend.coco_evaluator_kwargs("auto")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["COCO evaluation: pycocotools (D2SEG.EVAL.COCO_BACKEND 'auto') "
                     "(faster-coco-eval is not installed: pip install faster-coco-eval)"]


@pytest.mark.parametrize("cpp, fce, want", [(True, True, "detectron2_cpp"),
                                            (True, False, "detectron2_cpp"),
                                            (False, True, "faster_coco_eval"),
                                            (False, False, "pycocotools")])
def test_auto_backend_table(monkeypatch, cpp, fce, want):
    from d2seg.evaluation import coco_backend
    monkeypatch.setattr(coco_backend, "_detectron2_cpp_available", lambda: cpp)
    monkeypatch.setattr(coco_backend, "faster_coco_eval_available", lambda: fce)
    assert coco_backend.resolve_backend("auto") == want


def test_installed_faster_coco_eval_is_not_mistaken_for_detectron2_cpp(monkeypatch):
    from detectron2.evaluation import coco_evaluation
    from d2seg.evaluation import coco_backend
    if not coco_backend.faster_coco_eval_available():
        pytest.skip()
    monkeypatch.setattr(coco_evaluation, "COCOeval_opt", coco_evaluation.COCOeval_opt)
    coco_backend.coco_evaluator_kwargs("faster_coco_eval")
    assert not coco_backend._detectron2_cpp_available()
    assert coco_backend.resolve_backend("auto") == "faster_coco_eval"


def test_eval_speed_semantic_section_compares_identical_results(tmp_path):
    from benchmarks.eval_speed import time_semantic

    r = time_semantic(3, 40, 64, 5, str(tmp_path), repeats=1)
    assert r["results_identical"] and r["images"] == 3 and r["size"] == [40, 64]
    assert r["ms_per_image_one_pass"] > 0 and r["speedup"] > 0


@needs_fce
def test_faster_coco_eval_prints_the_summary_lines_pycocotools_prints(gt_file):
    """detectron2 users read the 12 "Average Precision / Recall" lines on stdout: the same
    lines, with the same numbers, through either implementation."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco

    from d2seg.evaluation.coco_backend import _faster_cocoeval_class

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        preds = synthetic_predictions(gt, 200, seed=2)
    outs = []
    for fn in (COCOeval, _faster_cocoeval_class()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _evaluate_predictions_on_coco(gt, copy.deepcopy(preds), "bbox", cocoeval_fn=fn)
        outs.append([ln for ln in buf.getvalue().splitlines() if ln.lstrip().startswith("Average")])
    # faster-coco-eval adds two lines (AR at IoU 0.50 and 0.75) after the twelve
    assert len(outs[0]) == 12 and [ln for ln in outs[1] if ln in outs[0]] == outs[0]
    assert len(outs[1]) == 14
