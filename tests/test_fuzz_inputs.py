"""Property tests: broken files thrown at d2seg's loaders, mapper and dataset checker.

Whatever the input (random bytes, truncated PNG/JPEG, masks of the wrong size, malformed COCO
or panoptic json), the outcome is one of: it loads; a d2seg error whose message names the
offending file; or a checker report listing the problem with its file. Never an unexplained
exception from deep inside a library, never a hang (pytest-timeout guards each example).
"""
import copy
import io
import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import d2seg  # noqa: F401
from d2seg.data.checks import check_dataset
from d2seg.data.register import DatasetLoadError, register_dataset
from d2seg.data.safe_mapper import BadInputError, SafeMapper
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper

SETTINGS = dict(max_examples=int(os.environ.get("D2SEG_FUZZ_EXAMPLES", "25")), deadline=None, derandomize=True,
                database=None,  # (no .hypothesis/ folder in the repo)
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _jpg(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG")
    return b.getvalue()


GOOD = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["good_png", "good_jpg", "random", "trunc_png", "trunc_jpg", "empty"]))
    if kind == "good_png":
        return kind, _png(GOOD)
    if kind == "good_jpg":
        return kind, _jpg(GOOD)
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=400))
    if kind == "empty":
        return kind, b""
    data = _png(GOOD) if kind == "trunc_png" else _jpg(GOOD)
    cut = draw(st.integers(min_value=1, max_value=len(data) - 1))
    return kind, data[:cut]


def _mapper():
    cfg = d2_get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    cfg.INPUT.MAX_SIZE_TRAIN = 100
    return SafeMapper(DatasetMapper(cfg, is_train=True), policy="fail")


def _explained(err: BaseException, path: str) -> bool:
    return isinstance(err, (BadInputError, DatasetLoadError)) and path in str(err)


@settings(**SETTINGS)
@given(img=image_bytes(), mask_hw=st.sampled_from([(40, 48), (40, 47), (12, 48), (1, 1)]),
       mask_val=st.integers(0, 255))
def test_semantic_folder_inputs(tmp_path_factory, img, mask_hw, mask_val):
    root = tmp_path_factory.mktemp("sem")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    kind, data = img
    (root / "img" / "a.png").write_bytes(data)
    mask = np.full(mask_hw, mask_val, np.uint8)
    (root / "mask" / "a.png").write_bytes(_png(mask))
    name = "fuzz_sem"
    register_dataset({"name": name, "type": "sem_seg", "image_root": str(root / "img"),
                      "sem_seg_root": str(root / "mask"), "classes": ["bg", "fg"]})
    bad_image = not kind.startswith("good")
    bad_mask = mask_hw != (40, 48) or mask_val not in (0, 1, 255)
    # the checker reports, never raises
    report = check_dataset(name)
    if bad_image or bad_mask:
        assert report.errors, (kind, mask_hw, mask_val)
        assert all(str(root) in p.file for p in report.errors)
    # the loader + mapper either work or name the file
    try:
        dicts = DatasetCatalog.get(name)
        out = _mapper()(copy.deepcopy(dicts[0]))
        assert not bad_image and mask_hw == (40, 48)
        assert out["image"].shape[-2:] == out["sem_seg"].shape
    except Exception as e:  # noqa: BLE001
        assert _explained(e, str(root)), f"unexplained {type(e).__name__}: {e}"


def _encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    """One label map (uint8 ids) in one of the encodings users' mask folders hold."""
    if encoding == "P":  # palette: colours whose luminance is not the index
        im = Image.fromarray(mask, mode="P")
        im.putpalette([(37 * i) % 256 for i in range(768)])
    elif encoding == "I;16":
        im = Image.fromarray(mask.astype(np.uint16))
    elif encoding == "RGB-grey":
        im = Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2))
    else:  # "RGB-colour": one channel holds the id, the others a colour
        rgb = np.zeros(mask.shape + (3,), np.uint8)
        rgb[..., 0], rgb[..., 1] = mask, 255 - mask
        im = Image.fromarray(rgb)
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


@settings(**SETTINGS)
@given(encoding=st.sampled_from(["P", "I;16", "RGB-grey", "RGB-colour"]),
       mask_val=st.sampled_from([0, 1, 2, 255]))
