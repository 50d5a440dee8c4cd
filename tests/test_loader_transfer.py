"""How training samples cross from the loader workers to the training process:
D2SEG.SPEED.PACK_SAMPLES (d2seg/data/pack.py) and D2SEG.SPEED.SHARING_STRATEGY
(d2seg/engine/fast_paths.py). Packing must change nothing but the number of shared-memory
blocks: same dtypes, shapes and values, the same batches out of a real loader."""
import io
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing as mp
import torch.multiprocessing.reductions as reductions

import d2seg  # noqa: F401  (registers everything)
from d2seg.config import load_config
from d2seg.data import build_train_loader
from d2seg.data.pack import PackedBatchCollator, PackedMapper, pack_batch, pack_sample
from d2seg.engine import fast_paths
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from conftest import REPO

UNET = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation", "unet_cpu.yaml")
RCNN = os.path.join(REPO, "configs", "Shapes-InstanceSegmentation", "mask_rcnn_R_18_FPN_cpu.yaml")
SMALL = ["D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE",
         "64", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
         "SOLVER.IMS_PER_BATCH", "4", "SEED", "3"]


@pytest.fixture
def restore_sharing_strategy():
    before = mp.get_sharing_strategy()
    yield
    mp.set_sharing_strategy(before)


def _instance_sample():
    g = torch.Generator().manual_seed(0)
    inst = Instances((20, 30))
    inst.gt_boxes = Boxes(torch.rand(5, 4, generator=g) * 20)
    inst.gt_classes = torch.randint(0, 3, (5,), generator=g)
    inst.gt_masks = BitMasks(torch.rand(5, 20, 30, generator=g) > 0.5)
    return {"file_name": "a.png", "height": 20, "width": 30,
            "image": torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=g),
            "sem_seg": torch.randint(0, 4, (20, 30), generator=g),  # int64
            "instances": inst}


def _storages_pickled(obj) -> int:
    """How many tensor storages ForkingPickler (what the loader workers use) sends."""
    seen = []
    orig = reductions.reduce_storage

    def counting(storage):
        seen.append(storage)
        return orig(storage)

    ForkingPickler.register(torch.UntypedStorage, counting)
    try:
        ForkingPickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(obj)
    finally:
        ForkingPickler.register(torch.UntypedStorage, orig)
    return len(seen)


def test_pack_sample_keeps_every_value_in_one_block():
    ref = _instance_sample()
    want = {"image": ref["image"].clone(), "sem_seg": ref["sem_seg"].clone(),
            "boxes": ref["instances"].gt_boxes.tensor.clone(),
            "classes": ref["instances"].gt_classes.clone(),
            "masks": ref["instances"].gt_masks.tensor.clone()}
    assert _storages_pickled(ref) == 5
    out = pack_sample(ref)
    inst = out["instances"]
    got = {"image": out["image"], "sem_seg": out["sem_seg"], "boxes": inst.gt_boxes.tensor,
           "classes": inst.gt_classes, "masks": inst.gt_masks.tensor}
    base = out["image"].untyped_storage().data_ptr()
    for k, t in got.items():
        assert t.dtype == want[k].dtype and t.shape == want[k].shape, k
        assert torch.equal(t, want[k]), k
        assert t.is_contiguous(), k
        assert t.untyped_storage().data_ptr() == base, k  # one buffer
        assert t.data_ptr() % 64 == 0, k  # aligned views
    assert isinstance(inst.gt_boxes, Boxes) and isinstance(inst.gt_masks, BitMasks)
    assert (out["file_name"], out["height"], out["width"]) == ("a.png", 20, 30)
    assert _storages_pickled(out) == 1
    # what the training process receives: the same values, still one block
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back["instances"].gt_masks.tensor, want["masks"])


