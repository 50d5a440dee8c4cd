"""d2seg: semantic, instance and panoptic segmentation on top of detectron2.

Importing ``d2seg`` registers its datasets (``shapes_*``, ISBI, fruits-nuts), meta-architectures,
heads and backbones in detectron2's registries.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers models)
from . import metrics  # noqa: F401
from .config import add_d2seg_config, get_cfg, load_config
from .evaluation import SemSegMetricsEvaluator

__version__ = "0.1.0"
__all__ = ["add_d2seg_config", "get_cfg", "load_config", "SemSegMetricsEvaluator", "__version__"]
