"""Synthetic "shapes" scenes for instance, semantic and panoptic segmentation.

Every image shows two *stuff* regions ("water": smooth colour blobs, "sand": oriented stripes
and grain) split by a wavy random boundary, and up to ``max_objects`` overlapping *things*
("circle", "triangle", "rectangle") of random size, colour, rotation, aspect and texture, drawn
back to front so that later ones occlude earlier ones. Colours are drawn independently of the
class, so a model has to recognise shape and texture, not colour. Gaussian noise covers all.

One generation writes, for one split, everything the three catalogs need::

    <cache>/shapes/<split>_n<N>_s<SIZE>_<hash>/
        images/000000.jpg            RGB image
        sem_seg/000000.png           uint8 class map: 0 water, 1 sand, 2 circle, 3 triangle,
                                     4 rectangle; 255 (ignore) on a thin band at thing borders
        panoptic/000000.png          COCO-panoptic id PNG (id = R + 256 G + 256^2 B)
        panoptic_sem_seg/000000.png  "separated" stuff map for Panoptic FPN: 0 = any thing,
                                     1 water, 2 sand
        instances.json               COCO instances (polygons), category ids 1..3
        panoptic.json                COCO panoptic (segments_info), category ids 1..5
        params.json                  the parameters; written last

Generation is deterministic (image ``i`` depends only on the seed, the split and ``i``), runs
on first use, writes into a temporary folder renamed into place only when complete (a crash
never leaves a half-written cache), and is serialised across processes by a file lock. The
folder name carries a hash of every parameter, so changing one regenerates.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from .cache import build_once, cache_root

logger = logging.getLogger(__name__)

__all__ = [
    "ShapesParams",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "SEM_SEG_CLASSES",
    "generate_shapes",
    "shapes_cache_root",
    "render_scene",
]

GENERATOR_VERSION = 1

THING_CLASSES: List[str] = ["circle", "triangle", "rectangle"]
STUFF_CLASSES: List[str] = ["water", "sand"]
# Classes of the semantic catalog, in label order.
SEM_SEG_CLASSES: List[str] = STUFF_CLASSES + THING_CLASSES
THING_COLORS: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 160, 80), (255, 180, 0)]
STUFF_COLORS: List[Tuple[int, int, int]] = [(30, 90, 200), (190, 160, 110)]
# COCO category ids: things first, then stuff.
THING_IDS: List[int] = [1, 2, 3]
STUFF_IDS: List[int] = [4, 5]
IGNORE_LABEL = 255


@dataclass(frozen=True)
class ShapesParams:
    """Everything that determines a split's content (and so its cache folder)."""

    split: str = "train"
    num_images: int = 1000
    image_size: int = 256
    max_objects: int = 6
    min_objects: int = 2
    seed: int = 0
    ignore_border: int = 1  # width (px) of the ignore band at thing borders in sem_seg/

    def key(self) -> str:
        d = asdict(self)
        d["version"] = GENERATOR_VERSION
        h = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.split}_n{self.num_images}_s{self.image_size}_{h}"

    def split_seed(self) -> int:
        # train and val of one seed never share an image
        return int(hashlib.sha1(f"{self.seed}/{self.split}".encode()).hexdigest()[:8], 16)


def shapes_cache_root() -> str:
    """``$D2SEG_DATASETS`` if set, else ``~/.cache/d2seg``."""
    return os.path.join(cache_root(), "shapes")


