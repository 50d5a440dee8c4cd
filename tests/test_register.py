"""Dataset registration from the config / command line (d2seg/data/register.py)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import d2seg  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2seg.config import load_config
from d2seg.data.register import (
    parse_dataset_spec,
    register_dataset,
    register_datasets_from_cfg,
    split_coco_json,
    split_items,
)


def test_parse_string_form_with_lists_and_maps(tmp_path):
    e = parse_dataset_spec(
        f"name=a,type=sem_seg,image_root={tmp_path},sem_seg_root={tmp_path},"
        "classes=[cell,membrane],ignore_label=255,label_map={255:0,0:1},val_fraction=0.2,seed=3")
    assert e["classes"] == ["cell", "membrane"]
    assert e["label_map"] == {255: 0, 0: 1}
    assert e["val_fraction"] == 0.2 and e["seed"] == 3 and e["ignore_label"] == 255
    assert e["image_root"] == str(tmp_path)


def test_parse_mapping_form_makes_paths_absolute():
    e = parse_dataset_spec({"NAME": "b", "type": "coco", "json_file": "x.json",
                            "image_root": "imgs"})
    assert e["name"] == "b" and os.path.isabs(e["json_file"]) and e["json_file"].endswith("x.json")


@pytest.mark.parametrize("spec, words", [
    ("type=coco,json_file=a,image_root=b", ["'name' is missing"]),
    ("name=x,type=cocoo,json_file=a", ["'x'", "type='cocoo'"]),
    ("name=x,type=coco,json_file=a", ["'x'", "missing ['image_root']"]),
    ("name=x,type=coco,json_file=a,image_root=b,classes=[a]", ["'x'", "unknown keys ['classes']"]),
    ("name=x,type=sem_seg,image_root=a,sem_seg_root=b,classes=[a],label_map={a:1}",
     ["'x'", "label_map"]),
    ("name=x,type=coco,json_file=a,image_root=b,val_fraction=1.5", ["'x'", "val_fraction=1.5"]),
    ("name=x,type=coco,json_file", ["is not key=value"]),
    ("name=x,type=coco,json_file=a,image_root=b,val_fraction=abc",
     ["'x'", "val_fraction='abc' is not a number"]),
    ("name=x,type=coco,json_file=a,image_root=b,seed=1.5x", ["'x'", "seed='1.5x' is not an integer"]),
    # an unclosed bracket swallowed the keys after it (val_fraction became a class name)
    ("name=x,type=sem_seg,image_root=a,sem_seg_root=b,classes=[a,b,val_fraction=0.3",
     ["REGISTER entry", "1 '[' or '{' not closed"]),
    ("name=x,type=sem_seg,image_root=a,sem_seg_root=b,classes=a,b]", ["']' closes no bracket"]),
    # a class id beyond the classes: said here, not against d2seg's remapped cache copies
    ("name=x,type=sem_seg,image_root=a,sem_seg_root=b,classes=[bg,fg],label_map={0:0,5:7}",
     ["'x'", "label_map maps 5: 7 to class ids outside the 2 classes ['bg', 'fg']"]),
])
def test_parse_errors_name_entry_and_key(spec, words):
    with pytest.raises(ValueError) as e:
        parse_dataset_spec(spec)
    for w in words:
        assert w in str(e.value)


def test_a_split_name_of_an_entry_without_val_fraction_says_so():
    from d2seg.data.register import not_registered

    msg = not_registered("tiny_train", ["coco_2017_train", "tiny"])
    assert "'tiny' is, and 'tiny_train' / 'tiny_val' exist only where" in msg
    assert "val_fraction" in msg


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="entry 'nope': json_file"):
        register_dataset(f"name=nope,type=coco,json_file={tmp_path}/x.json,image_root={tmp_path}")


def test_split_items_is_deterministic_and_complete():
    items = list(range(18))
    tr, va = split_items(items, 0.25, seed=0)
    assert len(va) == 4 and len(tr) == 14
    assert sorted(tr + va) == items and not set(tr) & set(va)
    assert (tr, va) == split_items(items, 0.25, seed=0)
    assert va != split_items(items, 0.25, seed=1)[1]
    assert len(split_items([1, 2], 0.01)[1]) == 1  # never an empty val split


def test_split_coco_json_keeps_annotations_with_their_images(tmp_path):
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 4, "width": 4}
                       for i in range(10)],
            "annotations": [{"id": 100 + i, "image_id": i % 10, "category_id": 1}
                            for i in range(30)],
            "categories": [{"id": 1, "name": "a"}], "info": {"x": 1}}
    src = tmp_path / "all.json"
    src.write_text(json.dumps(data))
    tr, va = split_coco_json(str(src), 0.3, seed=0, out_dir=str(tmp_path / "out"))
    t, v = json.load(open(tr)), json.load(open(va))
    ti, vi = {im["id"] for im in t["images"]}, {im["id"] for im in v["images"]}
    assert len(vi) == 3 and ti | vi == set(range(10)) and not ti & vi
    assert all(a["image_id"] in vi for a in v["annotations"])
    assert len(t["annotations"]) + len(v["annotations"]) == 30
    assert t["categories"] == data["categories"] and v["info"] == {"x": 1}
    # another seed gives another split, in the same folder as in the keyed cache
    _, va1 = split_coco_json(str(src), 0.3, seed=1, out_dir=str(tmp_path / "out"))
    assert {im["id"] for im in json.load(open(va1))["images"]} != vi
    ids = []
    for seed in (0, 1, 0):
        _, v = split_coco_json(str(src), 0.3, seed=seed)  # cache under $D2SEG_DATASETS
        ids.append({im["id"] for im in json.load(open(v))["images"]})
    assert ids[0] == vi and ids[1] != ids[0] and ids[2] == ids[0]
    _, v = split_coco_json(str(src), 0.4, seed=0)
    assert len(json.load(open(v))["images"]) == 4
    (tmp_path / "train.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="would overwrite it"):
        split_coco_json(str(tmp_path / "train.json"), 0.3, out_dir=str(tmp_path))
    assert len(json.load(open(tmp_path / "train.json"))["images"]) == 10


def test_coco_from_command_line_with_split(shared_data):
    root = os.path.join(shared_data, "fruits_nuts_coco")
    spec = (f"name=own_fruits,type=coco,json_file={root}/trainval.json,"
            f"image_root={root}/images,val_fraction=0.25")
    cfg = load_config("", ["D2SEG.DATASETS.REGISTER", str((spec,))])
    names = register_datasets_from_cfg(cfg)
    assert names == ["own_fruits", "own_fruits_train", "own_fruits_val"]
    # classes known before the first load (predict/visualize need them)
    assert MetadataCatalog.get("own_fruits_val").thing_classes == ["date", "fig", "hazelnut"]
    tr, va = DatasetCatalog.get("own_fruits_train"), DatasetCatalog.get("own_fruits_val")
    assert (len(tr), len(va)) == (14, 4)
    assert not {d["image_id"] for d in tr} & {d["image_id"] for d in va}
    assert sum(len(d["annotations"]) for d in tr + va) == 165
    assert MetadataCatalog.get("own_fruits_val").evaluator_type == "coco"
    # COCO evaluation reads json_file: it must hold only the split's images
    val_json = json.load(open(MetadataCatalog.get("own_fruits_val").json_file))
    assert {im["id"] for im in val_json["images"]} == {d["image_id"] for d in va}
    assert len(DatasetCatalog.get("own_fruits")) == 18


def test_sem_seg_folder_from_yaml_with_label_map(shared_data, tmp_path):
    base = os.path.join(shared_data, "isbi2012_membrane", "train")
    (tmp_path / "c.yaml").write_text(f"""
