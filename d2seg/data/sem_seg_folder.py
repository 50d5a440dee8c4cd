"""Semantic segmentation datasets stored as an image folder plus a mask folder.

Masks are matched to images by file stem (``img/12.png`` <-> ``mask/12.png``). When the raw
mask values are not already class ids (e.g. 0/255 masks), ``label_map`` remaps them: the
remapped masks are written once into a cache folder (keyed by a hash of the inputs) so that
every detectron2 component (``DatasetMapper``, ``SemSegEvaluator``) reads class ids directly.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from .cache import build_once, cache_root, file_key
from .catalog_utils import unregister
from .errors import guard_load
from .image_io import image_size, read_sem_seg

logger = logging.getLogger(__name__)

__all__ = ["load_sem_seg_folder", "register_sem_seg_folder", "list_pairs", "guess_mask_suffix",
           "label_map_problem"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _list_by_stem(folder: str, recursive: bool = False) -> Dict[str, str]:
    """Image files of ``folder`` by stem; ``recursive``: of its sub-folders too, the stem then
    being the path below ``folder`` without the extension ("case01/slice007")."""
    out = {}
    pattern = os.path.join(folder, "**", "*") if recursive else os.path.join(folder, "*")
    for p in sorted(glob.glob(pattern, recursive=recursive)):
        stem, ext = os.path.splitext(os.path.relpath(p, folder) if recursive else
                                     os.path.basename(p))
        if ext.lower() in IMAGE_EXTS and os.path.isfile(p):
            out[stem.replace(os.sep, "/")] = p
    return out


def list_pairs(image_dir: str, mask_dir: str, mask_suffix: str = "",
               recursive: bool = False) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(images by stem, masks by the image stem they belong to): what
    :func:`load_sem_seg_folder` pairs. With ``mask_suffix`` a mask named ``<stem><suffix>``
    belongs to ``<stem>``; when images and masks share one folder, the files named so are the
    masks and the others the images. ``recursive``: sub-folders too, paired by their path
    below the two roots (``image_root/case01/7.png`` <-> ``sem_seg_root/case01/7.png``)."""
    images = _list_by_stem(image_dir, recursive)
    if not mask_suffix:
        return images, _list_by_stem(mask_dir, recursive)
    n, raw = len(mask_suffix), _list_by_stem(mask_dir, recursive)
    named = {s: p for s, p in raw.items() if s.endswith(mask_suffix) and len(s) > n}
    if os.path.realpath(image_dir) == os.path.realpath(mask_dir):
        images = {s: p for s, p in images.items() if s not in named}
        others: Dict[str, str] = {}
    else:  # masks without the suffix keep their stem (reported as unpaired by the checker)
        others = {s: p for s, p in raw.items() if s not in named}
    return images, {**others, **{s[:-n]: p for s, p in named.items()}}


def guess_mask_suffix(image_stems: Iterable[str], mask_stems: Iterable[str]) -> Optional[str]:
    """The ``suffix`` for which mask stem = image stem + suffix holds for at least half of the
    masks (the most such masks), e.g. "_mask" for ``12.png`` / ``12_mask.png``; else None."""
    images, masks = set(image_stems), list(mask_stems)
    counts: collections.Counter = collections.Counter()
    for m in masks:
        counts.update({m[k:] for k in range(1, len(m)) if m[:k] in images})
    if not counts:
        return None
    suffix, n = counts.most_common(1)[0]
    return suffix if 2 * n >= len(masks) else None


def _self_paired(image_dir: str, mask_dir: str, suffix: str) -> bool:
    """One folder for images and masks without a ``suffix``: every file would pair with
    itself."""
    return not suffix and os.path.realpath(image_dir) == os.path.realpath(mask_dir)


