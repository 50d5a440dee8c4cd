"""tools/check_dataset.py and the pre-training checks on deliberately broken copies of the real
data (made in a temporary folder; the shared data is never modified)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import d2seg  # noqa: F401
from detectron2.data import DatasetCatalog

from d2seg.config import load_config
from d2seg.data.checks import (
    DatasetCheckError,
    check_dataset,
    filter_invalid_annotations,
    run_pre_training_checks,
)
from d2seg.data.register import register_dataset
from d2seg.engine import default_argument_parser, main

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import check_dataset as check_tool  # noqa: E402


def _problems(report, code):
    return [p for p in report.problems if p.code == code]


@pytest.fixture
def fruits_copy(shared_data, tmp_path):
    """A writable copy of fruits_nuts_coco: (json dict, json path, image dir)."""
    src = os.path.join(shared_data, "fruits_nuts_coco")
    img_dir = tmp_path / "images"
    shutil.copytree(os.path.join(src, "images"), img_dir)
    data = json.load(open(os.path.join(src, "trainval.json")))
    return data, tmp_path / "trainval.json", img_dir


def _write(data, path):
    path.write_text(json.dumps(data))
    return str(path)


def test_clean_real_data_has_no_fatal_problem(shared_data):
    r = check_dataset("fruits_nuts_all")
    assert r.ok and r.num_images == 18 and r.num_annotations == 165
    assert r.class_counts == {0: 71, 1: 41, 2: 53}  # date 71, fig 41, hazelnut 53
    assert r.num_classes_implied == 3
    r = check_dataset("isbi2012_membrane_train")
    assert r.ok and r.kind == "sem_seg" and r.num_classes_implied == 2
    share = r.class_counts[1] / sum(r.class_counts.values())
    assert 0.15 < share < 0.3  # membrane is about 22% of the pixels


def test_coco_json_level_problems(fruits_copy):
    data, path, img_dir = fruits_copy
    anns = data["annotations"]
    anns[5]["id"] = anns[4]["id"]  # duplicated annotation id
    anns[7]["category_id"] = 9  # not in the category list
    data["images"][3]["id"] = data["images"][2]["id"]  # duplicated image id
    register_dataset(f"name=broken_json,type=coco,json_file={_write(data, path)},"
                     f"image_root={img_dir}")
    r = check_dataset("broken_json")
    assert not r.ok
    (dup,) = _problems(r, "duplicate_annotation_id")
    assert dup.ann_id == anns[4]["id"] and dup.value == 2 and dup.file == str(path)
    (cat,) = _problems(r, "unknown_category_id")
    assert cat.ann_id == anns[7]["id"] and cat.value == 9
    assert cat.file == data["images"][[im["id"] for im in data["images"]].index(
        anns[7]["image_id"])]["file_name"]
    (img,) = _problems(r, "duplicate_image_id")
    assert img.ann_id == data["images"][2]["id"]
    assert str(path) in cat.message  # names the json as well as the image
    # a val_fraction split (a cached json written from the user's): the user's file is named
    register_dataset(f"name=broken_split,type=coco,json_file={path},image_root={img_dir},"
                     f"val_fraction=0.5")
    msgs = [p.message for n in ("broken_split_train", "broken_split_val")
            for p in _problems(check_dataset(n), "unknown_category_id")]
    assert msgs and all(str(path) in m for m in msgs)


def test_json_level_errors_do_not_hide_image_problems(fruits_copy, capsys):
    """An unknown category id stops detectron2's loader; the image files and sizes of the raw
    json are still checked in the same run, and the counts are the json's, not zeros."""
    data, path, img_dir = fruits_copy
    data["annotations"][51]["category_id"] = 7
    data["images"][1]["height"] += 5
    data["images"][2]["file_name"] = "nope.jpg"
    register_dataset(f"name=json_and_images,type=coco,json_file={_write(data, path)},"
                     f"image_root={img_dir}")
    r = check_dataset("json_and_images")
    codes = [p.code for p in r.problems]
    assert {"unknown_category_id", "image_size_mismatch", "missing_image",
            "checks_incomplete"} <= set(codes)
    assert (r.num_images, r.num_annotations, r.num_classes_implied) == (18, 165, 3)
    assert r.class_counts == {0: 71, 1: 41, 2: 52}  # the annotation of category 7 counts nowhere
    text = r.format()
    assert "nan" not in text and "18 images, 165 annotations" in text
    # a name nobody registered: one line with the closest names, exit status 2
    assert check_tool.main(["--dataset", "fruits_nuts_al"]) == 2
    err = capsys.readouterr().err
    assert "--dataset: dataset 'fruits_nuts_al' is not registered; did you mean " in err
    assert "'fruits_nuts_all'" in err and len(err.strip().splitlines()) == 1