D2SEG:
  DATASETS:
    REGISTER:
      - name: own_isbi
        type: sem_seg
        image_root: {base}/image
        sem_seg_root: {base}/label
        classes: [cell, membrane]
        ignore_label: 255
        label_map: {{255: 0, 0: 1}}
        val_fraction: 0.2
""")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert register_datasets_from_cfg(cfg) == ["own_isbi", "own_isbi_train", "own_isbi_val"]
    meta = MetadataCatalog.get("own_isbi_train")
    assert meta.stuff_classes == ["cell", "membrane"] and meta.ignore_label == 255
    assert meta.evaluator_type == "sem_seg"
    tr, va = DatasetCatalog.get("own_isbi_train"), DatasetCatalog.get("own_isbi_val")
    assert (len(tr), len(va)) == (24, 6)
    stems = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(base, "image"))}
    tr_ids, va_ids = {d["image_id"] for d in tr}, {d["image_id"] for d in va}
    assert not tr_ids & va_ids and tr_ids | va_ids == stems
    assert all(os.path.splitext(os.path.basename(d["file_name"]))[0] == d["image_id"]
               for d in tr + va)
    raw = np.asarray(Image.open(os.path.join(base, "label", va[0]["image_id"] + ".png")))
    remapped = np.asarray(Image.open(va[0]["sem_seg_file_name"]))
    assert set(np.unique(remapped)) <= {0, 1}
    assert np.array_equal(remapped == 1, raw == 0)  # membrane (raw 0) -> class 1
    # config dump (default_setup writes config.yaml) round-trips
    assert "own_isbi" in cfg.dump()


def test_label_map_remaps_each_value_and_unmapped_values_become_ignore(tmp_path):
    """label_map's values reach the masks (another map, another cache), values not in the
    map become ignore_label."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    raws = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"s{i}.png")
        raw = rng.choice(np.array([0, 128, 255], np.uint8), (12, 16))
        Image.fromarray(raw).save(tmp_path / "lbl" / f"s{i}.png")
        raws.append(raw)
    got = {}
    for name, lmap in (("lm_a", "{255: 0, 0: 1}"), ("lm_b", "{255: 1, 0: 0}")):
        register_dataset(f"name={name},type=sem_seg,image_root={tmp_path}/img,"
                         f"sem_seg_root={tmp_path}/lbl,classes=[a,b],ignore_label=254,"
                         f"label_map={lmap}")
        dicts = sorted(DatasetCatalog.get(name), key=lambda d: d["image_id"])
        got[name] = [np.asarray(Image.open(d["sem_seg_file_name"])) for d in dicts]
    for raw, a, b in zip(raws, got["lm_a"], got["lm_b"]):
        assert np.array_equal(a == 254, raw == 128) and np.array_equal(b == 254, raw == 128)
        assert np.array_equal(a[raw == 255], np.zeros((raw == 255).sum(), np.uint8))
        assert np.array_equal(a[raw == 0], np.ones((raw == 0).sum(), np.uint8))
        assert np.array_equal(b[raw != 128], 1 - a[raw != 128])