def test_label_map_encodings(tmp_path_factory, encoding, mask_val):
    """Whatever the encoding, d2seg's checker and semantic mapper read the same ids
    (d2seg.data.image_io.read_sem_seg) or both refuse the file by name."""
    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper

    root = tmp_path_factory.mktemp("enc")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    (root / "img" / "a.png").write_bytes(_png(GOOD))
    mask = np.full((40, 48), mask_val, np.uint8)
    mask[:10] = 0
    (root / "mask" / "a.png").write_bytes(_encode_mask(mask, encoding))
    name = "fuzz_enc"
    register_dataset({"name": name, "type": "sem_seg", "image_root": str(root / "img"),
                      "sem_seg_root": str(root / "mask"), "classes": ["bg", "fg"]})
    colour = encoding == "RGB-colour"  # the channels differ (id 0 is drawn (0, 255, 0))
    report = check_dataset(name)
    codes = {p.code for p in report.errors}
    # 0 and 255 only, two classes, no label_map: 0/255 binary masks read as ignore
    assert codes == ({"not_class_ids"} if colour else
                     {"label_out_of_range"} if mask_val == 2 else
                     {"foreground_is_ignore"} if mask_val == 255 else set()), codes
    mapper = SafeMapper(SemSegDatasetMapper(is_train=True, augmentations=[],
                                            image_format="RGB"), policy="fail")
    try:
        out = mapper(copy.deepcopy(DatasetCatalog.get(name)[0]))
        assert not colour and np.array_equal(out["sem_seg"].numpy(), mask)
    except Exception as e:  # noqa: BLE001
        assert colour and _explained(e, str(root)), f"{type(e).__name__}: {e}"


VALID_COCO = {
    "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 48}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100.0,
                     "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}],
    "categories": [{"id": 1, "name": "thing"}],
}


@st.composite
def mutated_json(draw, base):
    d = copy.deepcopy(base)
    op = draw(st.sampled_from(["ok", "drop_top", "drop_field", "wrong_type", "garbage",
                               "truncate", "not_object"]))
    if op == "drop_top":
        d.pop(draw(st.sampled_from(sorted(d))))
    elif op in ("drop_field", "wrong_type"):
        top = draw(st.sampled_from([k for k in sorted(d) if d[k]]))
        item = d[top][0]
        key = draw(st.sampled_from(sorted(item)))
        if op == "drop_field":
            item.pop(key)
        else:
            item[key] = draw(st.sampled_from(["x", None, -5, [[]], {"a": 1}, 1e9]))
    if op == "garbage":
        return op, draw(st.binary(min_size=0, max_size=200))
    text = json.dumps(d if op != "not_object" else [d]).encode()
    if op == "truncate":
        return op, text[: draw(st.integers(0, len(text) - 1))]
    return op, text


@settings(**SETTINGS)
@given(js=mutated_json(VALID_COCO))
def test_malformed_coco_json(tmp_path_factory, js):
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(_png(GOOD[:40, :48]))
    path = root / "ann.json"
    op, data = js
    path.write_bytes(data)
    spec = {"name": "fuzz_coco", "type": "coco", "json_file": str(path),
            "image_root": str(root / "images")}
    try:
        register_dataset(spec)
        dicts = DatasetCatalog.get("fuzz_coco")
    except Exception as e:  # noqa: BLE001
        assert _explained(e, str(path)), f"{op}: unexplained {type(e).__name__}: {e}"
        return
    report = check_dataset("fuzz_coco")  # must not raise
    if op == "ok":
        assert not report.errors and len(dicts) == 1


def _pan_png(ids):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    return _png(rgb)


VALID_PAN = {
    "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 48}],
    "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
        {"id": 7, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [2, 2, 10, 10]},
        {"id": 9, "category_id": 2, "iscrowd": 0, "area": 1820, "bbox": [0, 0, 48, 40]}]}],
    "categories": [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}],
}


@settings(**SETTINGS)
@given(js=mutated_json(VALID_PAN))
def test_malformed_panoptic_json(tmp_path_factory, js):
    root = tmp_path_factory.mktemp("pan")
    (root / "images").mkdir()
    (root / "pan").mkdir()
    (root / "images" / "a.png").write_bytes(_png(GOOD[:40, :48]))
    ids = np.full((40, 48), 9, np.uint32)
    ids[2:12, 2:12] = 7
    (root / "pan" / "a.png").write_bytes(_pan_png(ids))
    path = root / "pan.json"
    op, data = js
    path.write_bytes(data)
    spec = {"name": "fuzz_pan", "type": "coco_panoptic", "image_root": str(root / "images"),
            "panoptic_root": str(root / "pan"), "panoptic_json": str(path)}
    try:
        register_dataset(spec)
        dicts = DatasetCatalog.get("fuzz_pan")
    except Exception as e:  # noqa: BLE001
        assert _explained(e, str(path)), f"{op}: unexplained {type(e).__name__}: {e}"
        return
    report = check_dataset("fuzz_pan")
    if op == "ok":
        assert not report.errors and len(dicts) == 1
