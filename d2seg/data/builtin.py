"""Datasets registered when ``d2seg`` is imported.

* the six synthetic ``shapes_*`` catalogs (default sizes; train_net re-registers them from
  ``cfg.D2SEG.SHAPES``), generated on first use;
* ``isbi2012_membrane_train`` (slices 0-24) and ``isbi2012_membrane_val`` (slices 25-29) read
  from ``$D2SEG_SHARED_DATA/isbi2012_membrane`` (default: the first ``shared/data`` found
  beside the working directory or the repository). Classes: 0 = cell, 1 = membrane (the raw
  label PNGs store membrane as 0 and cell interior as 255);
* ``fruits_nuts_train`` / ``fruits_nuts_val`` / ``fruits_nuts_all``: the 18 fruits-and-nuts
  photos (COCO polygons, 3 classes) from ``$D2SEG_SHARED_DATA/fruits_nuts_coco``; images 0-13
  train, 14-17 val.
"""
from __future__ import annotations

import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

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
    import json

    from detectron2.data.datasets import load_coco_json

    base = os.path.join(root, "fruits_nuts_coco")
    json_file = os.path.join(base, "trainval.json")
    image_root = os.path.join(base, "images")
    splits = {"fruits_nuts_train": range(0, 14), "fruits_nuts_val": range(14, 18),
              "fruits_nuts_all": range(0, 18)}
    for name, ids in splits.items():
        ids = set(ids)

        def load(name=name, ids=ids):
            return [d for d in load_coco_json(json_file, image_root, name) if d["image_id"] in ids]

        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=["date", "fig", "hazelnut"],
            json_file=json_file, image_root=image_root, evaluator_type="coco",
        )


def register_all_builtin() -> None:
    register_shapes_catalogs()
    root = shared_data_root()
    if root is not None:
        _register_isbi(root)
        _register_fruits_nuts(root)