def test_coco_panoptic_registered_in_separated_format(shared_data):
    root = os.path.join(shared_data, "coco_panoptic_sample")
    names = register_dataset({
        "name": "own_pan", "type": "coco_panoptic",
        "image_root": f"{root}/input_images", "panoptic_root": f"{root}/panoptic_examples",
        "panoptic_json": f"{root}/panoptic_examples.json"})
    assert names == ["own_pan"]
    meta = MetadataCatalog.get("own_pan")
    pan = json.load(open(f"{root}/panoptic_examples.json"))
    things = [c for c in pan["categories"] if c["isthing"]]
    assert meta.thing_classes == [c["name"] for c in things]
    assert meta.stuff_classes[0] == "things" and len(meta.stuff_classes) == \
        len(pan["categories"]) - len(things) + 1
    assert meta.evaluator_type == "coco_panoptic_seg"
    dicts = DatasetCatalog.get("own_pan")
    assert len(dicts) == 2
    for d, a in zip(sorted(dicts, key=lambda d: d["image_id"]),
                    sorted(pan["annotations"], key=lambda a: a["image_id"])):
        thing_segs = [s for s in a["segments_info"] if s["category_id"] in
                      meta.thing_dataset_id_to_contiguous_id]
        assert len(d["annotations"]) == len(thing_segs)
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        assert sem.shape == (d["height"], d["width"])
        vals = set(np.unique(sem)) - {255}
        assert vals and max(vals) < len(meta.stuff_classes)
        assert os.path.isfile(d["pan_seg_file_name"])
        assert all(isinstance(s["isthing"], bool) for s in d["segments_info"])
    # detectron2's SemSegEvaluator (train_net's panoptic evaluation) looks up every predicted
    # stuff-map label, the "things" class 0 included
    from detectron2.evaluation import SemSegEvaluator

    ev = SemSegEvaluator("own_pan", distributed=False)
    pred = np.arange(len(meta.stuff_classes)).reshape(1, -1)
    assert len(ev.encode_json_sem_seg(pred, "x.jpg")) == len(meta.stuff_classes)