# ------------------------------------------------------------------------------------------
# scene rendering
# ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], shape (size, size, channels)."""
    small = rng.random((cells, cells, channels)).astype(np.float32)
    big = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(big.reshape(size, size, channels), 0.0, 1.0)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(90, 256), rng.integers(90, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    """Textured two-region background. Returns (image float32 HxWx3, stuff map uint8 HxW)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # wavy boundary through a random point at a random angle
    theta = rng.uniform(0, np.pi)
    nx, ny = np.cos(theta), np.sin(theta)
    c = rng.uniform(0.3, 0.7) * s
    amp, freq, phase = rng.uniform(0.02, 0.1) * s, rng.uniform(1, 3) * 2 * np.pi / s, rng.uniform(
        0, 2 * np.pi
    )
    along = -ny * (xx - s / 2) + nx * (yy - s / 2)
    dist = nx * (xx - s / 2) + ny * (yy - s / 2) + s / 2 - c + amp * np.sin(freq * along + phase)
    sand = dist > 0
    stuff = sand.astype(np.uint8)  # 0 water, 1 sand

    # water: smooth blobs around a random hue
    base_w = _random_color(rng)
    water = base_w * (0.55 + 0.6 * _smooth_noise(rng, s, int(rng.integers(3, 7)), 1))
    water += 40 * (_smooth_noise(rng, s, 6, 3) - 0.5)
    # sand: oriented stripes + grain around another hue
    base_s = _random_color(rng)
    phi = rng.uniform(0, np.pi)
    period = rng.uniform(5, 12)
    stripes = 0.5 + 0.5 * np.sin((np.cos(phi) * xx + np.sin(phi) * yy) * 2 * np.pi / period)
    sand_img = base_s * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 18, (s, s, 1))
    img = np.where(sand[..., None], sand_img, water)
    return img.astype(np.float32), stuff


def _shape_polygon(rng: np.random.Generator, cls: int, s: int) -> Tuple[str, object]:
    """A random shape of class ``cls``: ("circle", (cx, cy, r)) or ("poly", Nx2 int32)."""
    size = rng.uniform(0.09, 0.3) * s  # half-extent
    cx, cy = rng.uniform(0.05, 0.95, size=2) * s
    if cls == 0:  # circle
        return "circle", (int(round(cx)), int(round(cy)), max(3, int(round(size * 0.8))))
    rot = rng.uniform(0, 2 * np.pi)
    if cls == 1:  # triangle: perturbed equilateral
        angles = rot + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([np.cos(angles), np.sin(angles)], 1) * size
    else:  # rectangle of random aspect
        w, h = size, size * rng.uniform(0.35, 1.0)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        r = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        pts = corners @ r.T
    pts = np.round(pts + [cx, cy]).astype(np.int32)
    return "poly", pts


def _draw_mask(shape: Tuple[str, object], s: int) -> np.ndarray:
    m = np.zeros((s, s), np.uint8)
    kind, geo = shape
    if kind == "circle":
        cx, cy, r = geo
        cv2.circle(m, (cx, cy), r, 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(m, [geo], 1, lineType=cv2.LINE_8)
    return m.astype(bool)


def _has_hole(mask: np.ndarray) -> bool:
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def render_scene(
    rng: np.random.Generator, size: int, min_objects: int, max_objects: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[int]]:
    """Render one scene.

    Returns:
        image: uint8 (H, W, 3) RGB.
        stuff: uint8 (H, W), 0 water / 1 sand.
        inst: uint8 (H, W), 0 = no thing, k = the k-th object (1-based) in ``classes``.
        classes: thing class index (0..2) of each object, back to front.
    """
    img, stuff = _background(rng, size)
    n_target = int(rng.integers(min(min_objects, max_objects), max_objects + 1))
    full_masks: List[np.ndarray] = []
    classes: List[int] = []
    inst = np.zeros((size, size), np.uint8)
    for _ in range(n_target * 6):  # bounded retries
        if len(classes) >= n_target:
            break
        cls = int(rng.integers(0, len(THING_CLASSES)))
        m = _draw_mask(_shape_polygon(rng, cls, size), size)
        if m.sum() < 40:
            continue
        cand = inst.copy()
        cand[m] = len(classes) + 1
        # keep every earlier object mostly visible, in one piece without holes
        ok = True
        for k, fm in enumerate(full_masks, start=1):
            vis = cand == k
            if vis.sum() < 0.45 * fm.sum() or _has_hole(vis):
                ok = False
                break
        if not ok:
            continue
        inst = cand
        full_masks.append(m)
        classes.append(cls)

    # paint things: flat colour with a soft gradient and texture
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for k, cls in enumerate(classes, start=1):
        vis = inst == k
        col = _random_color(rng)
        g = rng.normal(size=2)
        grad = (g[0] * xx + g[1] * yy) / size * 40
        tex = col + grad[..., None]
        if rng.random() < 0.5:
            tex = tex + 30 * (_smooth_noise(rng, size, 10, 1) - 0.5)
        img[vis] = tex[vis]
        if rng.random() < 0.5:  # dark outline on some objects
            edge = vis & ~cv2.erode(vis.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            img[edge] *= 0.4
    img = img + rng.normal(0, rng.uniform(4, 14), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), stuff, inst, classes


# ------------------------------------------------------------------------------------------
# annotations
# ------------------------------------------------------------------------------------------
def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polys = []
    for c in contours:
        c = c.reshape(-1, 2).astype(np.float64) + 0.5  # pixel centres
        if len(c) >= 3:
            polys.append([round(float(v), 2) for v in c.reshape(-1)])
    return polys


def _bbox_xywh(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _id2rgb(id_map: np.ndarray) -> np.ndarray:
    rgb = np.zeros(id_map.shape + (3,), np.uint8)
    v = id_map.astype(np.uint32)
    for i in range(3):
        rgb[..., i] = v % 256
        v = v // 256
    return rgb


def _make_one(args: Tuple[ShapesParams, int, str]) -> Dict:
    p, idx, out = args
    rng = np.random.default_rng([p.split_seed(), idx])
    s = p.image_size
    image, stuff, inst, classes = render_scene(rng, s, p.min_objects, p.max_objects)
    stem = f"{idx:06d}"
    cv2.imwrite(
        os.path.join(out, "images", stem + ".jpg"),
        image[..., ::-1],
        [cv2.IMWRITE_JPEG_QUALITY, 92],
    )
    # semantic map: stuff 0/1, things 2..4, ignore band at thing borders
    sem = stuff.copy()
    thing_px = inst > 0
    cls_lut = np.array([0] + [c + len(STUFF_CLASSES) for c in classes], np.uint8)
    sem[thing_px] = cls_lut[inst[thing_px]]
    if p.ignore_border > 0:
        k = np.ones((2 * p.ignore_border + 1,) * 2, np.uint8)
        # a border is where the object id changes and at least one side is a thing
        border = cv2.dilate(inst, k) != cv2.erode(inst, k)
        sem[border] = IGNORE_LABEL
    cv2.imwrite(os.path.join(out, "sem_seg", stem + ".png"), sem)
    # separated stuff map for Panoptic FPN: 0 = things, 1.. stuff
    sep = np.where(thing_px, 0, stuff + 1).astype(np.uint8)
    cv2.imwrite(os.path.join(out, "panoptic_sem_seg", stem + ".png"), sep)

    image_id = idx
    annos, segments = [], []
    pan = np.zeros((s, s), np.uint32)
    for j, sid in enumerate(STUFF_IDS):
        m = (stuff == j) & ~thing_px
        if m.any():
            seg_id = sid  # stuff segment ids 4, 5; things get 1000 * cat + k
            pan[m] = seg_id
            segments.append(
                {"id": int(seg_id), "category_id": sid, "iscrowd": 0,
                 "bbox": _bbox_xywh(m), "area": int(m.sum())}
            )
    for k, cls in enumerate(classes, start=1):
        m = inst == k
        polys = _mask_to_polygons(m)
        if not polys:
            continue
        cat = THING_IDS[cls]
        bbox = _bbox_xywh(m)
        area = int(m.sum())
        annos.append(
            {"image_id": image_id, "category_id": cat, "segmentation": polys,
             "area": area, "bbox": bbox, "iscrowd": 0}
        )
        seg_id = 1000 * cat + k
        pan[m] = seg_id
        segments.append(
            {"id": seg_id, "category_id": cat, "iscrowd": 0, "bbox": bbox, "area": area}
        )
    cv2.imwrite(os.path.join(out, "panoptic", stem + ".png"), _id2rgb(pan)[..., ::-1])
    return {
        "image": {"id": image_id, "file_name": stem + ".jpg", "height": s, "width": s},
        "annotations": annos,
        "panoptic": {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments},
    }


def _categories() -> Tuple[List[Dict], List[Dict]]:
    things = [
        {"id": i, "name": n, "supercategory": "shape", "isthing": 1, "color": list(c)}
        for i, n, c in zip(THING_IDS, THING_CLASSES, THING_COLORS)
    ]
    stuff = [
        {"id": i, "name": n, "supercategory": "ground", "isthing": 0, "color": list(c)}
        for i, n, c in zip(STUFF_IDS, STUFF_CLASSES, STUFF_COLORS)
    ]
    return things, stuff


def generate_shapes(params: ShapesParams, root: Optional[str] = None, workers: int = 0) -> str:
    """Generate one split if its cache folder does not exist yet; return the folder.

    Args:
        params: what to generate.
        root: cache root; default :func:`shapes_cache_root`.
        workers: processes to use; 0 = ``min(4, os.cpu_count())``.
    """
    root = root or shapes_cache_root()
    folder = os.path.join(root, params.key())

    def build(tmp: str) -> None:
        for sub in ("images", "sem_seg", "panoptic", "panoptic_sem_seg"):
            os.makedirs(os.path.join(tmp, sub))
        logger.info(
            f"Generating {params.num_images} shapes images ({params.split}, "
            f"{params.image_size}px) into {folder} ..."
        )
        jobs = [(params, i, tmp) for i in range(params.num_images)]
        n = workers or min(4, os.cpu_count() or 1)
        if n > 1 and params.num_images >= 16:
            with get_context("fork").Pool(n) as pool:
                results = pool.map(_make_one, jobs, chunksize=16)
        else:
            results = [_make_one(j) for j in jobs]
        things, stuff = _categories()
        images = [r["image"] for r in results]
        annos = []
        for r in results:
            for a in r["annotations"]:
                a["id"] = len(annos) + 1
                annos.append(a)
        info = {"description": "d2seg synthetic shapes", "params": asdict(params)}
        with open(os.path.join(tmp, "instances.json"), "w") as f:
            json.dump(
                {"info": info, "images": images, "annotations": annos,
                 "categories": things, "licenses": []}, f
            )
        with open(os.path.join(tmp, "panoptic.json"), "w") as f:
            json.dump(
                {"info": info, "images": images,
                 "annotations": [r["panoptic"] for r in results],
                 "categories": things + stuff, "licenses": []}, f
            )
        with open(os.path.join(tmp, "params.json"), "w") as f:  # last: the folder is complete
            json.dump({**asdict(params), "version": GENERATOR_VERSION}, f)

    return build_once(folder, "params.json", build)