def pairing_problem(image_dir: str, mask_dir: str, suffix: str = "",
                    recursive: bool = False) -> Optional[str]:
    """Why no image of ``image_dir`` pairs with a mask of ``mask_dir`` (None when some do):
    the counts, an example of each side and, when the masks carry a common suffix, the
    ``mask_suffix`` that pairs them. One folder for both without ``suffix`` is a problem too:
    every file would pair with itself."""
    if _self_paired(image_dir, mask_dir, suffix):
        stems = list(_list_by_stem(image_dir, recursive))
        guess = guess_mask_suffix(stems, stems)
        return (f"images and masks are in one folder ({image_dir}) but no mask_suffix is set, "
                f"so every file would pair with itself; set mask_suffix="
                f"{guess or '<suffix of the mask names>'} (a D2SEG.DATASETS.REGISTER key, and "
                f"register_sem_seg_folder's argument), e.g. _mask for 12.png / 12_mask.png")
    images, masks = list_pairs(image_dir, mask_dir, suffix, recursive)
    if set(images) & set(masks):
        return None
    msg = (f"{len(images)} images in {image_dir} and {len(masks)} masks in {mask_dir} share no "
           f"file stem (images are paired with masks by stem")
    msg += f" after removing mask_suffix '{suffix}')" if suffix else ")"
    if images and masks:
        msg += f", e.g. image '{next(iter(images))}', mask '{next(iter(masks))}'"
    guess = guess_mask_suffix(images, _list_by_stem(mask_dir, recursive)) \
        if images and masks else None
    if guess and guess != suffix:
        msg += (f"; the masks are named <image stem>{guess}: set mask_suffix={guess} (a "
                f"D2SEG.DATASETS.REGISTER key, and register_sem_seg_folder's argument)")
    elif not recursive and (not images or not masks) and \
            list_pairs(image_dir, mask_dir, suffix, recursive=True)[0]:
        msg += ("; the files are in sub-folders: set recursive=true to pair them by their path "
                "below each folder (a D2SEG.DATASETS.REGISTER key, and "
                "register_sem_seg_folder's argument)")
    return msg


def _remap_cache_dir(mask_files: List[str], label_map: Dict[int, int], ignore_label: int) -> str:
    key = file_key(*mask_files, extra=[sorted(label_map.items()), ignore_label])
    return os.path.join(cache_root(), "remapped_masks", key)


def label_map_problem(label_map: Dict[int, int], ignore_label: int) -> str:
    """Why ``label_map`` / ``ignore_label`` cannot be written as the 8-bit remapped label maps
    ("" when they can): the class ids and the ignore label must lie in 0-255."""
    bad = sorted({int(v) for v in label_map.values() if not 0 <= int(v) <= 255})
    if bad:
        return (f"label_map maps to class ids {bad[:5]} outside 0-255 (the remapped label maps "
                f"are 8-bit)")
    if not 0 <= int(ignore_label) <= 255:
        return (f"ignore_label={ignore_label} is outside 0-255 (with a label_map, the remapped "
                f"label maps are 8-bit)")
    return ""


def _remap_masks(mask_files: List[str], label_map: Dict[int, int], ignore_label: int) -> List[str]:
    """Write remapped copies of ``mask_files`` (raw value -> class id; unmapped -> ignore)."""
    problem = label_map_problem(label_map, ignore_label)
    if problem:
        raise ValueError(problem)
    out_dir = _remap_cache_dir(mask_files, label_map, ignore_label)
    names = [os.path.splitext(os.path.basename(p))[0] for p in mask_files]
    if len(set(names)) < len(names):  # one name in several sub-folders (recursive)
        names = [f"{i:06d}_{n}" for i, n in enumerate(names)]
    outs = [os.path.join(out_dir, n + ".png") for n in names]
    lut = np.full(256, ignore_label, np.uint8)
    for raw, cls in label_map.items():
        if 0 <= int(raw) <= 255:
            lut[int(raw)] = int(cls)

    def build(tmp: str) -> None:
        for src, dst in zip(mask_files, outs):
            m = read_sem_seg(src)
            if m.dtype == np.uint8:
                out = lut[m]
            else:  # 16/32-bit raw values: one comparison per mapped value
                out = np.full(m.shape, ignore_label, np.uint8)
                for raw, cls in label_map.items():
                    out[m == int(raw)] = int(cls)
            Image.fromarray(out).save(os.path.join(tmp, os.path.basename(dst)))
        open(os.path.join(tmp, "done"), "w").close()

    build_once(out_dir, "done", build)  # once across processes (file lock, atomic rename)
    return outs