def test_image_and_geometry_problems(fruits_copy):
    data, path, img_dir = fruits_copy
    by_file = {im["file_name"]: im for im in data["images"]}
    anns_of = {}
    for a in data["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    # corrupt (truncated) image, missing image, image whose recorded size is wrong
    raw = open(img_dir / "1.jpg", "rb").read()
    (img_dir / "1.jpg").write_bytes(raw[: len(raw) // 3])
    os.remove(img_dir / "2.jpg")
    by_file["3.jpg"]["height"] = 500
    # annotations of image 0: degenerate polygon, zero-area polygon, box outside, box partly out
    a0 = anns_of[by_file["0.jpg"]["id"]]
    a0[0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # 2 points: dropped by detectron2's loader
    a0[1]["segmentation"] = [[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]]  # collinear: zero area
    a0[2]["bbox"] = [900.0, 700.0, 20.0, 20.0]  # entirely outside the 800x600 image
    a0[3]["bbox"] = [790.0, 100.0, 40.0, 20.0]  # partly outside
    a0[4]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # zero width
    register_dataset(f"name=broken_imgs,type=coco,json_file={_write(data, path)},"
                     f"image_root={img_dir}")
    r = check_dataset("broken_imgs")
    assert not r.ok
    (c,) = _problems(r, "corrupt_image")
    assert c.file.endswith("1.jpg") and c.severity == "error"
    (m,) = _problems(r, "missing_image")
    assert m.file.endswith("2.jpg")
    (s,) = _problems(r, "image_size_mismatch")
    assert s.file.endswith("3.jpg") and s.value == "800x600" and "800x500" in s.message
    (d,) = _problems(r, "degenerate_polygon")
    assert d.ann_id == a0[0]["id"] and d.severity == "skip" and d.value == [4]
    (z,) = _problems(r, "zero_area_polygon")
    assert z.ann_id == a0[1]["id"] and z.severity == "skip"
    (o,) = _problems(r, "box_outside_image")
    assert o.ann_id == a0[2]["id"] and o.value == [900.0, 700.0, 20.0, 20.0]
    (p,) = [x for x in _problems(r, "box_partly_outside_image") if x.file.endswith("/0.jpg")]
    assert p.ann_id == a0[3]["id"] and p.severity == "warning"
    (b,) = _problems(r, "degenerate_box")
    assert b.ann_id == a0[4]["id"] and b.severity == "skip"
    # the training filter drops exactly the "skip" annotations the loader kept
    dicts = DatasetCatalog.get("broken_imgs")
    before = sum(len(x["annotations"]) for x in dicts)
    after = sum(len(x["annotations"]) for x in filter_invalid_annotations(dicts, "broken_imgs"))
    assert before == 164 and before - after == 3  # zero-area polygon, box outside, zero width
    # the command-line tool: exit status 1, every problem printed with file, id and value
    out_json = path.parent / "report.json"
    rc = check_tool.main(["--dataset", "broken_imgs", "--json", str(out_json)])
    assert rc == 1
    rep = json.load(open(out_json))[0]
    assert {p["code"] for p in rep["problems"]} >= {"corrupt_image", "missing_image",
                                                     "box_outside_image"}


@pytest.fixture
def isbi_copy(shared_data, tmp_path):
    """8 ISBI slices with masks already as class ids (0 cell, 1 membrane)."""
    src = os.path.join(shared_data, "isbi2012_membrane", "train")
    img, lab, raw = tmp_path / "image", tmp_path / "label", tmp_path / "raw"
    for d in (img, lab, raw):
        d.mkdir()
    for i in range(8):
        shutil.copy(os.path.join(src, "image", f"{i}.png"), img / f"{i}.png")
        m = np.asarray(Image.open(os.path.join(src, "label", f"{i}.png")))
        Image.fromarray(m).save(raw / f"{i}.png")
        Image.fromarray((m == 0).astype(np.uint8)).save(lab / f"{i}.png")
    return img, lab, raw


def test_semantic_mask_problems(isbi_copy):
    img, lab, raw = isbi_copy
    m = np.asarray(Image.open(lab / "1.png")).copy()
    m[:2, :3] = 7  # 6 pixels outside [0, 2)
    Image.fromarray(m).save(lab / "1.png")
    Image.fromarray(np.zeros((256, 512), np.uint8)).save(lab / "2.png")  # wrong size
    (img / "3.png").write_bytes(b"not a png")  # corrupt image
    register_dataset(f"name=broken_isbi,type=sem_seg,image_root={img},sem_seg_root={lab},"
                     "classes=[cell,membrane]")
    # an image that cannot even be opened: reported with its path, the rest still checked
    r = check_dataset("broken_isbi")
    (f,) = _problems(r, "corrupt_image")
    assert f.file == str(img / "3.png")
    assert _problems(r, "label_out_of_range") and _problems(r, "mask_size_mismatch")
    (img / "3.png").unlink()
    shutil.copy(img / "4.png", img / "3.png")
    with open(img / "3.png", "r+b") as f:  # truncated PNG: header readable, pixels not
        f.truncate(os.path.getsize(img / "3.png") // 2)
    r = check_dataset("broken_isbi")
    (o,) = _problems(r, "label_out_of_range")
    assert o.file == str(lab / "1.png") and o.value == 7 and "6 pixels" in o.message
    (s,) = _problems(r, "mask_size_mismatch")
    assert s.file == str(lab / "2.png") and s.value == "512x256"
    (c,) = _problems(r, "corrupt_image")
    assert c.file == str(img / "3.png")
    assert r.num_classes_implied == 8  # the data (label 7) implies 8 classes


def test_unmapped_raw_values_are_reported(isbi_copy):
    img, _, raw = isbi_copy
    m = np.asarray(Image.open(raw / "0.png")).copy()
    m[10:20, 10:20] = 128  # e.g. an anti-aliased edge: not in label_map
    Image.fromarray(m).save(raw / "0.png")
    register_dataset(f"name=isbi_map,type=sem_seg,image_root={img},sem_seg_root={raw},"
                     "classes=[cell,membrane],label_map={255:0,0:1}")
    r = check_dataset("isbi_map")
    assert r.ok
    (u,) = _problems(r, "unmapped_mask_value")
    assert u.value == 128 and u.file == str(raw / "0.png") and "100 pixels" in u.message


def test_num_classes_mismatch_stops_training(shared_data, tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                   "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["DATASETS.TRAIN", "('fruits_nuts_train',)", "DATASETS.TEST", "()",
                       "MODEL.ROI_HEADS.NUM_CLASSES", "2", "D2SEG.DATASETS.REGISTER", "[]"])
    with pytest.raises(DatasetCheckError, match="MODEL.ROI_HEADS.NUM_CLASSES=2 but the data has 3"):
        run_pre_training_checks(cfg)
    cfg.D2SEG.DATASETS.CHECK = "warn"
    (r,) = run_pre_training_checks(cfg)
    assert _problems(r, "num_classes_mismatch")[0].severity == "error"


def test_train_net_refuses_broken_data_before_training(fruits_copy, tmp_path):
    data, path, img_dir = fruits_copy
    os.remove(img_dir / "5.jpg")
    spec = f"name=broken_train,type=coco,json_file={_write(data, path)},image_root={img_dir}"
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                      "mask_rcnn_R_18_FPN_cpu.yaml"),
        "OUTPUT_DIR", str(tmp_path / "out"), "D2SEG.DATASETS.REGISTER", str((spec,)),
        "DATASETS.TRAIN", "('broken_train',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetCheckError, match="5.jpg"):
        main(args)
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")


def test_split_reports_unpaired_files_and_only_its_own_unmapped_values(isbi_copy):
    """A val_fraction split of a mask folder: an image without mask and a mask without image
    are warnings naming the file; a raw value outside label_map is reported by the split
    holding that mask only."""
    img, _, raw = isbi_copy
    (raw / "2.png").unlink()  # image 2 has no mask
    (img / "3.png").unlink()  # mask 3 has no image
    m = np.asarray(Image.open(raw / "0.png")).copy()
    m[10:20, 10:20] = 128
    Image.fromarray(m).save(raw / "0.png")
    names = register_dataset(f"name=isbi_pairs,type=sem_seg,image_root={img},"
                             f"sem_seg_root={raw},classes=[cell,membrane],"
                             "label_map={255:0,0:1},val_fraction=0.35")
    assert names == ["isbi_pairs", "isbi_pairs_train", "isbi_pairs_val"]
    reports = {n: check_dataset(n) for n in names[1:]}
    for r in reports.values():
        assert r.ok
        (a,) = _problems(r, "unpaired_image")
        (b,) = _problems(r, "unpaired_mask")
        assert a.file == str(img / "2.png") and b.file == str(raw / "3.png")
        assert "(value:" not in str(a)  # no "(value: None)"
    holder = [n for n in names[1:] if any(
        os.path.basename(d["file_name"]) == "0.png" for d in DatasetCatalog.get(n))]
    assert len(holder) == 1
    for n, r in reports.items():
        assert bool(_problems(r, "unmapped_mask_value")) == (n == holder[0])


def test_more_num_classes_than_an_evaluated_dataset_names_is_fatal(shared_data):
    cfg = load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                      ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5", "D2SEG.DATASETS.CHECK", "warn"])
    reports = {r.name: r for r in run_pre_training_checks(cfg)}
    tr, va = (_problems(reports[n], "num_classes_mismatch")[0]
              for n in ("isbi2012_membrane_train", "isbi2012_membrane_val"))
    assert tr.severity == "warning"  # training only: fine
    assert va.severity == "error" and "cannot score predictions of classes 2..4" in va.message


def test_rle_masks_under_polygon_format_are_fatal_for_training(fruits_copy):
    from pycocotools import mask as mask_util

    data, path, img_dir = fruits_copy
    ann = data["annotations"][0]
    im = next(i for i in data["images"] if i["id"] == ann["image_id"])
    rle = mask_util.frPyObjects(ann["segmentation"], im["height"], im["width"])
    rle = mask_util.merge(rle)
    rle["counts"] = rle["counts"].decode("ascii")
    ann["segmentation"] = rle
    spec = f"name=fruits_rle,type=coco,json_file={_write(data, path)},image_root={img_dir}"
    opts = ["D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TRAIN", "('fruits_rle',)",
            "DATASETS.TEST", "()"]
    cfg_file = os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                            "mask_rcnn_R_18_FPN_cpu.yaml")
    cfg = load_config(cfg_file, opts)
    register_dataset(spec)
    with pytest.raises(DatasetCheckError, match="INPUT.MASK_FORMAT bitmask"):
        run_pre_training_checks(cfg)
    cfg = load_config(cfg_file, opts + ["INPUT.MASK_FORMAT", "bitmask"])
    (r,) = run_pre_training_checks(cfg)
    assert not _problems(r, "mask_format")


def test_a_training_json_without_annotations_is_fatal(fruits_copy):
    """"annotations": [] passed the checks (one warning per image), then detectron2 stopped with
    "No valid data found" from its loader."""
    data, path, img_dir = fruits_copy
    spec = (f"name=fruits_noann,type=coco,json_file={_write(dict(data, annotations=[]), path)},"
            f"image_root={img_dir}")
    cfg = load_config(os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                         "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TRAIN",
                       "('fruits_noann',)", "DATASETS.TEST", "()"])
    register_dataset(spec)
    with pytest.raises(DatasetCheckError, match="no image of DATASETS.TRAIN has an annotation"):
        run_pre_training_checks(cfg)
    # beside a dataset with annotations (background images): a warning, and training goes on
    pos = f"name=fruits_pos,type=coco,json_file={_write(data, path.parent / 'pos.json')}," \
          f"image_root={img_dir}"
    register_dataset(pos)
    cfg = load_config(os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                         "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["D2SEG.DATASETS.REGISTER", str((spec, pos)), "DATASETS.TRAIN",
                       "('fruits_pos', 'fruits_noann')", "DATASETS.TEST", "()"])
    reports = {r.name: r for r in run_pre_training_checks(cfg)}
    (p,) = [p for p in reports["fruits_noann"].problems
            if p.file == "fruits_noann" and p.code == "no_annotations"]
    assert p.severity == "warning" and "leaves the whole dataset out" in p.message



