"""Inference helpers: sliding-window, flip and rotation test-time augmentation for semantic
models (also as a model wrapper for evaluation), a ``DefaultPredictor`` that applies them, the
model as evaluation runs it (:func:`build_inference_model`), the prediction writer behind
``tools/predict.py``, and mixed-precision inference."""
from .autocast import inference_autocast_dtype, use_inference_autocast
from .predictor import SegPredictor, build_inference_model, cpu_fallback, is_semantic_model
from .sliding_window import semantic_logits, sliding_window_logits, window_starts
from .tta import SemanticSegmentorWithTTA

__all__ = ["SegPredictor", "build_inference_model", "SemanticSegmentorWithTTA",
           "is_semantic_model", "semantic_logits", "sliding_window_logits", "window_starts",
           "use_inference_autocast", "inference_autocast_dtype", "cpu_fallback"]
