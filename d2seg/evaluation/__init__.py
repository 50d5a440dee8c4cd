"""Evaluators for d2seg's tasks."""
from .sem_seg_evaluator import SemSegEvaluator
from .sem_seg_metrics import SemSegMetricsEvaluator

__all__ = ["SemSegEvaluator", "SemSegMetricsEvaluator"]
