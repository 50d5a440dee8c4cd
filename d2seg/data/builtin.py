"""Datasets registered when ``d2seg`` is imported.

* the six synthetic ``shapes_*`` catalogs (default sizes; train_net re-registers them from
  ``cfg.D2SEG.SHAPES``), generated on first use;
* ``isbi2012_membrane_train`` (slices 0-24) and ``isbi2012_membrane_val`` (slices 25-29) read
  from ``$D2SEG_SHARED_DATA/isbi2012_membrane`` (default: the first ``shared/data`` found
  beside the working directory or the repository). Classes: 0 = cell, 1 = membrane (the raw
  label PNGs store membrane as 0 and cell interior as 255);
* ``fruits_nuts_train`` / ``fruits_nuts_val`` / ``fruits_nuts_all``: the 18 fruits-and-nuts
  photos (COCO polygons, 3 classes) from ``$D2SEG_SHARED_DATA/fruits_nuts_coco``; a seeded
  75/25 split by image, each split with its own COCO json (so COCO AP covers only the split).
"""
from __future__ import annotations

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog_utils import unregister
from .catalogs import register_shapes_catalogs
from .sem_seg_folder import register_sem_seg_folder

__all__ = ["shared_data_root", "register_all_builtin"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shared_data_root() -> Optional[str]:
    """``$D2SEG_SHARED_DATA`` if set, else ``../shared/data`` next to cwd or the repository."""
    env = os.environ.get("D2SEG_SHARED_DATA")
    if env:
        return env
    for base in (os.getcwd(), _REPO_ROOT):
        cand = os.path.normpath(os.path.join(base, "..", "shared", "data"))
        if os.path.isdir(cand):
            return cand
    return None


FRUITS_VAL_FRACTION = 0.25
ISBI_CLASSES = ["cell", "membrane"]
ISBI_LABEL_MAP = {255: 0, 0: 1}  # raw label PNG value -> class id


def _register_isbi(root: str) -> None:
    base = os.path.join(root, "isbi2012_membrane", "train")
    for name, stems in (
        ("isbi2012_membrane_train", [str(i) for i in range(25)]),
        ("isbi2012_membrane_val", [str(i) for i in range(25, 30)]),
    ):
        register_sem_seg_folder(
            name, os.path.join(base, "image"), os.path.join(base, "label"),
            classes=ISBI_CLASSES, ignore_label=255, label_map=ISBI_LABEL_MAP, stems=stems,
            colors=[(40, 40, 40), (255, 60, 60)],
        )


def _register_fruits_nuts(root: str) -> None:
    from detectron2.data.datasets import load_coco_json

    from .catalogs import _PREPARE
    from .register import split_coco_json

    base = os.path.join(root, "fruits_nuts_coco")
    json_all = os.path.join(base, "trainval.json")
    image_root = os.path.join(base, "images")

    def split_json(name: str) -> str:
        # COCOEvaluator scores every image of its json_file: each split needs its own json,
        # written once into the dataset cache (seeded split, 25% val)
        if name == "fruits_nuts_all":
            path = json_all
        else:
            tr, va = split_coco_json(json_all, FRUITS_VAL_FRACTION, seed=0)
            path = tr if name.endswith("_train") else va
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) is None:
            meta.json_file = path
        return path

    for name in ("fruits_nuts_train", "fruits_nuts_val", "fruits_nuts_all"):
        unregister(name)
        DatasetCatalog.register(
            name, lambda name=name: load_coco_json(split_json(name), image_root, name))
        MetadataCatalog.get(name).set(thing_classes=["date", "fig", "hazelnut"],
                                      image_root=image_root, evaluator_type="coco",
                                      source_json_file=json_all)
        _PREPARE[name] = lambda name=name: split_json(name)


def register_all_builtin() -> None:
    """Register the shapes catalogs (default sizes) and, when the shared data folder exists
    (:func:`shared_data_root`), ISBI and fruits-nuts. Run on ``import d2seg``."""
    register_shapes_catalogs()
    root = shared_data_root()
    if root is not None:
        _register_isbi(root)
        _register_fruits_nuts(root)