def test_coco_panoptic_check_against_panoptic_fpn_config(shared_data):
    """The panoptic report gives both NUM_CLASSES (things; stuff + 1); a Panoptic FPN config is
    checked against both, and the PNG-derived (RLE) instance masks need MASK_FORMAT bitmask."""
    from d2seg.config import load_config
    from d2seg.data.checks import check_datasets_from_cfg

    from conftest import REPO

    root = os.path.join(shared_data, "coco_panoptic_sample")
    spec = (f"name=own_pan_chk,type=coco_panoptic,image_root={root}/input_images,"
            f"panoptic_root={root}/panoptic_examples,"
            f"panoptic_json={root}/panoptic_examples.json")
    cfg_file = os.path.join(REPO, "configs/Shapes-PanopticSegmentation/panoptic_fpn_R_18_cpu.yaml")
    opts = ["D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TRAIN", "('own_pan_chk',)",
            "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "80"]
    register_dataset(spec)
    pan = json.load(open(f"{root}/panoptic_examples.json"))
    n_stuff = sum(1 for c in pan["categories"] if not c["isthing"]) + 1
    (r,) = check_datasets_from_cfg(load_config(cfg_file, opts + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"]), mode="warn", log=False)
    assert r.num_stuff_classes_implied == n_stuff
    assert f"{n_stuff} (MODEL.SEM_SEG_HEAD.NUM_CLASSES" in r.format()
    codes = {(p.code, p.severity) for p in r.problems}
    assert ("mask_format", "error") in codes  # RLE masks, polygon format
    bad = [p for p in r.problems if p.code == "num_classes_mismatch"]
    assert bad and bad[0].severity == "error" and "SEM_SEG_HEAD.NUM_CLASSES=3" in bad[0].message
    (r,) = check_datasets_from_cfg(load_config(cfg_file, opts + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(n_stuff), "INPUT.MASK_FORMAT", "bitmask"]),
        mode="warn", log=False)
    assert r.ok, [str(p) for p in r.errors]
    # more stuff channels than the map: a warning for training only, fatal where evaluated
    # (the panoptic evaluator fails on labels the metadata does not know, after training)
    more = opts + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(n_stuff + 2), "INPUT.MASK_FORMAT",
                   "bitmask"]
    (r,) = check_datasets_from_cfg(load_config(cfg_file, more), mode="warn", log=False)
    (p,) = [p for p in r.problems if p.code == "num_classes_mismatch"]
    assert p.severity == "warning"
    more[more.index("DATASETS.TEST") + 1] = "('own_pan_chk',)"
    (r,) = check_datasets_from_cfg(load_config(cfg_file, more), mode="warn", log=False)
    (p,) = [p for p in r.problems if p.code == "num_classes_mismatch"]
    assert p.severity == "error" and f"NUM_CLASSES {n_stuff}" in p.message


def test_panoptic_json_with_an_unknown_category_counts_things_and_stuff_apart(shared_data,
                                                                              tmp_path):
    """With json errors the report falls back on the raw json: for panoptic data its
    NUM_CLASSES are the things (and stuff + 1), not every category (it called 132 categories
    the thing count and printed all their ids in every error line)."""
    from d2seg.data.checks import check_dataset

    root = os.path.join(shared_data, "coco_panoptic_sample")
    pan = json.load(open(f"{root}/panoptic_examples.json"))
    pan["categories"] = [c for c in pan["categories"] if c["id"] != 1]  # person, used
    with open(tmp_path / "pan.json", "w") as f:
        json.dump(pan, f)
    register_dataset(f"name=pan_unknown_cat,type=coco_panoptic,image_root={root}/input_images,"
                     f"panoptic_root={root}/panoptic_examples,panoptic_json={tmp_path}/pan.json")
    r = check_dataset("pan_unknown_cat")
    things = sum(1 for c in pan["categories"] if c["isthing"])
    assert r.num_classes_implied == things
    assert r.num_stuff_classes_implied == len(pan["categories"]) - things + 1
    unknown = [p for p in r.errors if p.code == "unknown_category_id"]
    assert unknown and all(f"({len(pan['categories'])} ids)]" in p.message for p in unknown)


def test_coco_panoptic_with_unsorted_categories_and_a_detection_format_instances_json(
        shared_data, tmp_path):
    """Categories in any order (numbered by id, as detectron2's load_coco_json numbers the
    things), and an instances json that also lists the stuff categories (COCO's detection
    format): both loaded, not a metadata conflict."""
    root = os.path.join(shared_data, "coco_panoptic_sample")
    pan = json.load(open(f"{root}/panoptic_examples.json"))
    pan["categories"] = pan["categories"][::-1]
    rev = tmp_path / "reversed.json"
    rev.write_text(json.dumps(pan))
    spec = {"name": "own_pan_rev", "type": "coco_panoptic", "image_root": f"{root}/input_images",
            "panoptic_root": f"{root}/panoptic_examples", "panoptic_json": str(rev)}
    register_dataset(spec)
    dicts = DatasetCatalog.get("own_pan_rev")
    meta = MetadataCatalog.get("own_pan_rev")
    things = sorted((c for c in pan["categories"] if c["isthing"]), key=lambda c: c["id"])
    assert meta.thing_classes == [c["name"] for c in things]
    assert len(dicts) == 2 and all(d["annotations"] for d in dicts)
    det = json.load(open(f"{root}/panoptic_coco_detection_format.json"))
    assert any(not c.get("isthing", 1) for c in det["categories"]) or \
        len(det["categories"]) > len(things)
    register_dataset(dict(spec, name="own_pan_det",
                          instances_json=f"{root}/panoptic_coco_detection_format.json"))
    dicts = DatasetCatalog.get("own_pan_det")
    assert MetadataCatalog.get("own_pan_det").thing_classes == meta.thing_classes
    assert len(dicts) == 2
    bad = dict(det, categories=[c for c in det["categories"] if c["id"] != things[0]["id"]])
    (tmp_path / "bad_inst.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"bad_inst.json: lacks the thing categories "
                                         rf"\[{things[0]['id']}\]"):
        register_dataset(dict(spec, name="own_pan_bad", instances_json=str(tmp_path / "bad_inst.json")))


def test_unregistered_dataset_names_fail_in_one_line_with_a_hint(shared_data):
    """A mistyped DATASETS.TRAIN / TEST name: one ConfigError with close matches, before any
    process starts; names an entry of D2SEG.DATASETS.REGISTER will register count."""
    from d2seg.config import ConfigError
    from d2seg.data.register import check_register_entries

    from conftest import REPO

    cfg_file = os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                  "mask_rcnn_R_18_FPN_cpu.yaml")
    root = os.path.join(shared_data, "fruits_nuts_coco")
    entry = (f"name=own_typo,type=coco,json_file={root}/trainval.json,"
             f"image_root={root}/images,val_fraction=0.25")
    ok = ["D2SEG.DATASETS.REGISTER", str((entry,)), "DATASETS.TRAIN", "('own_typo_train',)",
          "DATASETS.TEST", "('own_typo_val', 'shapes_sem_seg_val')"]
    keys = ("DATASETS.TRAIN", "DATASETS.TEST")
    check_register_entries(load_config(cfg_file, ok), cfg_file, keys)
    bad = ok[:3] + ["('own_typo_trian',)"] + ok[4:]
    with pytest.raises(ConfigError, match=r"DATASETS.TRAIN: dataset 'own_typo_trian' is not "
                                          r"registered; did you mean 'own_typo_train'"):
        check_register_entries(load_config(cfg_file, bad), cfg_file, keys)
    # a tool that does not read DATASETS.TRAIN (predict.py, --eval-only) does not check it
    check_register_entries(load_config(cfg_file, bad), cfg_file, ("DATASETS.TEST",))