def test_crowd_annotations_are_not_trained_on_and_their_rle_needs_no_bitmask(fruits_copy):
    """iscrowd=1 RLE regions (as in COCO) made the polygon-format check fatal, though
    detectron2's mapper drops them; a json of crowd regions only passed, then detectron2 found
    "No valid data"."""
    from pycocotools import mask as mask_util

    data, path, img_dir = fruits_copy
    size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for k, a in enumerate(data["annotations"]):
        if k % 2 == 0:
            h, w = size[a["image_id"]]
            rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))
            a["segmentation"] = dict(rle, counts=rle["counts"].decode("ascii"))
            a["iscrowd"] = 1
    cfg_file = os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                  "mask_rcnn_R_18_FPN_cpu.yaml")
    spec = f"name=fruits_crowd,type=coco,json_file={_write(data, path)},image_root={img_dir}"
    register_dataset(spec)
    cfg = load_config(cfg_file, ["D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TRAIN",
                                 "('fruits_crowd',)", "DATASETS.TEST", "()"])
    (r,) = run_pre_training_checks(cfg)  # polygon format: fine, the RLE ones are crowd
    assert not _problems(r, "mask_format")
    for a in data["annotations"]:
        a["iscrowd"] = 1
    spec = f"name=fruits_allcrowd,type=coco,json_file={_write(data, path.parent / 'c.json')}," \
           f"image_root={img_dir}"
    register_dataset(spec)
    cfg = load_config(cfg_file, ["D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TRAIN",
                                 "('fruits_allcrowd',)", "DATASETS.TEST", "()",
                                 "INPUT.MASK_FORMAT", "bitmask"])
    with pytest.raises(DatasetCheckError, match="no image of DATASETS.TRAIN has an annotation"):
        run_pre_training_checks(cfg)


