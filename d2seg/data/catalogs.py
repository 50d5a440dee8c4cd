"""Registration of the synthetic shapes catalogs in detectron2's DatasetCatalog/MetadataCatalog.

Names (``<split>`` is ``train`` or ``val``):

* ``shapes_instance_<split>``: instance dicts loaded from a COCO json (polygons);
  ``evaluator_type="coco"``.
* ``shapes_sem_seg_<split>``: ``sem_seg_file_name`` per image, 5 classes, ``ignore_label=255``;
  ``evaluator_type="sem_seg"``.
* ``shapes_panoptic_<split>``: instance annotations + the "separated" stuff map
  (``sem_seg_file_name``) + ``pan_seg_file_name``/``segments_info``, registered like
  detectron2's ``coco_2017_*_panoptic_separated`` so Panoptic FPN trains on it;
  ``evaluator_type="coco_panoptic_seg"``.

Images are generated on the first ``DatasetCatalog.get`` (see :mod:`d2seg.data.shapes`).
"""
from __future__ import annotations

import copy
import os
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg

from .catalog_utils import unregister
from .shapes import (
    IGNORE_LABEL,
    SEM_SEG_CLASSES,
    STUFF_CLASSES,
    STUFF_COLORS,
    STUFF_IDS,
    THING_CLASSES,
    THING_COLORS,
    THING_IDS,
    ShapesParams,
    generate_shapes,
    shapes_cache_root,
)

__all__ = ["register_shapes_catalogs", "prepare_dataset"]


# dataset name -> function that generates its files (if needed) and returns nothing
_PREPARE: Dict[str, Callable[[], None]] = {}
_REGISTERED_PARAMS: Dict[str, Tuple[ShapesParams, Optional[str]]] = {}


def prepare_dataset(name: str) -> None:
    """Make sure the files behind ``name`` exist (generating them if it is a synthetic catalog).

    A no-op for datasets that d2seg does not generate. Call it before code that reads a
    dataset's ``json_file`` directly (e.g. ``COCOEvaluator``) without ``DatasetCatalog.get``.
    """
    fn = _PREPARE.get(name)
    if fn is not None:
        fn()


def _load_instances(params: ShapesParams, root: Optional[str], name: str) -> List[dict]:
    folder = generate_shapes(params, root)
    return load_coco_json(
        os.path.join(folder, "instances.json"), os.path.join(folder, "images"), name
    )


def _load_sem_seg(params: ShapesParams, root: Optional[str]) -> List[dict]:
    folder = generate_shapes(params, root)
    return load_sem_seg(
        os.path.join(folder, "sem_seg"), os.path.join(folder, "images"),
        gt_ext="png", image_ext="jpg",
    )


def _load_panoptic(params: ShapesParams, root: Optional[str], name: str) -> List[dict]:
    import json

    folder = generate_shapes(params, root)
    dicts = load_coco_json(
        os.path.join(folder, "instances.json"), os.path.join(folder, "images"), name
    )
    with open(os.path.join(folder, "panoptic.json")) as f:
        pan = {a["image_id"]: a for a in json.load(f)["annotations"]}
    thing_map = {i: k for k, i in enumerate(THING_IDS)}
    stuff_map = {i: k + 1 for k, i in enumerate(STUFF_IDS)}
    for d in dicts:
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        d["sem_seg_file_name"] = os.path.join(folder, "panoptic_sem_seg", stem + ".png")
        a = pan[d["image_id"]]
        d["pan_seg_file_name"] = os.path.join(folder, "panoptic", a["file_name"])
        segs = copy.deepcopy(a["segments_info"])
        for s in segs:  # contiguous ids, as detectron2's load_coco_panoptic_json does
            s["isthing"] = s["category_id"] in thing_map
            s["category_id"] = (thing_map if s["isthing"] else stuff_map)[s["category_id"]]
        d["segments_info"] = segs
    return dicts


