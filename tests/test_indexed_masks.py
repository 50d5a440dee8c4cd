"""D2SEG.SPEED.RCNN_INDEXED_MASKS (d2seg/modeling/indexed_masks.py): bit-mask targets cropped
by object index are the targets detectron2 crops from per-proposal copies, and Mask R-CNN
trains bit-identically with them; polygon masks are left alone."""
import os

import torch

import d2seg  # noqa: F401  (registers everything)
from d2seg.benchmark.subjects import SyntheticBatch
from d2seg.config import load_config
from d2seg.engine import Trainer, fast_paths
from d2seg.modeling.indexed_masks import IndexedBitMasks, index_gt_masks

from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from conftest import REPO

RCNN = os.path.join(REPO, "configs", "Shapes-InstanceSegmentation", "mask_rcnn_R_18_FPN_cpu.yaml")


def _masks(gen: torch.Generator, m: int = 4, h: int = 37, w: int = 53) -> torch.Tensor:
    return torch.rand(m, h, w, generator=gen) > 0.6


def test_indexing_and_crops_match_copied_bitmasks():
    gen = torch.Generator().manual_seed(0)
    base = _masks(gen)
    idx = torch.randint(0, 4, (50,), generator=gen)
    lazy, copied = IndexedBitMasks(base, idx), BitMasks(base[idx])
    assert len(lazy) == 50 and lazy.image_size == (37, 53)
    assert torch.equal(lazy.tensor, copied.tensor)
    sel = torch.rand(50, generator=gen) > 0.5
    order = torch.randperm(50, generator=gen)[:20]
    for item in (order, sel, slice(3, 40, 2), 7):  # long, bool, slice, int
        a, b = lazy[item], copied[item]
        assert isinstance(a, IndexedBitMasks) and torch.equal(a.tensor, b.tensor)
    # boxes inside, overlapping the border and degenerate; several mask sizes
    xy = torch.rand(20, 2, generator=gen) * torch.tensor([60.0, 45.0]) - 5
    wh = torch.rand(20, 2, generator=gen) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])
    for size in (7, 14, 28):
        a = lazy[order].crop_and_resize(boxes, size)
        b = copied[order].crop_and_resize(boxes, size)
        assert a.dtype == torch.bool and a.shape == (20, size, size)
        assert torch.equal(a, b)
    assert torch.equal(lazy.nonempty(), copied.nonempty())
    assert torch.equal(lazy.get_bounding_boxes().tensor, copied.get_bounding_boxes().tensor)
    moved = lazy.to("cpu")
    assert isinstance(moved, IndexedBitMasks) and torch.equal(moved.tensor, copied.tensor)


def test_targets_are_wrapped_only_for_bitmasks():
    gen = torch.Generator().manual_seed(1)
    bit = Instances((37, 53), gt_boxes=Boxes(torch.rand(4, 4)), gt_classes=torch.arange(4),
                    gt_masks=BitMasks(_masks(gen)))
    poly = Instances((37, 53), gt_boxes=Boxes(torch.rand(1, 4)), gt_classes=torch.zeros(1),
                     gt_masks=PolygonMasks([[[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]]))
    a, b = index_gt_masks([bit, poly])
    assert isinstance(a.gt_masks, IndexedBitMasks) and torch.equal(a.gt_masks.tensor,
                                                                    bit.gt_masks.tensor)
    assert a.gt_classes is bit.gt_classes and type(bit.gt_masks) is BitMasks  # not mutated
    assert b is poly
    assert index_gt_masks(None) is None


def _train(indexed: bool, steps: int = 2):
    cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.RCNN_INDEXED_MASKS",
                             "on" if indexed else "off", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
                             "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"])
    assert fast_paths.resolve(cfg).rcnn_indexed_masks == indexed
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    opt = Trainer.build_optimizer(cfg, model)
    batch = SyntheticBatch("instance", 2, 96, 96, torch.device("cpu"), num_thing_classes=3,
                           instances_per_image=3).d2_inputs()
    assert type(batch[0]["instances"].gt_masks) is BitMasks
    seen = []
    handle = model.roi_heads.mask_head.register_forward_pre_hook(
        lambda mod, args: seen.append(type(args[1][0].gt_masks)))
    losses = []
    with EventStorage(0):
        for _ in range(steps):
            torch.manual_seed(1)  # the same proposal sampling on both sides
            out = model(batch)
            opt.zero_grad()
            sum(out.values()).backward()
            opt.step()
            losses.append({k: v.item() for k, v in out.items()})
    handle.remove()
    return model, losses, seen


def test_mask_rcnn_trains_identically_with_indexed_masks():
    model_a, plain, seen_a = _train(False)
    model_b, indexed, seen_b = _train(True)
    assert plain == indexed  # bit-identical losses (loss_mask included) over two steps
    assert seen_a == [BitMasks] * 2 and seen_b == [IndexedBitMasks] * 2
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    # the caller's batch keeps its BitMasks; eval runs without targets
    model_b.eval()
    with torch.no_grad():
        model_b([{"image": torch.zeros(3, 96, 96), "height": 96, "width": 96}])