def test_check_tool_without_config_checks_the_data_alone(shared_data, capsys):
    assert check_tool.main(["--dataset", "fruits_nuts_all", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "num_classes_mismatch" not in out  # no model to compare with


def test_missing_box_and_empty_datasets_are_fatal(fruits_copy):
    """An annotation without 'bbox' crashed the loader mid-training (or COCO evaluation after
    it); an empty dataset or split failed in detectron2's loader, a test one after training."""
    data, path, img_dir = fruits_copy
    one = dict(data, images=data["images"][:1], annotations=[
        dict(a) for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]])
    ann = data["annotations"][5]
    del ann["bbox"]
    register_dataset(f"name=no_box,type=coco,json_file={_write(data, path)},image_root={img_dir}")
    r = check_dataset("no_box")
    (p,) = _problems(r, "missing_box")
    assert not r.ok and p.severity == "error" and p.ann_id == ann["id"]
    one_path = path.parent / "one.json"
    register_dataset(f"name=one_img,type=coco,json_file={_write(one, one_path)},"
                     f"image_root={img_dir},val_fraction=0.25")
    assert check_dataset("one_img_train").ok
    r = check_dataset("one_img_val")
    (p,) = _problems(r, "empty_dataset")
    assert not r.ok and "fewer than 2 images" in p.message


def test_instance_category_equal_to_num_classes_is_out_of_range(tmp_path):
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_dataset_dicts

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    meta = Metadata(name="audit_inst").set(thing_classes=["a", "b"])
    d = [{"file_name": str(tmp_path / "a.png"), "image_id": 0, "height": 20, "width": 20,
          "annotations": [{"bbox": [1, 1, 5, 5], "bbox_mode": 1, "category_id": 2}]}]
    r = check_dataset_dicts(d, meta)
    assert [p.value for p in r.problems if p.code == "label_out_of_range"] == [2]


def test_mask_label_equal_to_num_classes_is_out_of_range(tmp_path):
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_dataset_dicts

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 20), np.uint8)
    m[0, 0] = 2
    Image.fromarray(m).save(tmp_path / "m.png")
    meta = Metadata(name="audit_sem").set(stuff_classes=["a", "b"], ignore_label=255)
    d = [{"file_name": str(tmp_path / "a.png"), "image_id": 0, "height": 20, "width": 20,
          "sem_seg_file_name": str(tmp_path / "m.png")}]
    r = check_dataset_dicts(d, meta)
    assert [p.value for p in r.problems if p.code == "label_out_of_range"] == [2]


