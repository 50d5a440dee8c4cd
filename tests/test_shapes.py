"""The synthetic shapes catalogs: determinism, annotation consistency, cache safety."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

import d2seg  # noqa: F401
from d2seg.data import shapes as shapes_mod
from d2seg.data.catalogs import register_shapes_catalogs
from d2seg.data.shapes import ShapesParams, generate_shapes


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    p = ShapesParams(split="val", num_images=24, image_size=128, max_objects=6, seed=3)
    return p, generate_shapes(p, root), root


def test_deterministic_and_independent_of_workers(small, tmp_path):
    p, folder, _ = small
    again = generate_shapes(p, str(tmp_path), workers=1)  # serial this time
    for sub in ("images", "sem_seg", "panoptic", "panoptic_sem_seg"):
        a, b = os.path.join(folder, sub), os.path.join(again, sub)
        names = sorted(os.listdir(a))
        assert names == sorted(os.listdir(b)) and len(names) == 24
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        assert not mismatch and not errors
    for js in ("instances.json", "panoptic.json"):
        assert json.load(open(os.path.join(folder, js))) == json.load(open(os.path.join(again, js)))


def test_train_and_val_differ(tmp_path):
    a = generate_shapes(ShapesParams(split="train", num_images=2, image_size=64), str(tmp_path))
    b = generate_shapes(ShapesParams(split="val", num_images=2, image_size=64), str(tmp_path))
    ia = np.asarray(Image.open(os.path.join(a, "images", "000000.jpg")))
    ib = np.asarray(Image.open(os.path.join(b, "images", "000000.jpg")))
    assert np.abs(ia.astype(int) - ib.astype(int)).mean() > 10


def test_images_are_not_trivial(small):
    _, folder, _ = small
    for i in range(5):
        img = np.asarray(Image.open(os.path.join(folder, "images", f"{i:06d}.jpg"))).astype(float)
        assert img.shape == (128, 128, 3)
        assert img.std() > 20  # textured, not flat
        # neighbouring pixels differ: noise everywhere
        assert np.abs(np.diff(img, axis=1)).mean() > 3


def test_coco_json_loads_and_masks_lie_in_boxes(small):
    from pycocotools.coco import COCO

    _, folder, _ = small
    coco = COCO(os.path.join(folder, "instances.json"))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(shapes_mod.THING_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 24 * 2  # at least min_objects per image
    per_class = {c: 0 for c in coco.getCatIds()}
    for a in anns:
        per_class[a["category_id"]] += 1
        m = coco.annToMask(a)
        assert m.sum() > 0
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
        # the polygon approximates the exact mask area closely
        assert abs(int(m.sum()) - a["area"]) <= 0.25 * a["area"] + 20
    assert all(v > 0 for v in per_class.values()), per_class


def test_objects_overlap_and_vary(small):
    _, folder, _ = small
    inst = json.load(open(os.path.join(folder, "instances.json")))
    areas = [a["area"] for a in inst["annotations"]]
    assert max(areas) > 4 * min(areas)
    # occlusion: some visible areas are well below what the unoccluded shape would have;
    # measured through overlapping boxes
    boxes_by_img = {}
    for a in inst["annotations"]:
        boxes_by_img.setdefault(a["image_id"], []).append(a["bbox"])

    def overlap(b1, b2):
        return not (b1[0] + b1[2] <= b2[0] or b2[0] + b2[2] <= b1[0] or
                    b1[1] + b1[3] <= b2[1] or b2[1] + b2[3] <= b1[1])

    n_overlapping = sum(
        any(overlap(b, c) for j, c in enumerate(bs) if j != i)
        for bs in boxes_by_img.values() for i, b in enumerate(bs)
    )
    assert n_overlapping > 10


def test_panoptic_png_ids_match_segments_info(small):
    _, folder, _ = small
    pan = json.load(open(os.path.join(folder, "panoptic.json")))
    cats = {c["id"]: c for c in pan["categories"]}
    assert sum(1 for c in cats.values() if not c["isthing"]) >= 2
    for ann in pan["annotations"]:
        rgb = np.asarray(Image.open(os.path.join(folder, "panoptic", ann["file_name"]))).astype(np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        got = dict(zip(*np.unique(ids, return_counts=True)))
        want = {s["id"]: s["area"] for s in ann["segments_info"]}
        assert {int(k): int(v) for k, v in got.items()} == want
        assert len({s["id"] for s in ann["segments_info"]}) == len(ann["segments_info"])
        for s in ann["segments_info"]:
            assert s["category_id"] in cats


def test_sem_seg_and_panoptic_agree(small):
    _, folder, _ = small
    pan = json.load(open(os.path.join(folder, "panoptic.json")))
    for ann in pan["annotations"][:6]:
        stem = os.path.splitext(ann["file_name"])[0]
        sem = np.asarray(Image.open(os.path.join(folder, "sem_seg", stem + ".png")))
        sep = np.asarray(Image.open(os.path.join(folder, "panoptic_sem_seg", stem + ".png")))
        assert set(np.unique(sem)) <= {0, 1, 2, 3, 4, 255}
        assert (sem == 255).any()  # the ignore band exists ...
        assert (sem == 255).mean() < 0.2  # ... and stays thin
        valid = sem != 255
        # separated map: things -> 0, water -> 1, sand -> 2
        expect = np.where(sem >= 2, 0, sem + 1)
        assert (sep[valid] == expect[valid]).all()


def test_params_change_regenerates_and_crash_leaves_no_cache(tmp_path, monkeypatch):
    root = str(tmp_path)
    a = generate_shapes(ShapesParams(num_images=3, image_size=64), root)
    b = generate_shapes(ShapesParams(num_images=3, image_size=64, max_objects=3), root)
    assert a != b and os.path.isdir(a) and os.path.isdir(b)

    real = shapes_mod._make_one

    def crashing(args):
        if args[1] == 2:
            raise RuntimeError("simulated crash")
        return real(args)

    monkeypatch.setattr(shapes_mod, "_make_one", crashing)
    p = ShapesParams(num_images=4, image_size=64, seed=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_shapes(p, root, workers=1)
    assert not os.path.exists(os.path.join(root, p.key()))
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # no half-written leftovers
    monkeypatch.setattr(shapes_mod, "_make_one", real)
    folder = generate_shapes(p, root, workers=1)
    assert len(os.listdir(os.path.join(folder, "images"))) == 4


def test_catalogs_registered_with_complete_metadata(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_shapes_catalogs(num_train=4, num_val=3, image_size=64, root=str(tmp_path), prefix="tshapes")
    inst = DatasetCatalog.get("tshapes_instance_val")
    assert len(inst) == 3 and all(d["annotations"] for d in inst)
    m = MetadataCatalog.get("tshapes_instance_val")
    assert m.evaluator_type == "coco" and os.path.isfile(m.json_file)
    assert m.thing_classes == ["circle", "triangle", "rectangle"]

    sem = DatasetCatalog.get("tshapes_sem_seg_train")
    assert len(sem) == 4 and os.path.isfile(sem[0]["sem_seg_file_name"])
    ms = MetadataCatalog.get("tshapes_sem_seg_train")
    assert ms.evaluator_type == "sem_seg" and ms.ignore_label == 255 and len(ms.stuff_classes) == 5
    assert len(ms.stuff_colors) == 5

    pan = DatasetCatalog.get("tshapes_panoptic_val")
    d = pan[0]
    assert {"sem_seg_file_name", "pan_seg_file_name", "segments_info", "annotations"} <= set(d)
    mp = MetadataCatalog.get("tshapes_panoptic_val")
    assert mp.evaluator_type == "coco_panoptic_seg"
    assert mp.stuff_classes[0] == "things" and len(mp.stuff_classes) == 3
    for key in ("panoptic_root", "panoptic_json", "sem_seg_root", "json_file", "image_root"):
        assert os.path.exists(getattr(mp, key)), key
    # segments_info uses contiguous ids, like detectron2's panoptic loaders
    for s in d["segments_info"]:
        n = len(mp.thing_classes) if s["isthing"] else len(mp.stuff_classes)
        assert 0 <= s["category_id"] < n
