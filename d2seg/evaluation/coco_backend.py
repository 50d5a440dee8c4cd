"""Which COCOeval implementation detectron2's ``COCOEvaluator`` runs (``D2SEG.EVAL.COCO_BACKEND``).

detectron2 evaluates COCO AP with its own C++ ``COCOeval_opt`` when its compiled ``_C`` loads,
and falls back to pure-Python pycocotools otherwise (the case with the ``sal-detectron2``
wheel d2seg installs). pycocotools' ``evaluate()`` is the slow part: a Python loop over
(image, category) pairs. `faster-coco-eval <https://pypi.org/project/faster-coco-eval/>`_ is a
maintained C++ re-implementation with pycocotools' interface; on the shapes validation set its
stats agree with pycocotools to within 1e-15 (``benchmarks/eval_speed.py`` checks every printed
digit) at 2-5x the speed.

Backends:

* ``"auto"``: detectron2's C++ ``COCOeval_opt`` if it loads, else faster-coco-eval if installed,
  else pycocotools;
* ``"faster_coco_eval"``: faster-coco-eval (an error if it is not installed);
* ``"pycocotools"``: the official pure-Python implementation.

detectron2's ``COCOEvaluator`` picks between pycocotools and the module-level ``COCOeval_opt``
through its ``use_fast_impl`` argument; :func:`coco_evaluator_kwargs` sets that argument and,
when faster-coco-eval is chosen, points ``COCOeval_opt`` at it for the process ("auto" never
replaces a working detectron2 C++ build; only an explicit "faster_coco_eval" does).
"""
from __future__ import annotations

import logging
from typing import Dict

__all__ = ["BACKENDS", "faster_coco_eval_available", "resolve_backend", "coco_evaluator_kwargs"]

BACKENDS = ("auto", "faster_coco_eval", "pycocotools")
logger = logging.getLogger(__name__)
_said: Dict[str, str] = {}  # the implementation last logged


def faster_coco_eval_available() -> bool:
    """Whether the ``faster_coco_eval`` package imports on this machine."""
    try:
        import faster_coco_eval  # noqa: F401
    except Exception:  # ImportError, or a wheel that does not load on this platform
        return False
    return True


def _detectron2_cpp_available() -> bool:
    from detectron2.evaluation import coco_evaluation

    return coco_evaluation.COCOeval_opt is not coco_evaluation.COCOeval and not getattr(
        coco_evaluation.COCOeval_opt, "_d2seg_faster_coco_eval", False)


def resolve_backend(name: str) -> str:
    """"auto" / "faster_coco_eval" / "pycocotools" -> "detectron2_cpp", "faster_coco_eval" or
    "pycocotools": the implementation that will run."""
    if name not in BACKENDS:
        raise ValueError(f"D2SEG.EVAL.COCO_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "pycocotools":
        return name
    if name == "faster_coco_eval":
        if not faster_coco_eval_available():
            raise ImportError("D2SEG.EVAL.COCO_BACKEND 'faster_coco_eval': the faster-coco-eval "
                              "package is not installed (pip install faster-coco-eval)")
        return name
    if _detectron2_cpp_available():
        return "detectron2_cpp"
    return "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"


def _faster_cocoeval_class():
    from faster_coco_eval import COCOeval_faster

    class FasterCOCOeval(COCOeval_faster):
        """faster-coco-eval's COCOeval taking pycocotools ``COCO`` objects, as
        detectron2's ``_evaluate_predictions_on_coco`` passes them (it accepts them as they
        are), printing its progress and the 12-line AP / AR summary on stdout as pycocotools
        does (faster-coco-eval's default sends them to a logger nobody configures)."""

        _d2seg_faster_coco_eval = True

        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", **kwargs):
            kwargs.setdefault("print_function", print)
            super().__init__(cocoGt, cocoDt, iouType, **kwargs)

    return FasterCOCOeval


def coco_evaluator_kwargs(backend: str) -> Dict[str, bool]:
    """Keyword arguments for ``detectron2.evaluation.COCOEvaluator`` that select ``backend``
    (a ``D2SEG.EVAL.COCO_BACKEND`` value), installing faster-coco-eval as detectron2's
    ``COCOeval_opt`` when it is the one chosen."""
    impl = resolve_backend(backend)
    if impl != "faster_coco_eval" and _said.get("impl") != impl:  # once per choice and process
        _said["impl"] = impl
        why = (" (faster-coco-eval is not installed: pip install faster-coco-eval)"
               if impl == "pycocotools" and backend == "auto" else "")
        logger.info(f"COCO evaluation: {'detectron2 C++' if impl == 'detectron2_cpp' else impl}"
                    f" (D2SEG.EVAL.COCO_BACKEND '{backend}'){why}")
    if impl == "pycocotools":
        return {"use_fast_impl": False}
    if impl == "faster_coco_eval":
        from detectron2.evaluation import coco_evaluation

        if not getattr(coco_evaluation.COCOeval_opt, "_d2seg_faster_coco_eval", False):
            coco_evaluation.COCOeval_opt = _faster_cocoeval_class()
            logger.info("COCO evaluation: faster-coco-eval")
    return {"use_fast_impl": True}