def test_labels_beyond_the_named_classes_are_one_problem(tmp_path):
    """A label above the named classes is label_out_of_range; it is not also a NUM_CLASSES
    mismatch inviting NUM_CLASSES 8 when the model covers every named class."""
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import _check_against_cfg, check_dataset_dicts

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 20), np.uint8)
    m[:2, :2] = 7
    Image.fromarray(m).save(tmp_path / "m.png")
    meta = Metadata(name="beyond_names").set(stuff_classes=["a", "b", "c"], ignore_label=255)
    d = [{"file_name": str(tmp_path / "a.png"), "image_id": 0, "height": 20, "width": 20,
          "sem_seg_file_name": str(tmp_path / "m.png")}]
    r = check_dataset_dicts(d, meta, "beyond_names")
    cfg = load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                      ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"])
    _check_against_cfg(cfg, "beyond_names", r)
    assert [p.code for p in r.errors] == ["label_out_of_range"]
    assert "labels beyond the 3 named classes" in r.format()


def test_binary_masks_read_as_ignore_are_fatal(tmp_path):
    """0/255 masks, two classes, no label_map: 255 is the ignore label, so the foreground is
    never trained. A fatal problem that says which label_map fixes it; the ignore share is
    printed with the class frequencies."""
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_dataset_dicts

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    d = [{"file_name": str(tmp_path / "a.png"), "image_id": 0, "height": 20, "width": 20,
          "sem_seg_file_name": str(tmp_path / "m.png")}]
    meta = Metadata(name="bin_ignore").set(stuff_classes=["bg", "fg"], ignore_label=255)
    r = check_dataset_dicts(d, meta, "bin_ignore")
    (p,) = _problems(r, "foreground_is_ignore")
    assert p.severity == "error" and "label_map={0:0,255:1}" in p.message
    assert r.ignore_pixels == 100 and "ignore label: 100 pixels, 25.00% of all" in r.format()
    # with a label_map (the remapped masks hold 0/1) or three classes it is not reported
    meta3 = Metadata(name="bin_ignore3").set(stuff_classes=["bg", "fg", "x"], ignore_label=255)
    assert not _problems(check_dataset_dicts(d, meta3, "bin_ignore3"), "foreground_is_ignore")
    meta_lm = Metadata(name="bin_lm").set(stuff_classes=["bg", "fg"], ignore_label=255,
                                          label_map={0: 0, 128: 1})
    assert not _problems(check_dataset_dicts(d, meta_lm, "bin_lm"), "foreground_is_ignore")


