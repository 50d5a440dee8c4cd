"""SemSegDatasetMapper, the foreground-centred crop, exact rot90, semantic repeat factors and
the loaders d2seg.data.build makes."""
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform

import d2seg  # noqa: F401
from d2seg.config import get_cfg
from d2seg.data.build import build_test_loader, build_train_loader
from d2seg.data.sem_seg_mapper import SemSegDatasetMapper, build_sem_seg_augmentation
from d2seg.data.sem_seg_sampler import classes_per_image, repeat_factors_from_sem_seg
from d2seg.data.sem_seg_transforms import (ElasticTransform, ForegroundCenteredCrop,
                                          RandomElasticDeformation, ResizeShortestEdge,
                                          RandomRot90, Rot90Transform)


def make_dataset(tmp_path, name, labels, size=(40, 48)):
    """Register ``name``: one image per label map (class ids; 255 ignore)."""
    dicts = []
    rng = np.random.default_rng(0)
    for i, lab in enumerate(labels):
        img = (rng.random(size + (3,)) * 255).astype(np.uint8)
        fi, fl = tmp_path / f"{name}_{i}.jpg", tmp_path / f"{name}_{i}.png"
        Image.fromarray(img).save(fi)
        Image.fromarray(lab.astype(np.uint8)).save(fl)
        dicts.append({"file_name": str(fi), "sem_seg_file_name": str(fl), "height": size[0],
                      "width": size[1], "image_id": i})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(stuff_classes=["bg", "a", "b"], ignore_label=255,
                                  evaluator_type="sem_seg")
    return dicts


def labels_with_rare_class(n=4, size=(40, 48)):
    labs = []
    for i in range(n):
        lab = np.zeros(size, np.uint8)
        lab[:10, :10] = 1
        if i == 0:
            lab[30, 40] = 2  # class 2 only here, one pixel
        lab[-1, -1] = 255
        labs.append(lab)
    return labs


def test_rot90_transform_matches_numpy_and_coords():
    img = np.arange(6 * 4 * 3).reshape(6, 4, 3).astype(np.uint8)
    for k in range(4):
        t = Rot90Transform(6, 4, k)
        np.testing.assert_array_equal(t.apply_image(img), np.rot90(img, k))
        np.testing.assert_array_equal(t.apply_segmentation(img[..., 0]), np.rot90(img[..., 0], k))
        # the centre of pixel (row 1, col 2) follows the pixel
        mark = np.zeros((6, 4), np.uint8)
        mark[1, 2] = 1
        r, c = np.argwhere(t.apply_segmentation(mark))[0]
        x, y = t.apply_coords(np.array([[2.5, 1.5]]))[0]
        assert (x, y) == (c + 0.5, r + 0.5)
        back = t.inverse().apply_image(t.apply_image(img))
        np.testing.assert_array_equal(back, img)
    aug = RandomRot90()
    shapes = {aug.get_transform(img).apply_image(img).shape for _ in range(40)}
    assert shapes == {(6, 4, 3), (4, 6, 3)}


def test_foreground_centred_crop():
    sem = np.zeros((100, 120), np.uint8)
    sem[90, 5] = 3  # the only foreground pixel, near a corner
    img = np.zeros((100, 120, 3), np.uint8)
    np.random.seed(0)
    always = ForegroundCenteredCrop("absolute", (20, 20), prob=1.0)
    never = ForegroundCenteredCrop("absolute", (20, 20), prob=0.0)

    def contains(t):
        return t.apply_segmentation(sem).max() == 3

    assert all(contains(always.get_transform(img, sem)) for _ in range(50))
    hits = sum(contains(never.get_transform(img, sem)) for _ in range(300))
    assert hits < 60  # a uniform 20x20 crop covers that pixel ~ 3% of the time
    t = always.get_transform(img, sem)
    assert t.apply_image(img).shape == (20, 20, 3)
    # listed classes only: class 3 is not foreground here -> uniform crops
    other = ForegroundCenteredCrop("absolute", (20, 20), prob=1.0, foreground_classes=[1])
    assert sum(contains(other.get_transform(img, sem)) for _ in range(300)) < 60
    # crop larger than the image is clipped to it
    big = ForegroundCenteredCrop("absolute", (200, 200), prob=1.0)
    assert big.get_transform(img, sem).apply_image(img).shape == (100, 120, 3)
    with pytest.raises(ValueError, match="INPUT.FG_CROP.PROB"):
        ForegroundCenteredCrop("absolute", (20, 20), prob=1.5)