def test_split_items_rounds_and_keeps_one_training_item():
    """val count is round(n * fraction), capped so that at least one item trains."""
    train, val = split_items(range(10), 0.29)
    assert len(val) == 3 and len(train) == 7
    train, val = split_items(range(3), 0.9)
    assert len(val) == 2 and len(train) == 1


def test_parse_spec_defaults_values_with_equals_and_empty_required_keys(tmp_path):
    """ignore_label defaults to 255, a value may hold '=', 'null' stays a string, an empty
    required key is missing, val_fraction 0 is rejected, and no split means one name."""
    from d2seg.data.register import registered_names_of_entry

    root = tmp_path / "a=b"
    e = parse_dataset_spec(f"name=s,type=sem_seg,image_root={root},sem_seg_root={tmp_path},"
                           "classes=[bg,null]")
    assert e["ignore_label"] == 255 and e["image_root"] == str(root)
    assert e["classes"] == ["bg", "null"]
    assert registered_names_of_entry(e) == ["s"]
    with pytest.raises(ValueError, match="missing"):
        parse_dataset_spec({"name": "s", "type": "sem_seg", "image_root": "",
                            "sem_seg_root": str(tmp_path), "classes": ["a", "b"]})
    with pytest.raises(ValueError, match="val_fraction=0.0 is not in"):
        parse_dataset_spec(f"name=s,type=sem_seg,image_root={tmp_path},"
                           f"sem_seg_root={tmp_path},classes=[a,b],val_fraction=0")