def load_sem_seg_folder(
    image_dir: str,
    mask_dir: str,
    label_map: Optional[Dict[int, int]] = None,
    ignore_label: int = 255,
    stems: Optional[Sequence[str]] = None,
    mask_suffix: str = "",
    recursive: bool = False,
) -> List[dict]:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``, ``height``, ``width``, ``image_id``).

    ``height``/``width`` are read from each image's header; they are left out for an image
    whose header cannot be read (the dataset checker and the mapper then name the file).

    Args:
        image_dir, mask_dir: folders; files are paired by stem.
        label_map: raw mask value -> class id; values absent from it become ``ignore_label``.
            None: mask values are class ids already.
        stems: keep only these stems, in this order (e.g. a train/val split).
        mask_suffix: masks are named ``<image stem><mask_suffix>`` (e.g. "_mask" for
            ``12.png`` / ``12_mask.png``); "" = the same stem.
        recursive: also the sub-folders of both, paired by the path below each folder
            ("case01/slice007", also the ``image_id``).

    Raises:
        FileNotFoundError: no image in ``image_dir``; ValueError: no image pairs with a mask
            (the message says why and, when the masks share a suffix, which ``mask_suffix``).
    """
    images, masks = list_pairs(image_dir, mask_dir, mask_suffix, recursive)
    if not images:
        where = f"{image_dir} or its sub-folders" if recursive else image_dir
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) in {where}")
    if _self_paired(image_dir, mask_dir, mask_suffix):
        raise ValueError(pairing_problem(image_dir, mask_dir, recursive=recursive))
    if stems is None:
        stems = [s for s in images if s in masks]
        if not stems:
            raise ValueError(pairing_problem(image_dir, mask_dir, mask_suffix, recursive))
        missing = sorted(set(images) - set(masks))
        if missing:
            logger.warning(f"{len(missing)} images in {image_dir} have no mask in {mask_dir}, "
                           f"e.g. {missing[:3]}; they are left out")
        orphans = sorted(set(masks) - set(images))
        if orphans:
            logger.warning(f"{len(orphans)} masks in {mask_dir} have no image in {image_dir}, "
                           f"e.g. {orphans[:3]}; they are left out")
    else:
        stems = [str(s) for s in stems]
        for s in stems:
            if s not in images or s not in masks:
                raise FileNotFoundError(f"'{s}': image or mask missing in {image_dir} / {mask_dir}")
    mask_files = [masks[s] for s in stems]
    if label_map:
        mask_files = _remap_masks(mask_files, label_map, ignore_label)
    dicts = []
    for s, m in zip(stems, mask_files):
        d = {"file_name": images[s], "sem_seg_file_name": m, "image_id": s}
        try:  # the header only; a corrupt image is reported by the checker / mapper by name
            d["height"], d["width"] = image_size(images[s])  # as read: EXIF rotation applied
        except Exception as e:  # noqa: BLE001
            logger.warning(f"{images[s]}: cannot read the image size ({type(e).__name__}: {e})")
        dicts.append(d)
    return dicts


def sem_seg_metadata(classes: Sequence[str], ignore_label: int = 255,
                     colors: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, Any]:
    """The metadata a semantic dataset's class list gives (names, ignore label, colours,
    ``evaluator_type="sem_seg"``), with or without its files."""
    meta: Dict[str, Any] = dict(stuff_classes=list(classes), ignore_label=ignore_label,
                                evaluator_type="sem_seg")
    if colors:
        meta["stuff_colors"] = [tuple(c) for c in colors]
    return meta


def register_sem_seg_folder(
    name: str,
    image_dir: str,
    mask_dir: str,
    classes: Sequence[str],
    ignore_label: int = 255,
    label_map: Optional[Dict[int, int]] = None,
    stems: Optional[Sequence[str]] = None,
    colors: Optional[Sequence[Sequence[int]]] = None,
    mask_suffix: str = "",
    recursive: bool = False,
) -> None:
    """Register a mask-folder dataset under ``name`` (``evaluator_type="sem_seg"``); the
    arguments are :func:`load_sem_seg_folder`'s."""
    unregister(name)
    DatasetCatalog.register(name, lambda: guard_load(
        mask_dir, load_sem_seg_folder, image_dir, mask_dir, label_map, ignore_label, stems,
        mask_suffix, recursive))
    meta = dict(sem_seg_metadata(classes, ignore_label, colors), image_root=image_dir,
                sem_seg_root=mask_dir, mask_suffix=mask_suffix, recursive=bool(recursive))
    if label_map:
        meta["label_map"] = {int(k): int(v) for k, v in label_map.items()}
    MetadataCatalog.get(name).set(**meta)