def test_pack_sample_leaves_what_it_cannot_pack():
    one = {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "height": 4}
    assert pack_sample(one)["image"] is one["image"]  # a single tensor: nothing to gain
    inst = Instances((4, 4))
    inst.gt_boxes = Boxes(torch.zeros(0, 4))  # no objects
    inst.gt_classes = torch.zeros(0, dtype=torch.int64)
    inst.gt_masks = PolygonMasks([])
    d = {"image": torch.ones(3, 4, 4, dtype=torch.uint8), "sem_seg": torch.ones(4, 4),
         "instances": inst}
    empty = inst.gt_boxes.tensor
    out = pack_sample(d)
    assert out["instances"].gt_boxes.tensor is empty
    assert out["image"].untyped_storage().data_ptr() == out["sem_seg"].untyped_storage().data_ptr()
    packed_image = out["image"]
    assert pack_sample(out)["image"] is packed_image  # already one block: left alone
    assert pack_sample(None) is None and pack_sample([1, 2]) == [1, 2]
    assert PackedMapper(lambda d: None)({"x": 1}) is None  # a skipped sample passes through


def test_pack_batch_makes_the_batch_one_block():
    batch = [_instance_sample() for _ in range(3)]
    batch[1]["image"] = batch[1]["image"][:, :10]  # another size: a view, not contiguous
    want = [{"image": d["image"].clone(), "masks": d["instances"].gt_masks.tensor.clone(),
             "classes": d["instances"].gt_classes.clone()} for d in batch]
    assert _storages_pickled(batch) == 15
    out = PackedBatchCollator()(tuple(batch))  # torch hands a collate_fn a list; any sequence
    assert isinstance(out, list) and len(out) == 3
    assert _storages_pickled(out) == 1
    base = out[0]["image"].untyped_storage().data_ptr()
    for d, w in zip(out, want):
        inst = d["instances"]
        for t, ref in ((d["image"], w["image"]), (inst.gt_masks.tensor, w["masks"]),
                       (inst.gt_classes, w["classes"])):
            assert t.dtype == ref.dtype and torch.equal(t, ref)
            assert t.is_contiguous() and t.untyped_storage().data_ptr() == base
            assert t.data_ptr() % 64 == 0
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back[2]["instances"].gt_boxes.tensor, out[2]["instances"].gt_boxes.tensor)
    assert pack_batch([]) == [] and pack_batch([{"height": 1}]) == [{"height": 1}]


def test_auto_decisions_and_invalid_values():
    no_workers = fast_paths.resolve(load_config(UNET, ["DATALOADER.NUM_WORKERS", "0"]))
    assert not no_workers.pack_samples and no_workers.sharing_strategy == ""
    workers = fast_paths.resolve(load_config(UNET, ["DATALOADER.NUM_WORKERS", "2"]))
    assert workers.pack_samples
    assert workers.sharing_strategy == ("file_system" if "file_system" in
                                        mp.get_all_sharing_strategies() else "")
    forced = fast_paths.resolve(load_config(UNET, [
        "DATALOADER.NUM_WORKERS", "2", "D2SEG.SPEED.PACK_SAMPLES", "off",
        "D2SEG.SPEED.SHARING_STRATEGY", "default"]))
    assert not forced.pack_samples and forced.sharing_strategy == ""
    desc = fast_paths.describe(load_config(UNET, ["DATALOADER.NUM_WORKERS", "2"]))
    assert "pack_samples=on" in desc and "sharing_strategy=" in desc
    for key, value in (("SHARING_STRATEGY", "carrier_pigeon"), ("PACK_SAMPLES", "maybe")):
        # refused when the config loads (fast_paths.validate), as resolve() would
        with pytest.raises(ValueError) as e:
            load_config(UNET, [f"D2SEG.SPEED.{key}", value])
        assert f"D2SEG.SPEED.{key}" in str(e.value) and value in str(e.value)


