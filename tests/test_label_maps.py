"""One rule for reading label maps (d2seg.data.image_io.read_sem_seg): stored values are the
class ids, whichever part of d2seg reads them (training mapper, evaluators, dataset checks,
repeat-factor sampler, folder remapping)."""
import numpy as np
import pytest
import torch
from PIL import Image

import d2seg  # noqa: F401
from d2seg.data.image_io import LabelMapError, read_sem_seg

IDS = np.array([[0, 1, 2, 255], [2, 2, 1, 0], [0, 0, 0, 1]], np.uint8)


def _palette_png(path, ids=IDS):
    """A Pascal-VOC-style palette PNG: index i drawn in a colour whose luminance is not i."""
    im = Image.fromarray(ids, mode="P")
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192]
    im.putpalette(pal)
    im.save(path)
    return str(path)


def test_read_sem_seg_modes(tmp_path):
    p = _palette_png(tmp_path / "p.png")
    assert Image.open(p).mode == "P"
    got = read_sem_seg(p)
    assert got.dtype == np.uint8 and np.array_equal(got, IDS)  # indices, not 38/75/220
    Image.fromarray(IDS).save(tmp_path / "l.png")
    assert np.array_equal(read_sem_seg(str(tmp_path / "l.png")), IDS)
    wide = np.array([[0, 1, 300], [1000, 65535, 7]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    got = read_sem_seg(str(tmp_path / "w.png"))
    assert got.dtype.kind in "iu" and np.array_equal(got, wide)  # not clipped at 255
    Image.fromarray(IDS > 0).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    got = read_sem_seg(str(tmp_path / "b.png"))
    assert got.dtype == np.uint8 and np.array_equal(got, (IDS > 0).astype(np.uint8))
    Image.fromarray(np.repeat(IDS[:, :, None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    assert np.array_equal(read_sem_seg(str(tmp_path / "grey_rgb.png")), IDS)
    Image.fromarray(np.stack([IDS, np.full_like(IDS, 9)], axis=2), mode="LA").save(
        tmp_path / "la.png")
    assert np.array_equal(read_sem_seg(str(tmp_path / "la.png")), IDS)
    Image.fromarray(IDS.astype(np.float32)).save(tmp_path / "f.tif")
    got = read_sem_seg(str(tmp_path / "f.tif"))
    assert got.dtype.kind == "i" and np.array_equal(got, IDS)


def test_read_sem_seg_refuses_values_that_are_not_ids(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[0, 0] = (128, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(LabelMapError, match=r"colour.png: a colour-coded label map \(RGB"):
        read_sem_seg(str(tmp_path / "colour.png"))
    Image.fromarray(np.array([[0.5, 1.0]], np.float32)).save(tmp_path / "frac.tif")
    with pytest.raises(ValueError, match="frac.tif: label map of float values that are not"):
        read_sem_seg(str(tmp_path / "frac.tif"))


def test_read_sem_seg_follows_exif_orientation_like_the_image(tmp_path):
    from detectron2.data import detection_utils

    ids = np.arange(6, dtype=np.uint8).reshape(2, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.fromarray(ids).save(tmp_path / "m.png", exif=exif)
    Image.fromarray(np.repeat(ids[:, :, None], 3, axis=2)).save(tmp_path / "i.png", exif=exif)
    img = detection_utils.read_image(str(tmp_path / "i.png"), "RGB")
    got = read_sem_seg(str(tmp_path / "m.png"))
    assert got.shape == img.shape[:2] == (3, 2)
    assert np.array_equal(got, img[..., 0])



def test_folder_dataset_records_the_size_of_an_exif_rotated_photo_as_read(tmp_path):
    """A phone photo stored 40 wide x 20 high with EXIF orientation 6 is read 20 x 40; its
    label map is drawn on the upright photo (40 high x 20 wide). The dataset dict records the
    size as read, so the mapper's size check and the evaluator's resize agree with the image."""
    from detectron2.data import detection_utils

    from d2seg.data.sem_seg_folder import load_sem_seg_folder
    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "img" / "a.jpg", exif=exif)
    Image.fromarray(np.ones((40, 20), np.uint8)).save(tmp_path / "lab" / "a.png")
    (d,) = load_sem_seg_folder(str(tmp_path / "img"), str(tmp_path / "lab"))
    img = detection_utils.read_image(d["file_name"], "RGB")
    assert (d["height"], d["width"]) == img.shape[:2] == (40, 20)
    out = SemSegDatasetMapper(is_train=True, augmentations=[], image_format="RGB")(d)
    assert tuple(out["image"].shape[1:]) == tuple(out["sem_seg"].shape) == (40, 20)


def test_image_size_reads_a_pngs_header_only(tmp_path, monkeypatch):
    """Pillow's PNG getexif() decoded every pixel (10 ms of a 512x512 slice, for each image at
    every catalog load); the eXIf chunk before the pixels is still followed."""
    from PIL import PngImagePlugin

    from d2seg.data.image_io import image_size, read_image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(tmp_path / "rot.png", exif=exif)
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(tmp_path / "plain.png")
    assert image_size(str(tmp_path / "rot.png"), decode=True) == (40, 20)

    def no_decode(self):
        raise AssertionError("decoded")

    # EXIF as ImageMagick writes it into a PNG: a "Raw profile type exif" text chunk
    raw = exif.tobytes().hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw) // 2:8d}\n{raw}\n")
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(tmp_path / "raw.png", pnginfo=info)
    assert image_size(str(tmp_path / "raw.png")) == read_image(str(tmp_path / "raw.png")).shape[:2]

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert image_size(str(tmp_path / "rot.png")) == (40, 20)
    assert image_size(str(tmp_path / "plain.png")) == (20, 40)

def _mapper(label_dtype, resize=None):
    from detectron2.data import transforms as T

    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper

    augs = [T.Resize(resize)] if resize else []
    return SemSegDatasetMapper(is_train=True, augmentations=augs, image_format="RGB",
                               label_dtype=label_dtype)


def _dict(tmp_path, mask_path, shape):
    Image.fromarray(np.zeros(shape + (3,), np.uint8)).save(tmp_path / "img.png")
    return {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(mask_path),
            "height": shape[0], "width": shape[1]}


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.uint8])
def test_mapper_trains_on_palette_indices(tmp_path, label_dtype):
    """detectron2's mapper reads a palette PNG through PIL's "L" conversion (class 1 -> 38,
    ignore 255 -> 220); d2seg's mapper trains on the indices."""
    from detectron2.data import detection_utils

    p = _palette_png(tmp_path / "p.png")
    lum = detection_utils.convert_PIL_to_numpy(Image.open(p), "L")[..., 0]
    assert lum[0, 1] == 38 and lum[0, 3] == 220  # what the "L" conversion would train on
    out = _mapper(label_dtype)(_dict(tmp_path, p, IDS.shape))
    assert out["sem_seg"].dtype == label_dtype
    assert np.array_equal(out["sem_seg"].numpy(), IDS)
    big = _mapper(label_dtype, resize=(6, 8))(_dict(tmp_path, p, IDS.shape))["sem_seg"]
    assert big.shape == (6, 8) and set(big.unique().tolist()) == {0, 1, 2, 255}


def test_mapper_wide_ids(tmp_path):
    """16-bit ids: kept (int64) through detectron2's resize, which refuses uint16/int tensors
    for nearest interpolation; uint8 label maps refuse ids > 255 naming the file and key."""
    wide = np.array([[0, 1, 300], [1000, 2, 7]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    d = _dict(tmp_path, tmp_path / "w.png", wide.shape)
    out = _mapper(torch.int64)(d)["sem_seg"]
    assert out.dtype == torch.int64 and np.array_equal(out.numpy(), wide)
    out = _mapper(torch.int64, resize=(4, 6))(d)["sem_seg"]
    assert out.dtype == torch.int64 and np.array_equal(out.numpy(), wide.repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match=r"w.png: label values 0..1000 .*COMPACT_LABELS"):
        _mapper(torch.uint8)(d)
    # 16-bit files whose ids fit in 0-255 feed uint8 label maps without loss
    Image.fromarray(IDS.astype(np.uint16)).save(tmp_path / "w8.png")
    out = _mapper(torch.uint8)(_dict(tmp_path, tmp_path / "w8.png", IDS.shape))["sem_seg"]
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), IDS)


def test_every_reader_sees_the_same_ids(tmp_path):
    """Mapper, both evaluators' loaders, the repeat-factor sampler and the dataset check read
    one palette PNG as the same ids."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_dataset_dicts
    from d2seg.data.sem_seg_sampler import classes_per_image
    from d2seg.engine.trainer import load_sem_seg_gt
    from d2seg.evaluation import SemSegMetricsEvaluator

    p = _palette_png(tmp_path / "p.png")
    d = _dict(tmp_path, p, IDS.shape)
    name = "d2seg_test_label_maps_palette"
    DatasetCatalog.register(name, lambda: [dict(d)])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255)
    try:
        ev = SemSegMetricsEvaluator(name)
        assert np.array_equal(ev._load_gt({"file_name": d["file_name"]}), IDS)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert np.array_equal(load_sem_seg_gt(p, dtype=np.int64), IDS)
    assert np.array_equal(_mapper(torch.int64)(d)["sem_seg"].numpy(), IDS)
    assert classes_per_image([d], ignore_label=255) == [[0, 1, 2]]
    meta = Metadata(name="label_maps").set(stuff_classes=["a", "b", "c"], ignore_label=255)
    r = check_dataset_dicts([d], meta)
    assert not [x for x in r.problems if x.severity == "error"], r.problems


def test_dataset_check_names_colour_coded_masks(tmp_path):
    from detectron2.data.catalog import Metadata

    from d2seg.data.checks import check_dataset_dicts

    rgb = np.zeros(IDS.shape + (3,), np.uint8)
    rgb[IDS == 1] = (128, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    d = _dict(tmp_path, tmp_path / "colour.png", IDS.shape)
    meta = Metadata(name="label_maps_rgb").set(stuff_classes=["a", "b"], ignore_label=255)
    r = check_dataset_dicts([d], meta)
    (p,) = [x for x in r.problems if x.code == "not_class_ids"]
    assert p.severity == "error" and p.file.endswith("colour.png")
    assert "colour-coded" in p.message and not p.message.startswith(p.file)
    assert not r.ok


def test_folder_remap_of_16_bit_masks(tmp_path, monkeypatch):
    from d2seg.data.sem_seg_folder import load_sem_seg_folder

    monkeypatch.setenv("D2SEG_DATASETS", str(tmp_path / "cache"))
    (tmp_path / "im").mkdir()
    (tmp_path / "m").mkdir()
    raw = np.array([[0, 1000, 1000], [7, 0, 1000]], np.uint16)
    Image.fromarray(np.zeros(raw.shape + (3,), np.uint8)).save(tmp_path / "im" / "x.png")
    Image.fromarray(raw).save(tmp_path / "m" / "x.png")
    (d,) = load_sem_seg_folder(str(tmp_path / "im"), str(tmp_path / "m"),
                               label_map={0: 0, 1000: 1}, ignore_label=255)
    want = np.array([[0, 1, 1], [255, 0, 1]], np.uint8)
    assert np.array_equal(read_sem_seg(d["sem_seg_file_name"]), want)


def test_read_sem_seg_returns_a_writable_array(tmp_path):
    """fvcore's flips hand the label map to torch.from_numpy, which warns on read-only arrays
    (np.asarray of a PIL image is one)."""
    import warnings

    from detectron2.data import transforms as T

    Image.fromarray(IDS).save(tmp_path / "m.png")
    m = read_sem_seg(str(tmp_path / "m.png"))
    assert m.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.HFlipTransform(m.shape[1]).apply_segmentation(m)