def test_a_binary_model_with_one_class_name_says_to_name_the_background(tmp_path):
    """smp's "binary = classes=1": one class name with NUM_CLASSES 1 made label 1 out of range
    and the class table call the background by that name."""
    from detectron2.data.catalog import Metadata

    from d2seg.config import get_cfg
    from d2seg.data.checks import _check_against_cfg, check_dataset_dicts

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 1
    Image.fromarray(m).save(tmp_path / "m.png")
    d = [{"file_name": str(tmp_path / "a.png"), "image_id": 0, "height": 20, "width": 20,
          "sem_seg_file_name": str(tmp_path / "m.png")}]
    r = check_dataset_dicts(d, Metadata(name="one_name").set(stuff_classes=["membrane"],
                                                             ignore_label=255), "one_name")
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = "UNet", 1
    _check_against_cfg(cfg, "one_name", r)
    (p,) = _problems(r, "binary_class_names")
    assert p.severity == "error" and "classes=[background, membrane]" in p.message


def test_annotation_problems_edges_polygons_and_box_modes():
    """annotation_problems: boxes starting at the right/bottom edge are outside, a box past
    the bottom is partly outside, polygons need >= 3 points and an even length, a bbox needs
    4 numbers, and bbox_mode is honoured."""
    from detectron2.structures import BoxMode

    from d2seg.data.checks import annotation_problems

    def codes(ann):
        return [p[1] for p in annotation_problems(ann, 20, 30)]

    assert codes({"bbox": [30, 0, 5, 5]}) == ["box_outside_image"]
    assert codes({"bbox": [0, 20, 5, 5]}) == ["box_outside_image"]
    assert codes({"bbox": [0, 10, 5, 15]}) == ["box_partly_outside_image"]
    sq = [1, 1, 6, 1, 6, 6]
    assert codes({"bbox": [1, 1, 5, 5], "segmentation": [sq]}) == []
    assert codes({"bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 6]]}) == ["degenerate_polygon"]
    assert codes({"bbox": [1, 1, 5, 5], "segmentation": [sq + [7]]}) == ["degenerate_polygon"]
    assert codes({"bbox": [1, 1, 5]}) == ["malformed_box"]
    assert codes({"bbox": [6, 6, 2, 2], "bbox_mode": BoxMode.XYXY_ABS}) == ["degenerate_box"]


def test_binary_head_covers_two_classes_and_panoptic_stuff_mismatch_on_test_data():
    """NUM_CLASSES 1 (binary) covers a two-class dataset; extra stuff classes in the head are
    fatal for a dataset in DATASETS.TEST."""
    from d2seg.config import get_cfg
    from d2seg.data.checks import DatasetReport, _check_against_cfg, expected_num_classes

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "UNet"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
    assert expected_num_classes(cfg, "sem_seg") == ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 1, 2)
    r = DatasetReport(name="bin", kind="sem_seg", num_classes_implied=2)
    _check_against_cfg(cfg, "bin", r)
    assert r.problems == []
    cfg.MODEL.META_ARCHITECTURE = "PanopticFPN"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.DATASETS.TEST = ("pan",)
    r = DatasetReport(name="pan", kind="panoptic", num_stuff_classes_implied=3)
    _check_against_cfg(cfg, "pan", r)
    assert [p.severity for p in _problems(r, "num_classes_mismatch")] == ["error"]


def test_duplicate_ids_and_class_imbalance_are_reported(tmp_path):
    """Two dicts sharing an image_id are an error; a class 10x rarer than another warns; a
    non-square mask of the image's size is no size mismatch."""
    from detectron2.data import MetadataCatalog

    from d2seg.data.checks import check_dataset_dicts

    lab = np.zeros((20, 30), np.uint8)
    lab[0, 0] = 1  # 1 pixel of class 1 against 599 of class 0
    dicts = []
    for i in range(2):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray(lab).save(tmp_path / f"m{i}.png")
        dicts.append({"file_name": str(tmp_path / f"i{i}.png"), "height": 20, "width": 30,
                      "sem_seg_file_name": str(tmp_path / f"m{i}.png"), "image_id": 0})
    meta = MetadataCatalog.get("d2seg_test_check_imbalance")
    meta.set(stuff_classes=["bg", "fg"], ignore_label=255)
    r = check_dataset_dicts(dicts, meta, "d2seg_test_check_imbalance")
    assert [p.value for p in _problems(r, "duplicate_image_id")] == [2]
    assert [p.value for p in _problems(r, "class_imbalance")] == [599.0]
    assert not _problems(r, "mask_size_mismatch")  # a non-square mask of the image's size


def test_pre_training_checks_install_the_annotation_filter_on_train_sets():
    """run_pre_training_checks leaves 'skip' annotations out of DATASETS.TRAIN; with
    eval_only it checks DATASETS.TEST alone and installs no filter."""
    from detectron2.data import MetadataCatalog

    from d2seg.config import get_cfg

    name = "d2seg_test_check_filter"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    anns = [{"bbox": [0, 0, 5, 5], "category_id": 0}, {"bbox": [0, 0, 0, 5], "category_id": 0}]
    DatasetCatalog.register(name, lambda: [{"file_name": "/nonexistent/a.png", "height": 10,
                                            "width": 10, "image_id": 1,
                                            "annotations": list(anns)}])
    MetadataCatalog.get(name).set(thing_classes=["a"])
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    cfg.D2SEG.DATASETS.CHECK = "warn"
    assert run_pre_training_checks(cfg, eval_only=True) == []  # DATASETS.TEST only: none
    assert len(DatasetCatalog.get(name)[0]["annotations"]) == 2  # and no filter
    run_pre_training_checks(cfg)
    assert len(DatasetCatalog.get(name)[0]["annotations"]) == 1


def test_panoptic_kind_from_detectron2_evaluator_type():
    """A dataset whose evaluator_type is detectron2's "coco_panoptic_seg" is panoptic."""
    from types import SimpleNamespace

    from d2seg.data.checks import _kind

    assert _kind(SimpleNamespace(evaluator_type="coco_panoptic_seg"), []) == "panoptic"


def test_instances_without_thing_classes_imply_one_class_per_category_seen():
    """Without thing_classes, category 0 annotations imply NUM_CLASSES 1 (max id + 1)."""
    from types import SimpleNamespace

    from d2seg.data.checks import check_dataset_dicts

    d = {"file_name": "/nonexistent/a.png", "height": 10, "width": 10, "image_id": 1,
         "annotations": [{"bbox": [0, 0, 5, 5], "category_id": 0}]}
    r = check_dataset_dicts([d], SimpleNamespace(evaluator_type="coco"), "no_things")
    assert r.kind == "instances" and r.num_classes_implied == 1


def test_bad_label_with_checks_off_names_the_batch_files(tmp_path):
    """D2SEG.DATASETS.CHECK 'warn': a label beyond NUM_CLASSES reaches the loss; its error
    names the iteration, the batch's images and label maps (the non-finite guard's style)."""
    from d2seg.modeling.losses import TargetValueError

    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "im" / f"s{i}.png")
        Image.fromarray(np.full((32, 32), 7 * i, np.uint8)).save(tmp_path / "lab" / f"s{i}.png")
    spec = (f"name=bad_label,type=sem_seg,image_root={tmp_path}/im,"
            f"sem_seg_root={tmp_path}/lab,classes=[a,b]")
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
        "OUTPUT_DIR", str(tmp_path / "out"), "D2SEG.DATASETS.REGISTER", str((spec,)),
        "DATASETS.TRAIN", "('bad_label',)", "DATASETS.TEST", "()", "D2SEG.DATASETS.CHECK",
        "warn", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "INPUT.CROP.ENABLED",
        "False", "DATALOADER.NUM_WORKERS", "0", "MODEL.UNET.BASE_CHANNELS", "4"])
    with pytest.raises(TargetValueError, match=r"target value 7 .* at iteration 0; images in "
                                               r"this rank's batch: .*s1.png.*label maps: "
                                               r".*lab/s1.png"):
        main(args)