def test_apply_sharing_strategy(restore_sharing_strategy):
    offered = mp.get_all_sharing_strategies()
    for name in offered:
        cfg = load_config(UNET, ["DATALOADER.NUM_WORKERS", "1",
                                 "D2SEG.SPEED.SHARING_STRATEGY", name])
        assert fast_paths.apply_sharing_strategy(fast_paths.resolve(cfg)) == name
        assert mp.get_sharing_strategy() == name
    cfg = load_config(UNET, ["DATALOADER.NUM_WORKERS", "1",
                             "D2SEG.SPEED.SHARING_STRATEGY", "default"])
    assert fast_paths.apply_sharing_strategy(fast_paths.resolve(cfg)) is None
    assert mp.get_sharing_strategy() == name  # left as it was


def _batches(config, opts, n=2):
    cfg = load_config(config, SMALL + ["DATALOADER.NUM_WORKERS", "2"] + opts)
    cfg.MODEL.DEVICE = "cpu"
    it = iter(build_train_loader(cfg))
    out = [next(it) for _ in range(n)]
    del it
    return out


@pytest.mark.parametrize("config", [UNET, RCNN], ids=["semantic", "instance"])
def test_real_loader_gives_the_same_batches(config, restore_sharing_strategy):
    plain = _batches(config, ["D2SEG.SPEED.PACK_SAMPLES", "off",
                              "D2SEG.SPEED.SHARING_STRATEGY", "file_descriptor"])
    fast = _batches(config, ["D2SEG.SPEED.PACK_SAMPLES", "on",
                             "D2SEG.SPEED.SHARING_STRATEGY", "auto"])
    for a_batch, b_batch in zip(plain, fast):
        assert [d["file_name"] for d in a_batch] == [d["file_name"] for d in b_batch]
        for a, b in zip(a_batch, b_batch):
            assert a["image"].dtype == b["image"].dtype and torch.equal(a["image"], b["image"])
            if "sem_seg" in a:
                assert a["sem_seg"].dtype == b["sem_seg"].dtype
                assert torch.equal(a["sem_seg"], b["sem_seg"])
                assert b["image"].untyped_storage().data_ptr() == \
                    b["sem_seg"].untyped_storage().data_ptr()
            if "instances" in a:
                ia, ib = a["instances"], b["instances"]
                assert torch.equal(ia.gt_boxes.tensor, ib.gt_boxes.tensor)
                assert torch.equal(ia.gt_classes, ib.gt_classes)
                assert [[p.tolist() for p in ps] for ps in ia.gt_masks.polygons] == \
                    [[p.tolist() for p in ps] for ps in ib.gt_masks.polygons]
        if config == UNET:  # semantic configs: no aspect-ratio grouping, one block per batch
            assert len({d[k].untyped_storage().data_ptr() for d in b_batch
                        for k in ("image", "sem_seg")}) == 1


def test_semantic_loader_resumes_exactly_from_any_iteration(restore_sharing_strategy):
    """Without aspect-ratio grouping (the semantic configs) batch k of a rank's stream is
    chunk k of its sampler, with the same augmentations, whichever worker makes it: a loader
    restarted at iteration 1 (SkipSampler, as --resume does) continues the uninterrupted
    loader's order, with 2 workers (with grouping only from multiples of the worker count)."""
    cfg = load_config(UNET, SMALL + ["DATALOADER.NUM_WORKERS", "2", "INPUT.CROP.ENABLED", "True",
                                     "INPUT.CROP.SIZE", "(48, 48)"])
    cfg.MODEL.DEVICE = "cpu"
    assert not cfg.DATALOADER.ASPECT_RATIO_GROUPING
    it = iter(build_train_loader(cfg))
    full = [next(it) for _ in range(4)]
    del it
    it = iter(build_train_loader(cfg, start_iter=1))
    resumed = [next(it) for _ in range(3)]
    del it
    for a_batch, b_batch in zip(full[1:], resumed):
        assert [d["file_name"] for d in a_batch] == [d["file_name"] for d in b_batch]
        for a, b in zip(a_batch, b_batch):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["sem_seg"], b["sem_seg"])
