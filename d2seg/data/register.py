"""Register your own datasets from the config (``D2SEG.DATASETS.REGISTER``), without Python.

Each entry of ``D2SEG.DATASETS.REGISTER`` describes one dataset, with the argument names of
detectron2's own ``register_*`` functions. In a YAML config it is a mapping::

    D2SEG:
      DATASETS:
        REGISTER:
          - {name: fruits, type: coco,
             json_file: ../shared/data/fruits_nuts_coco/trainval.json,
             image_root: ../shared/data/fruits_nuts_coco/images,
             val_fraction: 0.25}            # -> fruits_train, fruits_val (and fruits: all)
          - {name: isbi, type: sem_seg,
             image_root: ../shared/data/isbi2012_membrane/train/image,
             sem_seg_root: ../shared/data/isbi2012_membrane/train/label,
             classes: [cell, membrane], ignore_label: 255, label_map: {255: 0, 0: 1}}

On train_net's command line the same entry is one ``key=value,key=value`` string (lists in
``[a,b]``, mappings in ``{k:v,k:v}``)::

    D2SEG.DATASETS.REGISTER "('name=fruits,type=coco,json_file=...,image_root=...',)"

Types and their keys:

* ``coco`` (instances; as detectron2's ``register_coco_instances``): ``json_file``,
  ``image_root``. ``evaluator_type="coco"``.
* ``sem_seg`` (image folder + mask folder, paired by file stem;
  :func:`d2seg.data.sem_seg_folder.register_sem_seg_folder`): ``image_root``,
  ``sem_seg_root``, ``classes``; optional ``ignore_label`` (255), ``label_map`` (raw mask value
  -> class id; unmapped values become ``ignore_label``), ``colors``, ``mask_suffix`` (masks
  named ``<image stem><mask_suffix>``, e.g. ``_mask``), ``recursive`` (false; true: the
  sub-folders too, paired by their path below each root, ``case01/7.png``; ``val_fraction``
  then splits by top-level sub-folder, so that no case has images on both sides).
  ``evaluator_type="sem_seg"``.
* ``coco_panoptic`` (COCO panoptic json + PNG folder): ``image_root``, ``panoptic_root``,
  ``panoptic_json``; optional ``instances_json`` (COCO instances of the same images; derived
  from the PNGs when absent). Registered in the "separated" format Panoptic FPN trains on
  (instance annotations + stuff map with things = 0, stuff = 1..S, plus ``pan_seg_file_name``
  / ``segments_info``), like detectron2's ``register_coco_panoptic_separated``;
  ``evaluator_type="coco_panoptic_seg"``.

Every type also takes ``val_fraction`` (and ``seed``, default 0): the split helper for when
only one set exists. ``<name>_train`` and ``<name>_val`` are then registered besides ``<name>``
(all images); COCO/panoptic splits get their own json files (written once into the dataset
cache, ``$D2SEG_DATASETS`` or ``~/.cache/d2seg``) so that COCO evaluation sees only the split.
Relative paths are relative to the current directory.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import random
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import yaml
from PIL import Image

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..utils.files import umask_mode
from .catalog_utils import unregister
from .cache import build_once, cache_root, file_key
from .errors import DatasetLoadError, guard_load
from .sem_seg_folder import (label_map_problem, list_pairs, pairing_problem,
                             register_sem_seg_folder, sem_seg_metadata)

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetLoadError",
    "DATASET_TYPES",
    "check_register_entries",
    "parse_dataset_spec",
    "register_dataset",
    "register_datasets_from_cfg",
    "split_items",
    "split_coco_json",
]

DATASET_TYPES = ("coco", "sem_seg", "coco_panoptic")
_REQUIRED = {
    "coco": ("json_file", "image_root"),
    "sem_seg": ("image_root", "sem_seg_root", "classes"),
    "coco_panoptic": ("image_root", "panoptic_root", "panoptic_json"),
}
_OPTIONAL = {
    "coco": (),
    "sem_seg": ("ignore_label", "label_map", "colors", "mask_suffix", "recursive"),
    "coco_panoptic": ("instances_json",),
}
_COMMON = ("name", "type", "val_fraction", "seed")
_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json",
              "instances_json")


# ----------------------------------------------------------------------------------------
# spec parsing
# ----------------------------------------------------------------------------------------
def _split_top_level(text: str, sep: str = ",") -> List[str]:
    """Split on ``sep`` outside of [] and {} brackets.

    Raises:
        ValueError: brackets that do not pair up (an unclosed ``[`` swallowed the keys after
            it: ``classes=[a,b,val_fraction=0.3`` made ``val_fraction`` a class name)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"'{text}': a '{ch}' closes no bracket")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"'{text}': {depth} '[' or '{{' not closed")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _scalar(text: str) -> Any:
    text = text.strip()
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(v, (dict, list)) or v is None else v


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(x) for x in _split_top_level(text[1:-1])]
    if text.startswith("{") and text.endswith("}"):
        out = {}
        for item in _split_top_level(text[1:-1]):
            if ":" not in item:
                raise ValueError(f"'{item}' in '{text}' is not a key:value pair")
            k, v = item.split(":", 1)
            out[_scalar(k)] = _scalar(v)
        return out
    return _scalar(text)