def test_an_empty_split_is_not_advised_to_train_anyway(tmp_path):
    """An empty dataset cannot train in 'warn' mode either: the error does not suggest it."""
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_datasets_from_cfg

    DatasetCatalog.register("empty_for_advice", lambda: [])
    Metadata(name="empty_for_advice").set(stuff_classes=["a", "b"], evaluator_type="sem_seg")
    cfg = load_config("", ["DATASETS.TRAIN", "('empty_for_advice',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetCheckError) as e:
        check_datasets_from_cfg(cfg, log=False)
    assert "empty_dataset" in str(e.value) and "'warn'" not in str(e.value)


def test_dataset_ignore_label_other_than_the_heads_ignore_value(tmp_path):
    """A dataset registered with ignore_label=254 under a model ignoring 255: the loss would
    read 254 as a class (it stopped at iteration 0 after 0 fatal problems); fatal for training
    data, naming both values and the key to set; a warning for test-only data."""
    for sub in ("im", "lab"):
        (tmp_path / sub).mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "im" / "a.png")
    m = np.zeros((16, 16), np.uint8)
    m[:4], m[8:] = 254, 1
    Image.fromarray(m).save(tmp_path / "lab" / "a.png")
    register_dataset(f"name=ign254,type=sem_seg,image_root={tmp_path}/im,"
                     f"sem_seg_root={tmp_path}/lab,classes=[bg,fg],ignore_label=254")
    config = os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml")
    cfg = load_config(config, ["DATASETS.TRAIN", "('ign254',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetCheckError, match=r"ignore_value_mismatch.*ignore_label is 254 but "
                                                r"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is 255.*set "
                                                r"MODEL.SEM_SEG_HEAD.IGNORE_VALUE 254"):
        run_pre_training_checks(cfg)
    cfg = load_config(config, ["DATASETS.TRAIN", "('ign254',)", "DATASETS.TEST", "()",
                               "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "254"])
    (r,) = run_pre_training_checks(cfg)
    assert not _problems(r, "ignore_value_mismatch")
    cfg = load_config(config, ["DATASETS.TEST", "('ign254',)"])
    reports = run_pre_training_checks(cfg, eval_only=True)
    (p,) = [p for r in reports for p in _problems(r, "ignore_value_mismatch")]
    assert p.severity == "warning"


def test_a_panoptic_json_registered_as_coco_says_which_type(shared_data, capsys):
    root = os.path.join(shared_data, "coco_panoptic_sample")
    spec = (f"name=pan_as_coco,type=coco,json_file={root}/panoptic_examples.json,"
            f"image_root={root}/input_images")
    assert check_tool.main(["D2SEG.DATASETS.REGISTER", str((spec,)),
                            "DATASETS.TRAIN", "('pan_as_coco',)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("check_dataset.py: error: ") and "panoptic_examples.json: a COCO " \
        "panoptic json (its annotations have 'segments_info'), registered as type=coco: " \
        "register it with type=coco_panoptic" in err
    assert "pan_as_coco" not in DatasetCatalog.list()
