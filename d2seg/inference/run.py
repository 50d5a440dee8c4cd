"""The body of ``tools/predict.py``: config, predictor, loop with a progress bar, writer."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from ..config import CfgNode, load_config
from ..data.image_io import IntensityScaling, read_image, set_intensity_scaling
from ..data.catalogs import register_shapes_from_cfg
from ..data.register import register_datasets_from_cfg
from ..data.safe_mapper import is_input_error
from .predictor import SegPredictor
from .writer import PredictionWriter, image_ids_from_coco_json, list_inputs

logger = logging.getLogger(__name__)

__all__ = ["predict_config", "predict_files", "predict_from_args"]


def predict_config(config_file: str, opts: List[str], score_threshold: float = 0.5,
                   sliding_window=None, overlap: Optional[float] = None,
                   flip: bool = False, rot90: bool = False,
                   scales: Optional[Sequence[float]] = None) -> CfgNode:
    """The config for prediction: file + opts, registrations applied, CLI options merged."""
    cfg = load_config(config_file, opts)
    if sliding_window:
        cfg.D2SEG.INFERENCE.SLIDING_WINDOW.SIZE = tuple(int(s) for s in sliding_window)
    if overlap is not None:
        if not 0 <= float(overlap) < 1:
            raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
        cfg.D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP = float(overlap)
        if not all(cfg.D2SEG.INFERENCE.SLIDING_WINDOW.SIZE):
            logger.warning("--overlap has no effect without a window: pass --sliding-window H W "
                           "(or set D2SEG.INFERENCE.SLIDING_WINDOW.SIZE)")
    if flip:
        cfg.D2SEG.INFERENCE.FLIP = True
    if rot90:
        cfg.D2SEG.INFERENCE.ROT90 = True
    if scales:
        if any(not float(v) > 0 for v in scales):
            raise ValueError(f"test scales must be > 0, got {list(scales)}")
        cfg.D2SEG.INFERENCE.SCALES = tuple(float(v) for v in scales)
    # as detectron2's demo: the threshold also applies inside the models
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = score_threshold
    cfg.freeze()  # MODEL.DEVICE "cuda" without CUDA: SegPredictor predicts on the CPU
    register_shapes_from_cfg(cfg)  # the run's D2SEG.SHAPES catalog (its image ids)
    register_datasets_from_cfg(cfg, data_optional=True)  # class names, also without the data
    set_intensity_scaling(IntensityScaling.from_cfg(cfg))  # how 16-bit / float files are read
    return cfg


def _with_class_names(cfg: CfgNode, metadata):
    """``metadata``, or a copy of it with class names "class 0", ... for the outputs where the
    dataset gives none (no dataset, or a COCO / panoptic entry registered without its json),
    so that the overlays can be drawn: detectron2's Visualizer indexes ``stuff_classes`` for
    panoptic and semantic outputs. (A copy: the catalog's entry stays as registered.)"""
    from detectron2.data.catalog import Metadata

    sem = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    missing = {key: [f"class {i}" for i in range(n)] for key, n in (
        ("thing_classes", int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)),
        ("stuff_classes", 2 if sem == 1 else sem)) if not getattr(metadata, key, None)}
    if not missing:
        return metadata
    return Metadata(**{**metadata.as_dict(), **missing})


def predict_files(cfg: CfgNode, paths: List[str], out_dir: str, dataset: str = "",
                  coco_json: str = "", score_threshold: float = 0.5,
                  overlays: bool = True, progress: bool = True) -> Dict[str, str]:
    """Predict every image of ``paths`` and write the outputs (see :mod:`.writer`).

    Returns:
        {kind: path written} ("instances", "sem_seg", "panoptic").
    """
    from tqdm import tqdm

    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    dataset = dataset or (names[0] if names else "")
    if dataset and dataset not in DatasetCatalog.list():
        from ..config import ConfigError
        from ..data.register import not_registered

        raise ConfigError(f"--dataset (the classes and ids of the predictions): "
                          f"{not_registered(dataset, DatasetCatalog.list())}")
    metadata = MetadataCatalog.get(dataset) if dataset else MetadataCatalog.get("__unused")
    if dataset and getattr(metadata, "json_file", None) and \
            not hasattr(metadata, "thing_dataset_id_to_contiguous_id"):
        DatasetCatalog.get(dataset)  # load_coco_json sets the category id map
    metadata = _with_class_names(cfg, metadata)
    # image ids from the unsplit json where the dataset is a split of one (a split's json
    # lists only its own images); only the files in the dataset's image folder take its ids
    image_root = ""
    if not coco_json and dataset:
        coco_json = (getattr(metadata, "source_json_file", "") or
                     getattr(metadata, "json_file", "") or "")
        image_root = getattr(metadata, "image_root", "") or ""
    ids = image_ids_from_coco_json(coco_json) if coco_json and os.path.isfile(coco_json) else {}
    predictor = SegPredictor(cfg)
    writer = PredictionWriter(out_dir, metadata, score_threshold, ids, overlays, image_root)
    skipped = []
    for i, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=not progress)):
        try:
            bgr = read_image(path, format="BGR", scaling=predictor.intensity)
        except Exception as e:  # noqa: BLE001 - only unreadable files, filtered right below
            if not is_input_error(e):
                raise
            logger.warning(f"{path}: not a readable image ({type(e).__name__}: {e}); skipped")
            skipped.append(path)
            continue
        writer.add(path, i, bgr, predictor(bgr))
    if skipped and len(skipped) == len(paths):
        from ..data.errors import DatasetLoadError

        raise DatasetLoadError(f"--input: none of the {len(paths)} inputs is a readable image: "
                         f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    written = writer.finish()
    if skipped:
        logger.warning(f"{len(skipped)} of {len(paths)} inputs skipped as unreadable: "
                       f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    for kind, p in written.items():
        logger.info(f"{kind} predictions of {len(paths)} images written to {p}")
    return written


def predict_from_args(args) -> Dict[str, str]:
    """``tools/predict.py``'s arguments -> :func:`predict_files`."""
    setup_logger(name="d2seg")
    setup_logger(name="fvcore")
    cfg = predict_config(args.config_file, args.opts, args.score_threshold, args.sliding_window,
                         args.overlap, args.flip, args.rot90, getattr(args, "scales", None))
    return predict_files(cfg, list_inputs(args.input), args.output, args.dataset, args.coco_json,
                         args.score_threshold, not args.no_overlays)
