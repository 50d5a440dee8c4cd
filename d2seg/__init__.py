"""d2seg: semantic, instance and panoptic segmentation on top of detectron2.

Importing ``d2seg`` registers its datasets (``shapes_*``, ISBI, fruits-nuts), meta-architectures,
heads and backbones in detectron2's registries.
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # detectron2 (box_regression.py) and fvcore (its focal losses) apply torch.jit.script at
    # import time, and torch >= 2.10 warns that torch.jit.script is deprecated: nothing a
    # d2seg user can act on. Silenced for these imports only; other calls still warn.
    _warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                             category=FutureWarning)
    # detectron2's model zoo (zoo:// config bases) imports pkg_resources, which setuptools
    # flags as deprecated on every import (the setuptools<81 pin keeps it available)
    _warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated",
                             category=UserWarning)
    import detectron2.modeling  # noqa: F401
    import detectron2.model_zoo  # noqa: F401

from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers models)
from . import metrics  # noqa: F401
from .config import add_d2seg_config, get_cfg, load_config
from .evaluation import SemSegMetricsEvaluator

__version__ = "0.1.0"
__all__ = ["add_d2seg_config", "get_cfg", "load_config", "SemSegMetricsEvaluator", "__version__"]