def parse_dataset_spec(spec: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """One ``D2SEG.DATASETS.REGISTER`` entry as a validated dict with lower-case keys.

    Args:
        spec: a mapping (YAML form) or a ``"key=value,key=value"`` string (command-line form).

    Returns:
        dict with at least ``name`` and ``type`` and the type's required keys; paths are made
        absolute, ``label_map`` keys/values are ints.

    Raises:
        ValueError: naming the entry and the missing, unknown or malformed key.
    """
    if isinstance(spec, str):
        entry: Dict[str, Any] = {}
        try:
            items = _split_top_level(spec)
        except ValueError as e:
            raise ValueError(f"D2SEG.DATASETS.REGISTER entry {e}") from None
        for item in items:
            if "=" not in item:
                raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{spec}': '{item}' is not "
                                 "key=value")
            k, v = item.split("=", 1)
            entry[k.strip().lower()] = _value(v)
    elif isinstance(spec, Mapping):
        entry = {str(k).lower(): v for k, v in spec.items()}
    else:
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry {spec!r} is neither a mapping nor a "
                         "'key=value,...' string")
    name = entry.get("name")
    if not name:
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry {spec!r}: 'name' is missing")
    kind = entry.get("type")
    if kind not in DATASET_TYPES:
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': type={kind!r} is not one of "
                         f"{DATASET_TYPES}")
    allowed = set(_COMMON) | set(_REQUIRED[kind]) | set(_OPTIONAL[kind])
    unknown = sorted(set(entry) - allowed)
    if unknown:  # before "missing": a misspelt required key is reported as the typo it is
        close = {u: difflib.get_close_matches(u, sorted(allowed), n=1, cutoff=0.5)
                 for u in unknown}
        hints = [f"'{u}' -> '{c[0]}'?" for u, c in close.items() if c]
        hint = f" (did you mean {', '.join(hints)})" if hints else ""
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}' (type {kind}): unknown keys "
                         f"{unknown}{hint}; allowed: {sorted(allowed)}")
    missing = [k for k in _REQUIRED[kind] if entry.get(k) in (None, "", [])]
    if missing:
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}' (type {kind}): missing "
                         f"{missing}; needs {list(_REQUIRED[kind])}")
    given = {}
    for k in _PATH_KEYS:
        if entry.get(k):
            given[k] = str(entry[k])
            entry[k] = os.path.abspath(os.path.expanduser(str(entry[k])))
    entry["_given_paths"] = given  # as written, for error messages
    if kind == "sem_seg":
        classes = entry["classes"]
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",")]
        entry["classes"] = [str(c) for c in classes]
        entry["ignore_label"] = _number(int, entry, "ignore_label", name, 255)
        entry["mask_suffix"] = "" if entry.get("mask_suffix") is None else \
            str(entry["mask_suffix"])
        entry["recursive"] = _flag(entry, "recursive", name)
        lm = entry.get("label_map")
        if lm:
            try:
                entry["label_map"] = {int(k): int(v) for k, v in dict(lm).items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': label_map {lm!r} "
                                 "must map integers to integers") from e
            problem = label_map_problem(entry["label_map"], entry["ignore_label"])
            n = len(entry.get("classes") or [])
            beyond = sorted({(k, v) for k, v in entry["label_map"].items()
                             if n and not 0 <= v < n and v != int(entry["ignore_label"])})
            if not problem and beyond:  # else reported against d2seg's remapped cache copies
                problem = (f"label_map maps {', '.join(f'{k}: {v}' for k, v in beyond[:5])} to "
                           f"class ids outside the {n} classes {list(entry['classes'])} (ids "
                           f"0..{n - 1}, or ignore_label {entry['ignore_label']})")
            if problem:
                raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': {problem}")
    if entry.get("val_fraction") is not None:
        f = _number(float, entry, "val_fraction", name)
        if not 0.0 < f < 1.0:
            raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': val_fraction={f} is not "
                             "in (0, 1)")
        entry["val_fraction"] = f
    entry["seed"] = _number(int, entry, "seed", name, 0)
    return entry