def test_mask_folder_sizes_extensions_and_remap_cache_key(tmp_path):
    """Mask folders: height/width of a non-square image, upper-case extensions, and a remap
    cache that depends on the ignore label."""
    from d2seg.data.sem_seg_folder import _remap_cache_dir, load_sem_seg_folder

    (tmp_path / "im").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(tmp_path / "im" / "x.PNG")
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tmp_path / "m" / "x.png")
    (d,) = load_sem_seg_folder(str(tmp_path / "im"), str(tmp_path / "m"))
    assert (d["height"], d["width"]) == (3, 5) and d["image_id"] == "x"
    files = [str(tmp_path / "m" / "x.png")]
    assert _remap_cache_dir(files, {1: 0}, 255) != _remap_cache_dir(files, {1: 0}, 0)


def test_masks_with_a_suffix_pair_with_mask_suffix_and_are_named_without_it(tmp_path):
    """Masks named <stem>_mask.png pair nowhere by stem: the entry fails at start-up with the
    counts, an example and the mask_suffix to set; with it they pair (splits too)."""
    from d2seg.config import ConfigError
    from d2seg.data.register import check_register_entries
    from d2seg.data.sem_seg_folder import guess_mask_suffix, load_sem_seg_folder

    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / f"c{i}.jpg")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(tmp_path / "lab" /
                                                              f"c{i}_mask.png")
    assert guess_mask_suffix(["c0", "c1", "c12"], ["c0_mask", "c12_mask", "zz"]) == "_mask"
    assert guess_mask_suffix(["a"], ["b", "c"]) is None
    entry = f"name=suffixed,type=sem_seg,image_root={tmp_path}/im,sem_seg_root={tmp_path}/lab," \
            "classes=[bg,fg],val_fraction=0.5"
    cfg = load_config("", ["D2SEG.DATASETS.REGISTER", str((entry,))])
    with pytest.raises(ConfigError, match=r"'suffixed': 4 images in .* and 4 masks in .* share "
                                          r"no file stem.*e.g. image 'c0', mask 'c0_mask'.*"
                                          r"set mask_suffix=_mask"):
        check_register_entries(cfg)
    with pytest.raises(ValueError, match="set mask_suffix=_mask"):
        load_sem_seg_folder(str(tmp_path / "im"), str(tmp_path / "lab"))
    names = register_dataset(entry + ",mask_suffix=_mask")
    assert names == ["suffixed", "suffixed_train", "suffixed_val"]
    dicts = DatasetCatalog.get("suffixed")
    assert [d["image_id"] for d in dicts] == ["c0", "c1", "c2", "c3"]
    assert dicts[2]["sem_seg_file_name"].endswith("c2_mask.png")
    assert len(DatasetCatalog.get("suffixed_train")) == len(DatasetCatalog.get("suffixed_val")) == 2
    from d2seg.data.checks import check_dataset

    r = check_dataset("suffixed")
    assert r.ok and not _unpaired(r)
    # images and masks in one folder: the files named <stem>_mask are the masks
    import shutil

    for f in (tmp_path / "lab").iterdir():
        shutil.copy(f, tmp_path / "im" / f.name)
    one = f"name=one_folder,type=sem_seg,image_root={tmp_path}/im,sem_seg_root={tmp_path}/im," \
          "classes=[bg,fg],mask_suffix=_mask"
    register_dataset(one)
    dicts = DatasetCatalog.get("one_folder")
    assert [(d["image_id"], os.path.basename(d["sem_seg_file_name"])) for d in dicts] == \
        [(f"c{i}", f"c{i}_mask.png") for i in range(4)]
    r = check_dataset("one_folder")
    assert r.ok and not _unpaired(r)
    # ... and without mask_suffix every file would pair with itself: refused, with the suffix
    same = one.replace("name=one_folder", "name=self_paired").replace(",mask_suffix=_mask", "")
    with pytest.raises(ConfigError, match=r"'self_paired': images and masks are in one folder "
                                          r".* no mask_suffix.*set mask_suffix=_mask"):
        check_register_entries(load_config("", ["D2SEG.DATASETS.REGISTER", str((same,))]))
    with pytest.raises(ValueError, match="set mask_suffix=_mask"):
        load_sem_seg_folder(str(tmp_path / "im"), str(tmp_path / "im"))