def sem_cfg(name):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.DATASET_MAPPER_NAME = "sem_seg"
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def test_mapper_train_and_eval(tmp_path):
    dicts = make_dataset(tmp_path, "d2seg_test_mapper", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_mapper")
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (16, 16)
    cfg.INPUT.FG_CROP.ENABLED = True
    cfg.INPUT.FG_CROP.PROB = 1.0
    cfg.INPUT.FG_CROP.CLASSES = [2]
    cfg.INPUT.RANDOM_FLIP = "both"
    cfg.INPUT.RANDOM_ROT90 = True
    augs = build_sem_seg_augmentation(cfg, True)
    assert [type(a).__name__ for a in augs] == ["ForegroundCenteredCrop", "RandomFlip",
                                                "RandomFlip", "RandomRot90"]
    mapper = SemSegDatasetMapper(cfg, is_train=True)
    for _ in range(5):
        out = mapper(dicts[0])
        assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.uint8
        assert out["sem_seg"].shape == (16, 16) and out["sem_seg"].dtype == torch.long
        assert (out["sem_seg"] == 2).sum() == 1  # the crop is centred on the rare pixel
    ev = SemSegDatasetMapper(cfg, is_train=False)(dicts[1])
    assert ev["image"].shape == (3, 40, 48) and "sem_seg" not in ev
    assert (ev["height"], ev["width"]) == (40, 48)
    # resizing at test time keeps height/width = original size
    cfg.INPUT.MIN_SIZE_TEST = 20
    cfg.INPUT.MAX_SIZE_TEST = 1000
    ev = SemSegDatasetMapper(cfg, is_train=False)(dicts[1])
    assert ev["image"].shape == (3, 20, 24) and (ev["height"], ev["width"]) == (40, 48)


def test_mapper_config_errors(tmp_path):
    cfg = sem_cfg("unused")
    cfg.INPUT.FG_CROP.ENABLED = True
    with pytest.raises(ValueError, match="INPUT.CROP.ENABLED"):
        build_sem_seg_augmentation(cfg, True)
    cfg.INPUT.FG_CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP.*'diagonal'"):
        build_sem_seg_augmentation(cfg, True)
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    from d2seg.data.build import build_mapper

    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME 'nope'"):
        build_mapper(cfg, True)


def test_repeat_factors_from_masks(tmp_path):
    dicts = make_dataset(tmp_path, "d2seg_test_repeat", labels_with_rare_class())
    assert classes_per_image(dicts) == [[0, 1, 2], [0, 1], [0, 1], [0, 1]]
    assert classes_per_image(dicts, min_pixels=2) == [[0, 1]] * 4
    # f_2 = 1/4 -> r_2 = sqrt(0.5 / 0.25); classes 0 and 1 are everywhere -> 1
    f = repeat_factors_from_sem_seg(dicts, 0.5)
    np.testing.assert_allclose(f.numpy(), [2 ** 0.5, 1, 1, 1], rtol=1e-6)
    f = repeat_factors_from_sem_seg(dicts, 0.5, sqrt=False)
    np.testing.assert_allclose(f.numpy(), [2.0, 1, 1, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="REPEAT_THRESHOLD"):
        repeat_factors_from_sem_seg(dicts, 0.0)


def test_loaders_with_repeat_sampler(tmp_path):
    make_dataset(tmp_path, "d2seg_test_loader", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_loader")
    cfg.DATALOADER.SAMPLER_TRAIN = "SemSegRepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 1.0
    cfg.DATALOADER.REPEAT_SQRT = False
    loader = build_train_loader(cfg)
    seen = []
    it = iter(loader)
    for _ in range(50):
        batch = next(it)
        assert len(batch) == 2 and all(b["sem_seg"].shape == (40, 48) for b in batch)
        seen += [b["image_id"] for b in batch]
    # image 0 has factor 4 (class 2 in 1 of 4 images, t = 1, no sqrt): 4 of every 7 samples,
    # against 1 in 4 with the plain TrainingSampler
    assert seen.count(0) > 40
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    it = iter(build_train_loader(cfg))
    plain = [b["image_id"] for _ in range(50) for b in next(it)]
    assert plain.count(0) < 40
    test_loader = build_test_loader(cfg, "d2seg_test_loader")
    items = [x for b in test_loader for x in b]
    assert len(items) == 4 and "sem_seg" not in items[0]


def test_random_subset_sampler_has_its_key_and_trains_on_a_fixed_subset(tmp_path):
    # detectron2's defaults lack DATALOADER.RANDOM_SUBSET_RATIO; add_d2seg_config adds it
    make_dataset(tmp_path, "d2seg_test_subset", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_subset")
    assert cfg.DATALOADER.RANDOM_SUBSET_RATIO == 1.0
    cfg.DATALOADER.SAMPLER_TRAIN = "RandomSubsetTrainingSampler"
    cfg.DATALOADER.RANDOM_SUBSET_RATIO = 0.5
    cfg.SEED = 3
    it = iter(build_train_loader(cfg))
    seen = {b["image_id"] for _ in range(20) for b in next(it)}
    assert len(seen) == 2  # half of the 4 images, the same half all run
    cfg.DATALOADER.RANDOM_SUBSET_RATIO = 1.5
    with pytest.raises(ValueError, match=r"DATALOADER\.RANDOM_SUBSET_RATIO must be in \(0, 1\], "
                                         r"got 1\.5"):
        build_train_loader(cfg)


def test_elastic_transform_zero_field_is_identity_and_shift_is_exact():
    img = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    lab = np.arange(42, dtype=np.int64).reshape(6, 7)
    t = ElasticTransform(6, 7, np.zeros((3, 3, 2), np.float32))
    assert (t.apply_image(img) == img).all()
    out = t.apply_segmentation(lab)
    assert out.dtype == np.int64 and (out == lab).all()
    # a constant field (dx=1, dy=0) moves content left by one pixel: out[y, x] = in[y, x + 1]
    g = np.zeros((3, 3, 2), np.float32)
    g[..., 0] = 1.0
    t = ElasticTransform(6, 7, g)
    assert (t.apply_segmentation(lab)[:, :-1] == lab[:, 1:]).all()
    assert (t.apply_image(img)[:, :-1] == img[:, 1:]).all()
    assert t.apply_image(img[..., :1]).shape == (6, 7, 1)
    with pytest.raises(ValueError, match="made for 6x7"):
        t.apply_image(np.zeros((5, 7), np.uint8))
    with pytest.raises(NotImplementedError, match="INPUT.ELASTIC"):
        t.apply_coords(np.zeros((1, 2)))


def test_random_elastic_keeps_labels_and_shapes():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    lab = np.zeros((64, 80), np.uint8)
    lab[20:40, 10:50] = 1
    lab[50:, :] = 255
    np.random.seed(0)
    inp = T.AugInput(img, sem_seg=lab)
    tf = T.AugmentationList([RandomElasticDeformation(grid=3, std=10.0, prob=1.0)])(inp)
    assert isinstance(tf.transforms[0], ElasticTransform)
    assert inp.image.shape == img.shape and inp.image.dtype == np.uint8
    assert set(np.unique(inp.sem_seg)) <= {0, 1, 255}  # nearest: no new class ids
    changed = (inp.sem_seg != lab).mean()
    assert 0.005 < changed < 0.5  # deformed, but smoothly
    # the same transform applied to image and labels: label 1 still covers the same pixels of
    # a labelled image whose intensity equals the label
    t = tf.transforms[0]
    assert (t.apply_segmentation(lab) == t.apply_image(lab)).mean() > 0.97
    assert isinstance(RandomElasticDeformation(prob=0.0).get_transform(img), NoOpTransform)
    assert isinstance(RandomElasticDeformation(std=0.0).get_transform(img), NoOpTransform)
    for kw, key in (({"grid": 1}, "GRID"), ({"std": -1.0}, "STD"), ({"prob": 2.0}, "PROB")):
        with pytest.raises(ValueError, match=f"INPUT.ELASTIC.{key}"):
            RandomElasticDeformation(**kw)


def test_elastic_from_config(tmp_path):
    dicts = make_dataset(tmp_path, "d2seg_test_elastic", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_elastic")
    cfg.INPUT.ELASTIC.ENABLED = True
    cfg.INPUT.ELASTIC.STD = 4.0
    augs = build_sem_seg_augmentation(cfg, True)
    assert type(augs[-1]).__name__ == "RandomElasticDeformation" and augs[-1].std == 4.0
    assert not any(type(a).__name__ == "RandomElasticDeformation"
                   for a in build_sem_seg_augmentation(cfg, False))
    out = SemSegDatasetMapper(cfg, is_train=True)(dicts[0])
    assert out["image"].shape == (3, 40, 48) and out["sem_seg"].shape == (40, 48)
    assert set(out["sem_seg"].unique().tolist()) <= {0, 1, 2, 255}


def test_compact_labels_are_uint8_with_the_same_values(tmp_path):
    """D2SEG.SPEED.COMPACT_LABELS (auto: d2seg segmentors): the mapper's label maps are uint8
    (8x fewer bytes through workers, pinned memory and the device copy), the segmentor widens
    them on the device, and the losses are the same as with int64 labels."""
    from detectron2.modeling import build_model

    from d2seg.engine import fast_paths

    dicts = make_dataset(tmp_path, "d2seg_test_compact", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_compact")
    cfg.INPUT.RANDOM_FLIP = "none"
    assert not fast_paths.resolve(cfg).compact_labels  # detectron2's GeneralizedRCNN default
    cfg.MODEL.META_ARCHITECTURE = "UNet"
    cfg.MODEL.BACKBONE.NAME = "build_unet_backbone"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "UNetHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.UNET.BASE_CHANNELS = 4
    cfg.MODEL.UNET.DEPTH = 2
    cfg.MODEL.DEVICE = "cpu"
    assert fast_paths.resolve(cfg).compact_labels
    assert "compact_labels=on" in fast_paths.describe(cfg)
    small = SemSegDatasetMapper(cfg, is_train=True)(dicts[0])
    cfg.D2SEG.SPEED.COMPACT_LABELS = "off"
    wide = SemSegDatasetMapper(cfg, is_train=True)(dicts[0])
    assert small["sem_seg"].dtype == torch.uint8 and wide["sem_seg"].dtype == torch.int64
    assert torch.equal(small["sem_seg"].long(), wide["sem_seg"])
    assert 255 in wide["sem_seg"].unique().tolist()  # the ignore label survives
    torch.manual_seed(0)
    model = build_model(cfg).train()
    a = model([small, small])
    b = model([wide, wide])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # "on" where it cannot work names the key and why
    cfg.D2SEG.SPEED.COMPACT_LABELS = "on"
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 300
    with pytest.raises(ValueError, match="COMPACT_LABELS 'on' needs MODEL.SEM_SEG_HEAD."
                                         "IGNORE_VALUE in \\[0, 255\\], got 300"):
        fast_paths.resolve(cfg)
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    # more classes than uint8 holds: auto turns it off, "on" names the key
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 847
    with pytest.raises(ValueError, match="NUM_CLASSES <= 256, got 847"):
        fast_paths.resolve(cfg)
    cfg.D2SEG.SPEED.COMPACT_LABELS = "auto"
    assert not fast_paths.resolve(cfg).compact_labels
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 256
    assert fast_paths.resolve(cfg).compact_labels
    cfg.D2SEG.SPEED.COMPACT_LABELS = "on"
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    with pytest.raises(ValueError, match="not one; its head may need int64 labels"):
        fast_paths.resolve(cfg)


def test_resize_shortest_edge_skips_only_the_same_size():
    """d2seg's ResizeShortestEdge draws what detectron2's draws and gives the same arrays; where
    the drawn size is the image's own it is a NoOpTransform (no PIL round trip)."""
    rng = np.random.default_rng(3)
    img = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    lab = rng.integers(0, 5, (64, 80)).astype(np.uint8)
    for args in [((64, 96, 128), 1000, "choice"), ((48, 96), 1000, "range"), ((64,), 70, "choice")]:
        ours, theirs = ResizeShortestEdge(*args), T.ResizeShortestEdge(*args)
        for seed in range(6):
            np.random.seed(seed)
            t_ours = ours.get_transform(img)
            state = np.random.get_state()[1].copy()
            np.random.seed(seed)
            t_theirs = theirs.get_transform(img)
            assert np.array_equal(state, np.random.get_state()[1])  # the same random draws
            same = (t_theirs.new_h, t_theirs.new_w) == (64, 80)
            assert isinstance(t_ours, NoOpTransform) == same
            assert isinstance(t_ours, T.ResizeTransform) != same
            assert np.array_equal(t_ours.apply_image(img), t_theirs.apply_image(img))
            assert np.array_equal(t_ours.apply_segmentation(lab), t_theirs.apply_segmentation(lab))
    # the size-keeping draw happened (64 of the choices / the max-size cap of 70 < 80)
    np.random.seed(0)
    assert isinstance(ResizeShortestEdge((64,), 1000, "choice").get_transform(img), NoOpTransform)
    assert isinstance(ResizeShortestEdge((64,), 70, "choice").get_transform(img), T.ResizeTransform)
    cfg = get_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "sem_seg"
    for is_train in (True, False):  # the semantic mapper uses it, train and test
        augs = build_sem_seg_augmentation(cfg, is_train)
        assert any(isinstance(a, ResizeShortestEdge) for a in augs)


def test_position_seeded_mapper_draws_by_position_and_restores_the_caller_rngs(monkeypatch):
    """Each sample's python / numpy / torch draws depend only on (seed, rank, position); in
    the training process the caller's RNG streams are left as they were. Only the CPU torch
    generator is seeded (torch.manual_seed would also queue a lazy CUDA seeding that formats
    the call stack for every sample)."""
    import random

    from d2seg.data.build import PositionSeededMapper

    def draw(_):
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def full_seed(_):
        raise AssertionError("torch.manual_seed called per sample")

    monkeypatch.setattr(torch, "manual_seed", full_seed)
    a = PositionSeededMapper(draw, seed=3, batch_size=2)
    torch.default_generator.manual_seed(11)
    before = torch.rand(3)
    torch.default_generator.manual_seed(11)
    first = [a(None) for _ in range(4)]
    assert torch.equal(torch.rand(3), before)  # the caller's torch stream is untouched
    resumed = PositionSeededMapper(draw, seed=3, batch_size=2, start=2)  # skip one batch
    assert [resumed(None) for _ in range(2)] == first[2:]
    assert len(set(first)) == 4
    other = PositionSeededMapper(draw, seed=4, batch_size=2)
    assert other(None) != first[0]


def test_repeat_sampler_takes_seed_and_min_pixels_from_the_config(tmp_path):
    """build_sem_seg_repeat_sampler passes cfg.SEED and DATALOADER.SEM_SEG_REPEAT_MIN_PIXELS."""
    from d2seg.data.sem_seg_sampler import build_sem_seg_repeat_sampler

    dicts = make_dataset(tmp_path, "d2seg_test_repeat_cfg", labels_with_rare_class())
    cfg = sem_cfg("d2seg_test_repeat_cfg")
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    cfg.SEED = 7
    cfg.DATALOADER.SEM_SEG_REPEAT_MIN_PIXELS = 2  # the one rare pixel no longer counts
    sampler = build_sem_seg_repeat_sampler(cfg, dicts)
    assert sampler._seed == 7
    np.testing.assert_allclose(sampler._int_part + sampler._frac_part, [1, 1, 1, 1])


def test_mapper_loads_gt_in_eval_when_asked_and_drops_annotations(tmp_path):
    """load_gt_in_eval=True gives "sem_seg" at inference; "annotations" never reach the model."""
    dicts = make_dataset(tmp_path, "d2seg_test_mapper_gt", labels_with_rare_class(1))
    d = dict(dicts[0], annotations=[{"bbox": [0, 0, 1, 1]}])
    mapper = SemSegDatasetMapper(is_train=False, augmentations=[], load_gt_in_eval=True)
    out = mapper(d)
    assert out["sem_seg"].shape == (40, 48) and int((out["sem_seg"] == 2).sum()) == 1
    assert "annotations" not in out
    assert "annotations" not in SemSegDatasetMapper(is_train=True, augmentations=[])(d)


def test_repeat_factor_classes_read_label_maps_by_the_one_rule(tmp_path):
    """classes_per_image reads a grey label map saved as RGB as its ids and refuses a
    colour-coded one (as the mapper and the evaluators do: read_sem_seg)."""
    from d2seg.data.image_io import LabelMapError

    m = np.zeros((4, 4, 3), np.uint8)
    m[:2] = 1
    m[2:] = 3
    Image.fromarray(m).save(tmp_path / "rgb.png")
    assert classes_per_image([{"sem_seg_file_name": str(tmp_path / "rgb.png")}]) == [[1, 3]]
    m[..., 1:] = 7  # other channels differ: colours, not ids
    Image.fromarray(m).save(tmp_path / "colour.png")
    with pytest.raises(LabelMapError, match="colour.png: a colour-coded"):
        classes_per_image([{"sem_seg_file_name": str(tmp_path / "colour.png")}])