def _flag(entry: Dict[str, Any], key: str, name: str) -> bool:
    """A true / false entry value (YAML booleans, or the words from the command line)."""
    v = entry.get(key, False)
    if isinstance(v, bool):
        return v
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if str(v).strip().lower() not in words:
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': {key}={v!r} must be true or "
                         f"false")
    return words[str(v).strip().lower()]


def _number(kind, entry: Dict[str, Any], key: str, name: str, default: Any = None):
    """``kind(entry[key])``, or an error naming the entry, the key and the value."""
    value = entry.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{name}': {key}={value!r} is not "
                         f"{'an integer' if kind is int else 'a number'}") from None


def registered_names_of_entry(entry: Dict[str, Any]) -> List[str]:
    """The dataset names a parsed entry registers: ``name``, and with ``val_fraction``
    ``name_train`` and ``name_val``."""
    n = entry["name"]
    return [n, f"{n}_train", f"{n}_val"] if entry.get("val_fraction") else [n]


# ----------------------------------------------------------------------------------------
# split helper
# ----------------------------------------------------------------------------------------
def split_items(items: Sequence, val_fraction: float, seed: int = 0) -> Tuple[list, list]:
    """Deterministic random split of ``items`` into (train, val), each in the input order.

    ``round(len * val_fraction)`` items go to val, at least 1 and at most ``len - 1`` when there
    are 2 or more items.
    """
    items = list(items)
    n = len(items)
    n_val = int(round(n * val_fraction))
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val


def _atomic_json(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.chmod(tmp, umask_mode())  # mkstemp's 0600 -> what a plain write would give
    os.replace(tmp, path)


def split_coco_json(json_file: str, val_fraction: float, seed: int = 0,
                    out_dir: Optional[str] = None) -> Tuple[str, str]:
    """Split a COCO (instances or panoptic) json by image into train and val json files.

    Categories and every other top-level field are kept; ``annotations`` follow their image.

    Args:
        json_file: the json holding all images.
        val_fraction: share of images for val (see :func:`split_items`).
        out_dir: where to write ``train.json`` / ``val.json`` (written on every call);
            default a folder of the dataset cache keyed by the input file and the split
            parameters (written once, then reused).

    Returns:
        (train_json, val_json) paths.
    """
    cached = out_dir is None
    if cached:
        key = file_key(json_file, extra=[val_fraction, seed])
        out_dir = os.path.join(cache_root(), "splits", key)
    tr_path, va_path = os.path.join(out_dir, "train.json"), os.path.join(out_dir, "val.json")
    if cached and os.path.isfile(tr_path) and os.path.isfile(va_path):
        return tr_path, va_path
    if os.path.realpath(json_file) in (os.path.realpath(tr_path), os.path.realpath(va_path)):
        raise ValueError(f"{json_file}: splitting it into {out_dir} would overwrite it; give "
                         f"another out_dir")
    with open(json_file) as f:
        data = json.load(f)
    ids = [im["id"] for im in data["images"]]
    tr_ids, va_ids = split_items(ids, val_fraction, seed)
    for ids_, path in ((set(tr_ids), tr_path), (set(va_ids), va_path)):
        part = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        part["images"] = [im for im in data["images"] if im["id"] in ids_]
        part["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in ids_]
        _atomic_json(part, path)
    logger.info(f"Split {json_file}: {len(tr_ids)} train / {len(va_ids)} val images -> {out_dir}")
    return tr_path, va_path


# ----------------------------------------------------------------------------------------
# registration by type
# ----------------------------------------------------------------------------------------
def _register_coco(name: str, json_file: str, image_root: str,
                   source_json_file: Optional[str] = None) -> None:
    """``source_json_file``: the unsplit json a split's ``json_file`` was cut from (its image ids
    are the same); ``tools/predict.py`` reads image ids from it."""
    unregister(name)
    # detectron2's register_coco_instances, also keeping each annotation's "id" so that checks
    # and skipped-annotation warnings can name it
    DatasetCatalog.register(name, lambda: guard_load(
        json_file, load_coco_json, json_file, image_root, name, extra_annotation_keys=["id"]))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="coco",
                                  source_json_file=source_json_file or json_file)
    # thing_classes are known before the first load (predict / visualizers need them)
    with open(json_file) as f:
        data = json.load(f)
    anns = data.get("annotations") or [{}]
    if isinstance(anns[0], dict) and "segments_info" in anns[0]:
        unregister(name)
        raise DatasetLoadError(
            f"{json_file}: a COCO panoptic json (its annotations have 'segments_info'), "
            f"registered as type=coco: register it with type=coco_panoptic (image_root, "
            f"panoptic_root, panoptic_json; docs/own_data.md)")
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    del data
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
    )