def _register(name: str, loader: Callable[[], List[dict]], prepare: Callable[[], None],
              **metadata) -> None:
    unregister(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    _PREPARE[name] = prepare


def register_shapes_catalogs(
    num_train: int = 1000,
    num_val: int = 100,
    image_size: int = 256,
    max_objects: int = 6,
    seed: int = 0,
    root: Optional[str] = None,
    prefix: str = "shapes",
) -> None:
    """(Re-)register the six ``<prefix>_{instance,sem_seg,panoptic}_{train,val}`` datasets.

    Registration is cheap; files are generated on first use. Re-registering with the same
    parameters is a no-op, with different ones replaces the entries (and later regenerates).

    Args:
        num_train, num_val: images per split.
        image_size: side of the square images, in pixels.
        max_objects: most things per image.
        seed: base seed; each split derives its own.
        root: cache root; default ``$D2SEG_DATASETS/shapes`` or ``~/.cache/d2seg/shapes``.
        prefix: dataset name prefix.
    """
    things = list(THING_CLASSES)
    thing_id_map = {i: k for k, i in enumerate(THING_IDS)}
    for split, n in (("train", num_train), ("val", num_val)):
        params = ShapesParams(
            split=split, num_images=int(n), image_size=int(image_size),
            max_objects=int(max_objects), seed=int(seed),
        )
        key = f"{prefix}/{split}"
        if _REGISTERED_PARAMS.get(key) == (params, root):
            continue
        _REGISTERED_PARAMS[key] = (params, root)
        folder = os.path.join(root or shapes_cache_root(), params.key())

        def prepare(p=params):
            generate_shapes(p, root)

        _register(
            f"{prefix}_instance_{split}",
            lambda p=params, nm=f"{prefix}_instance_{split}": _load_instances(p, root, nm),
            prepare,
            thing_classes=things,
            thing_colors=list(THING_COLORS),
            thing_dataset_id_to_contiguous_id=thing_id_map,
            json_file=os.path.join(folder, "instances.json"),
            image_root=os.path.join(folder, "images"),
            evaluator_type="coco",
        )
        _register(
            f"{prefix}_sem_seg_{split}",
            lambda p=params: _load_sem_seg(p, root),
            prepare,
            stuff_classes=list(SEM_SEG_CLASSES),
            stuff_colors=list(STUFF_COLORS) + list(THING_COLORS),
            ignore_label=IGNORE_LABEL,
            image_root=os.path.join(folder, "images"),
            sem_seg_root=os.path.join(folder, "sem_seg"),
            evaluator_type="sem_seg",
        )
        stuff_id_map = {i: k + 1 for k, i in enumerate(STUFF_IDS)}
        stuff_id_map[0] = 0  # "things" class of the separated stuff map
        _register(
            f"{prefix}_panoptic_{split}",
            lambda p=params, nm=f"{prefix}_panoptic_{split}": _load_panoptic(p, root, nm),
            prepare,
            thing_classes=things,
            thing_colors=list(THING_COLORS),
            thing_dataset_id_to_contiguous_id=thing_id_map,
            stuff_classes=["things"] + list(STUFF_CLASSES),
            stuff_colors=[(82, 18, 128)] + list(STUFF_COLORS),
            stuff_dataset_id_to_contiguous_id=stuff_id_map,
            json_file=os.path.join(folder, "instances.json"),
            image_root=os.path.join(folder, "images"),
            panoptic_root=os.path.join(folder, "panoptic"),
            panoptic_json=os.path.join(folder, "panoptic.json"),
            sem_seg_root=os.path.join(folder, "panoptic_sem_seg"),
            ignore_label=IGNORE_LABEL,
            label_divisor=1000,
            evaluator_type="coco_panoptic_seg",
        )


def register_shapes_from_cfg(cfg: CfgNode) -> None:
    """Re-register the shapes catalogs from ``cfg.D2SEG.SHAPES``."""
    s = cfg.D2SEG.SHAPES
    register_shapes_catalogs(
        num_train=s.NUM_TRAIN, num_val=s.NUM_VAL, image_size=s.IMAGE_SIZE,
        max_objects=s.MAX_OBJECTS, seed=s.SEED,
    )