def _unpaired(report):
    return [p for p in report.problems if p.code.startswith("unpaired")]


@pytest.mark.parametrize("extra, match", [
    ({"label_map": {0: 0, 255: 300}}, r"label_map maps to class ids \[300\] outside 0-255"),
    ({"label_map": {0: 0, 255: 1}, "ignore_label": -1}, r"ignore_label=-1 is outside 0-255"),
])
def test_a_label_map_that_does_not_fit_8_bit_label_maps_is_refused_at_parse(tmp_path, extra,
                                                                            match):
    spec = {"name": "lm_range", "type": "sem_seg", "image_root": str(tmp_path),
            "sem_seg_root": str(tmp_path), "classes": ["bg", "fg"], **extra}
    with pytest.raises(ValueError, match=r"entry 'lm_range': " + match):
        parse_dataset_spec(spec)


def test_sub_folders_pair_by_their_path_with_recursive(tmp_path):
    """recursive=true: images and masks in case sub-folders pair by the path below each root
    (the same file name in two cases stays two images, also through the label_map remapping,
    which wrote both to one file); without it the error says to set it."""
    from d2seg.config import ConfigError
    from d2seg.data.checks import check_dataset
    from d2seg.data.register import check_register_entries

    for case, fg in (("case01", 255), ("case02", 0)):
        for sub in ("im", "lab"):
            (tmp_path / sub / case).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / case / f"{i}.png")
            m = np.zeros((8, 8), np.uint8)
            m[:4] = fg
            Image.fromarray(m).save(tmp_path / "lab" / case / f"{i}.png")
    spec = (f"name=nested,type=sem_seg,image_root={tmp_path}/im,sem_seg_root={tmp_path}/lab,"
            f"classes=[bg,fg],label_map={{0:0,255:1}}")
    with pytest.raises(ConfigError, match="in sub-folders: set recursive=true"):
        check_register_entries(load_config("", ["D2SEG.DATASETS.REGISTER", str((spec,))]))
    with pytest.raises(ValueError, match="recursive=.maybe. must be true or false"):
        register_dataset(spec + ",recursive=maybe")
    assert register_dataset(spec + ",recursive=true,val_fraction=0.5") == \
        ["nested", "nested_train", "nested_val"]
    dicts = DatasetCatalog.get("nested")
    assert [d["image_id"] for d in dicts] == ["case01/0", "case01/1", "case02/0", "case02/1"]
    assert len({d["sem_seg_file_name"] for d in dicts}) == 4
    fg = [int((np.asarray(Image.open(d["sem_seg_file_name"])) == 1).sum()) for d in dicts]
    assert fg == [32, 32, 0, 0]
    assert sorted(d["image_id"] for n in ("nested_train", "nested_val")
                  for d in DatasetCatalog.get(n)) == [d["image_id"] for d in dicts]
    # the split keeps each case on one side (slices of one patient in train and val inflated
    # the validation scores)
    cases = [{d["image_id"].split("/")[0] for d in DatasetCatalog.get(n)}
             for n in ("nested_train", "nested_val")]
    assert len(cases[0]) == len(cases[1]) == 1 and not cases[0] & cases[1]
    r = check_dataset("nested")
    assert r.ok and not _unpaired(r)