def _panoptic_meta(categories: List[dict]) -> Dict[str, Any]:
    """Separated-format metadata (things: 0..T-1; stuff: 0 = "things", 1..S), both in
    category-id order (as detectron2's ``load_coco_json`` numbers the things, whatever the
    json's order)."""
    categories = sorted(categories, key=lambda c: c["id"])
    things = [c for c in categories if c.get("isthing", 1)]
    stuff = [c for c in categories if not c.get("isthing", 1)]
    meta = {
        "thing_classes": [c["name"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_classes": ["things"] + [c["name"] for c in stuff],
        # 0 -> 0: the "things" class of the stuff map, as detectron2's separated COCO metadata
        # (its SemSegEvaluator looks every predicted label up in this map)
        "stuff_dataset_id_to_contiguous_id": {0: 0, **{c["id"]: i + 1 for i, c in
                                                      enumerate(stuff)}},
    }
    if all("color" in c for c in categories):
        meta["thing_colors"] = [tuple(c["color"]) for c in things]
        meta["stuff_colors"] = [(82, 18, 128)] + [tuple(c["color"]) for c in stuff]
    return meta


def _convert_panoptic(panoptic_json: str, panoptic_root: str) -> Tuple[str, str]:
    """Derive (instances json, stuff-map folder) from a COCO panoptic json + PNGs, once.

    Instances: one COCO annotation per "thing" segment (RLE mask from the PNG, the segment's
    bbox, area and iscrowd, original category id). Stuff map: stuff segments -> 1..S in
    category-id order, thing segments -> 0, unlabelled -> 255.
    """
    from panopticapi.utils import rgb2id
    from pycocotools import mask as mask_util

    # "id-order": stuff maps numbered in category-id order (earlier caches: file order)
    key = file_key(panoptic_json, extra=[os.path.abspath(panoptic_root), "id-order"])
    out = os.path.join(cache_root(), "panoptic_separated", key)

    def build(tmp: str) -> None:
        with open(panoptic_json) as f:
            data = json.load(f)
        meta = _panoptic_meta(data["categories"])
        stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
        thing_ids = set(meta["thing_dataset_id_to_contiguous_id"])
        os.makedirs(os.path.join(tmp, "sem_seg"))
        anns = []
        for pan in data["annotations"]:
            png = os.path.join(panoptic_root, pan["file_name"])
            seg = rgb2id(np.asarray(Image.open(png).convert("RGB"), dtype=np.uint32))
            sem = np.full(seg.shape, 255, np.uint8)
            for s in pan["segments_info"]:
                m = seg == s["id"]
                if s["category_id"] in thing_ids:
                    sem[m] = 0
                    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    anns.append({
                        "id": len(anns) + 1, "image_id": pan["image_id"],
                        "category_id": s["category_id"], "segmentation": rle,
                        "area": float(s.get("area", int(m.sum()))), "bbox": list(s["bbox"]),
                        "iscrowd": int(s.get("iscrowd", 0)),
                    })
                elif s["category_id"] in stuff_map:
                    sem[m] = stuff_map[s["category_id"]]
            stem = os.path.splitext(pan["file_name"])[0]
            Image.fromarray(sem).save(os.path.join(tmp, "sem_seg", stem + ".png"))
        inst = {"images": data["images"], "annotations": anns,
                "categories": [c for c in data["categories"] if c.get("isthing", 1)]}
        with open(os.path.join(tmp, "instances.json"), "w") as f:  # last: complete
            json.dump(inst, f)

    # once across processes: every rank of a distributed run registers its datasets
    build_once(out, "instances.json", build)
    return os.path.join(out, "instances.json"), os.path.join(out, "sem_seg")


def _load_panoptic(name: str, image_root: str, panoptic_root: str, panoptic_json: str,
                   instances_json: str, sem_seg_root: str) -> List[dict]:
    with open(panoptic_json) as f:
        data = json.load(f)
    meta = _panoptic_meta(data["categories"])
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    pan = {a["image_id"]: a for a in data["annotations"]}
    dicts = load_coco_json(instances_json, image_root, name)
    out = []
    for d in dicts:
        a = pan.get(d["image_id"])
        if a is None:
            logger.warning(f"{panoptic_json}: image_id {d['image_id']} ({d['file_name']}) has no "
                           "panoptic annotation; left out")
            continue
        d["pan_seg_file_name"] = os.path.join(panoptic_root, a["file_name"])
        d["sem_seg_file_name"] = os.path.join(sem_seg_root,
                                              os.path.splitext(a["file_name"])[0] + ".png")
        segs = copy.deepcopy(a["segments_info"])
        for s in segs:
            s["isthing"] = s["category_id"] in thing_map
            s["category_id"] = (thing_map if s["isthing"] else stuff_map)[s["category_id"]]
        d["segments_info"] = segs
        out.append(d)
    return out


def _register_panoptic(name: str, image_root: str, panoptic_root: str, panoptic_json: str,
                       instances_json: Optional[str],
                       source_json_file: Optional[str] = None) -> None:
    derived_inst, sem_seg_root = _convert_panoptic(panoptic_json, panoptic_root)
    inst = instances_json or derived_inst
    with open(panoptic_json) as f:
        pan = json.load(f)
    meta = _panoptic_meta(pan["categories"])
    if instances_json:
        # keep the split's images and the panoptic json's thing categories of a user-given
        # instances json (a detection-format json may list the stuff categories too)
        ids = {im["id"] for im in pan["images"]}
        things = set(meta["thing_dataset_id_to_contiguous_id"])
        with open(instances_json) as f:
            full = json.load(f)
        cat_ids = {c["id"] for c in full.get("categories", [])}
        lacking = sorted(things - cat_ids)
        if lacking:
            raise ValueError(f"instances_json {instances_json}: lacks the thing categories "
                             f"{lacking} of panoptic_json {panoptic_json}; give the instances "
                             "json of the same dataset, or leave instances_json out (derived "
                             "from the panoptic PNGs)")
        if {im["id"] for im in full["images"]} != ids or cat_ids != things:
            dropped = sum(1 for a in full["annotations"] if a["category_id"] not in things)
            if dropped:
                logger.warning(f"instances_json {instances_json}: {dropped} annotation(s) of "
                               f"categories that are not things in {panoptic_json} left out")
            full["images"] = [im for im in full["images"] if im["id"] in ids]
            full["annotations"] = [a for a in full["annotations"]
                                   if a["image_id"] in ids and a["category_id"] in things]
            full["categories"] = [c for c in full["categories"] if c["id"] in things]
            inst = os.path.join(os.path.dirname(derived_inst),
                                f"instances_{file_key(instances_json, panoptic_json)}.json")
            _atomic_json(full, inst)
    unregister(name)
    DatasetCatalog.register(name, lambda: guard_load(
        panoptic_json, _load_panoptic, name, image_root, panoptic_root, panoptic_json, inst,
        sem_seg_root))
    MetadataCatalog.get(name).set(
        image_root=image_root, panoptic_root=panoptic_root, panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_root, json_file=inst, evaluator_type="coco_panoptic_seg",
        source_json_file=source_json_file or panoptic_json,
        ignore_label=255, label_divisor=1000, **meta,
    )


def register_dataset(spec: Union[str, Mapping[str, Any]],
                     data_optional: bool = False) -> List[str]:
    """Register one dataset described by a ``D2SEG.DATASETS.REGISTER`` entry.

    Args:
        data_optional: where the entry's files are not on this machine (predicting or
            exporting with a training run's config elsewhere), register what the entry itself
            says (a ``sem_seg`` entry's class names, colours and ignore label) with a warning,
            instead of raising; loading such a dataset then raises a
            :class:`~d2seg.data.errors.DatasetLoadError` that says why.

    Returns:
        The names registered: ``[name]``, plus ``name_train`` and ``name_val`` with
        ``val_fraction``.
    """
    e = parse_dataset_spec(spec)
    name, kind, frac = e["name"], e["type"], e.get("val_fraction")
    try:
        _check_paths(e)
    except FileNotFoundError as err:
        if not data_optional:
            raise
        return _register_without_data(e, str(err))
    main_file = {"coco": "json_file", "sem_seg": "sem_seg_root", "coco_panoptic": "panoptic_json"}
    guard_load(e[main_file[kind]], _register_entry, e)
    names = [name] + ([f"{name}_train", f"{name}_val"] if frac else [])
    if kind == "sem_seg" and e.get("label_map"):
        for n in names:  # lets the checker report raw values the map leaves out
            MetadataCatalog.get(n).set(label_map=dict(e["label_map"]))
    logger.info(f"Registered {kind} dataset(s) {names} from D2SEG.DATASETS.REGISTER")
    return names


def _register_without_data(e: Dict[str, Any], why: str) -> List[str]:
    """An entry whose files are missing, for a tool that needs only its metadata."""
    from .errors import DatasetLoadError

    names = registered_names_of_entry(e)
    meta = sem_seg_metadata(e["classes"], e["ignore_label"], e.get("colors")) \
        if e["type"] == "sem_seg" else {}

    def missing(name: str):
        def load():
            raise DatasetLoadError(f"dataset '{name}' has no data on this machine: {why}")
        return load

    for n in names:
        unregister(n)
        DatasetCatalog.register(n, missing(n))
        MetadataCatalog.get(n).set(**meta)
    what = f"its class names {meta['stuff_classes']}" if meta.get("stuff_classes") else \
        ("no class names and no category ids (a COCO entry takes them from its json): "
         "predictions name classes 'class 0', ... and their category_id is the model's "
         "0-based class index, not the json's id")
    logger.warning(f"{why}; registered {names} without data, with {what}")
    return names


def _check_paths(e: Dict[str, Any]) -> None:
    """FileNotFoundError naming the entry, the key, the value as written and, for a relative
    one, the working directory it was resolved against."""
    for k in _PATH_KEYS:
        if e.get(k) and not os.path.exists(e[k]):
            given = e.get("_given_paths", {}).get(k, e[k])
            where = "" if os.path.isabs(os.path.expanduser(given)) else \
                f" (relative paths resolve against the working directory {os.getcwd()})"
            raise FileNotFoundError(f"D2SEG.DATASETS.REGISTER entry '{e['name']}': {k} "
                                    f"'{given}' does not exist: {e[k]}{where}")


def check_register_entries(cfg: CfgNode, config_file: str = "",
                           dataset_keys: Sequence[str] = (), data_optional: bool = False) -> None:
    """Parse every ``D2SEG.DATASETS.REGISTER`` entry and check its paths, without registering:
    what the command-line tools run before they start, so that a bad entry fails in one line.
    The dataset names under ``dataset_keys`` (e.g. "DATASETS.TRAIN") must be registered
    (builtins and the shapes catalogs are, on import) or be registered by an entry (with close
    matches in the error).

    ``data_optional``: missing files are no error (predict / export, which register such an
    entry without data: :func:`register_dataset`).

    Raises:
        d2seg.config.ConfigError: naming the config file, the entry, the key and the value.
    """
    from ..config import ConfigError

    where = f"{config_file} (or the command line)" if config_file else "command line"
    names = set(DatasetCatalog.list())
    for spec in cfg.D2SEG.DATASETS.REGISTER:
        try:
            entry = parse_dataset_spec(spec)
            try:
                _check_paths(entry)
            except FileNotFoundError:
                if not data_optional:
                    raise
                names.update(registered_names_of_entry(entry))
                continue
            problem = pairing_problem(entry["image_root"], entry["sem_seg_root"],
                                      entry["mask_suffix"], entry["recursive"]) \
                if entry["type"] == "sem_seg" else None
            if problem:
                raise ValueError(f"D2SEG.DATASETS.REGISTER entry '{entry['name']}': {problem}")
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{where}: {err}") from err
        names.update(registered_names_of_entry(entry))
    for key in dataset_keys:
        for n in cfg.DATASETS[key.split(".")[1]]:
            if n not in names:
                raise ConfigError(f"{where}: {key}: {not_registered(n, names)}")


def not_registered(name: str, names: Iterable[str]) -> str:
    """"dataset 'name' is not registered", with the closest of ``names`` or how to register."""
    names = sorted(names)
    for split in ("_train", "_val"):
        base = name[: -len(split)]
        if name.endswith(split) and base in names:
            return (f"dataset '{name}' is not registered: '{base}' is, and '{base}_train' / "
                    f"'{base}_val' exist only where its D2SEG.DATASETS.REGISTER entry has "
                    f"val_fraction")
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        ("; register it with D2SEG.DATASETS.REGISTER (docs/own_data.md) or detectron2's "
         "DatasetCatalog")
    return f"dataset '{name}' is not registered{hint}"


def _register_entry(e: Dict[str, Any]) -> None:
    name, kind, frac, seed = e["name"], e["type"], e.get("val_fraction"), e["seed"]
    if kind == "coco":
        _register_coco(name, e["json_file"], e["image_root"])
        if frac:
            tr, va = split_coco_json(e["json_file"], frac, seed)
            _register_coco(f"{name}_train", tr, e["image_root"], e["json_file"])
            _register_coco(f"{name}_val", va, e["image_root"], e["json_file"])
    elif kind == "sem_seg":
        kw = dict(classes=e["classes"], ignore_label=e["ignore_label"],
                  label_map=e.get("label_map"), colors=e.get("colors"),
                  mask_suffix=e["mask_suffix"], recursive=e["recursive"])
        images, masks = list_pairs(e["image_root"], e["sem_seg_root"], e["mask_suffix"],
                                   e["recursive"])
        stems = [s for s in images if s in masks]
        if not stems:  # an empty dataset (and empty splits) would only fail later
            raise ValueError(pairing_problem(e["image_root"], e["sem_seg_root"],
                                             e["mask_suffix"], e["recursive"]))
        register_sem_seg_folder(name, e["image_root"], e["sem_seg_root"], **kw)
        if frac:
            if e["recursive"]:  # whole sub-folders (cases, patients) to one side
                groups: Dict[str, List[str]] = {}
                for s in stems:
                    groups.setdefault(s.split("/", 1)[0], []).append(s)
                tr_g, va_g = split_items(list(groups), frac, seed)
                tr = [s for g in tr_g for s in groups[g]]
                va = [s for g in va_g for s in groups[g]]
            else:
                tr, va = split_items(stems, frac, seed)
            register_sem_seg_folder(f"{name}_train", e["image_root"], e["sem_seg_root"],
                                    stems=tr, **kw)
            register_sem_seg_folder(f"{name}_val", e["image_root"], e["sem_seg_root"],
                                    stems=va, **kw)
    else:
        args = (e["image_root"], e["panoptic_root"])
        _register_panoptic(name, *args, e["panoptic_json"], e.get("instances_json"))
        if frac:
            tr, va = split_coco_json(e["panoptic_json"], frac, seed)
            _register_panoptic(f"{name}_train", *args, tr, e.get("instances_json"),
                               e["panoptic_json"])
            _register_panoptic(f"{name}_val", *args, va, e.get("instances_json"),
                               e["panoptic_json"])


def register_datasets_from_cfg(cfg: CfgNode, data_optional: bool = False) -> List[str]:
    """Register every entry of ``cfg.D2SEG.DATASETS.REGISTER``; returns all names registered.
    ``data_optional``: see :func:`register_dataset`."""
    names: List[str] = []
    for spec in cfg.D2SEG.DATASETS.REGISTER:
        names += register_dataset(spec, data_optional=data_optional)
    return names
