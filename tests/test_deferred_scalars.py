"""Statistics logged from device counts read with the losses (d2seg/utils/deferred_scalars.py):
the same values at the same iterations as detectron2's immediate reads, in d2seg's trainer
("step" and "lagged" checks) and outside it."""
import os

import pytest
import torch

import d2seg  # noqa: F401
from detectron2.utils.events import EventStorage

from d2seg.benchmark.subjects import SyntheticBatch
from d2seg.benchmark.syncs import HostSyncAudit, tensors_in
from d2seg.config import load_config
from d2seg.utils.deferred_scalars import (collect_scalars, packed_counts, put_scalars_later,
                                          resolve_scalars, stop_collecting, take_scalars)

from conftest import REPO

CPU_CFG = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
TINY = ["D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", "4", "SEED", "3", "SOLVER.AMP.ENABLED", "False"]
STATS = ("fast_rcnn/", "mask_rcnn/", "rpn/", "roi_head/")


def _ratio(c):
    return {"x/ratio": c[0] / c[1]} if c[1] > 0 else {}


def test_outside_a_trainer_the_counts_are_read_at_once():
    with EventStorage(5) as s:
        put_scalars_later(torch.tensor([3, 4]), _ratio)
        put_scalars_later(torch.tensor([1, 0]), _ratio)  # a value left out, as detectron2 does
        assert s.history("x/ratio").values() == [(0.75, 5)]


def test_collected_counts_come_back_in_one_vector_for_their_iteration():
    with EventStorage(7) as s:
        collect_scalars(s)
        put_scalars_later(torch.tensor([3, 4]), _ratio)
        put_scalars_later(torch.tensor([[2.0, 8.0]]), _ratio)  # flattened
        assert "x/ratio" not in s.histories()  # queued, not read
        queued = take_scalars(s)
        assert len(queued) == 2 and take_scalars(s) == []
        host = packed_counts(queued)
        assert host.dtype == torch.float64 and host.tolist() == [3.0, 4.0, 2.0, 8.0]
        s.iter = 8  # read while the next step runs: written for the step they belong to
        resolve_scalars(s, queued, host.tolist(), 7)
        assert s.history("x/ratio").values() == [(0.75, 7), (0.25, 7)]
        put_scalars_later(torch.tensor([1, 2]), _ratio)
        assert len(stop_collecting(s)) == 1
        put_scalars_later(torch.tensor([1, 2]), _ratio)  # collection over: read at once
        assert s.history("x/ratio").values()[-1] == (0.5, 8)


def _stats(out, *opts):
    from d2seg.engine import default_argument_parser
    from d2seg.engine.train_loop import setup
    from d2seg.engine.trainer import Trainer

    args = default_argument_parser().parse_args(
        ["--config-file", CPU_CFG, "OUTPUT_DIR", str(out), *TINY, *opts])
    torch.manual_seed(0)
    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=False)
    trainer.train()
    hists = trainer.storage.histories()
    out = {k: [(it, v) for v, it in h.values()] for k, h in hists.items()
           if k.startswith(STATS) or k == "total_loss"}
    return out, trainer


def test_rcnn_statistics_are_detectron2s_values_at_the_same_iterations(tmp_path):
    """RCNN_SYNC_FREE queues the box classifier's and the mask head's statistics; detectron2
    reads them mid-step. Same training (bit-identical losses), same logged values, with the
    non-finite check per step or lagged."""
    per_image = ["D2SEG.SPEED.RCNN_BATCHED", "off"]  # detectron2's sampling on both sides
    ref, _ = _stats(tmp_path / "a", *per_image, "D2SEG.SPEED.RCNN_SYNC_FREE", "off")
    new, t = _stats(tmp_path / "b", *per_image, "D2SEG.SPEED.RCNN_SYNC_FREE", "on")
    lag, t2 = _stats(tmp_path / "c", *per_image, "D2SEG.SPEED.RCNN_SYNC_FREE", "on",
                     "D2SEG.NONFINITE.CHECK", "lagged")
    assert t2._trainer.lagged and not t._trainer.lagged
    for name in ("fast_rcnn/cls_accuracy", "fast_rcnn/fg_cls_accuracy",
                 "fast_rcnn/false_negative", "mask_rcnn/accuracy", "mask_rcnn/false_positive",
                 "mask_rcnn/false_negative", "rpn/num_pos_anchors", "total_loss"):
        assert [it for it, _ in ref[name]] == [0, 1, 2, 3], name
    assert new == ref
    assert lag == ref
    # the batched RPN's anchor counts are queued too: the same with either check
    b_step, _ = _stats(tmp_path / "d")
    b_lag, _ = _stats(tmp_path / "e", "D2SEG.NONFINITE.CHECK", "lagged")
    assert [it for it, _ in b_step["rpn/num_pos_anchors"]] == [0, 1, 2, 3]
    assert b_lag == b_step


def test_a_trainer_step_reads_the_statistics_with_the_losses():
    """Under d2seg's trainer the box, mask and RPN statistics add no host read to the step:
    the CPU emulation of a GPU's waits finds none of theirs (detectron2: 11)."""
    from d2seg.benchmark.subjects import D2SegSubject

    sub = D2SegSubject(CPU_CFG, TINY[:-2], torch.device("cpu"), "fp32", batch=2)
    try:
        sub.set_batch(SyntheticBatch("instance", 2, 64, 64, torch.device("cpu"),
                                     num_thing_classes=3, instances_per_image=3))
        sub.train_steps(1)
        roots = sub.audit_roots()
        with HostSyncAudit("cpu", roots) as audit:
            sub.train_steps(1)
    finally:
        sub.close()
    import inspect

    from d2seg.modeling import batched_rcnn

    lines, first = inspect.getsourcelines(batched_rcnn.rpn_losses)
    rpn_losses = {f"batched_rcnn.py:{first + i}" for i in range(len(lines))}
    sites = audit.by_site()
    assert not [k for k in sites if "fast_rcnn.py" in k or "mask_head.py" in k
                or "deferred_scalars.py" in k or k.split("/")[-1] in rpn_losses], sites
    # the one read that brings the losses (and the queued counts) to the host
    assert any("train_step.py" in k for k in sites), sites


def test_statistics_of_a_model_called_directly_are_read_at_once():
    """A user's own loop (no d2seg trainer): the statistics are in the storage right after the
    forward, as with detectron2."""
    from d2seg.engine import Trainer

    cfg = load_config(CPU_CFG, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    batch = SyntheticBatch("instance", 2, 64, 64, torch.device("cpu"), num_thing_classes=3,
                           instances_per_image=3).d2_inputs()
    with EventStorage(0) as s:
        model(batch)
        for name in ("fast_rcnn/cls_accuracy", "mask_rcnn/accuracy", "rpn/num_pos_anchors"):
            assert len(s.history(name).values()) == 1, name
        roots = list(model.parameters()) + list(model.buffers()) + list(tensors_in(batch))
        with HostSyncAudit("cpu", roots) as a:
            model(batch)
    # three reads (RPN, box, mask), one per group of counts, instead of detectron2's 11
    reads = {k: n for k, n in a.by_site().items() if "deferred_scalars.py" in k}
    assert sum(reads.values()) == 3, a.by_site()


@pytest.mark.parametrize("vis_period", [0, 1])
def test_mask_loss_is_detectron2s(vis_period):
    """d2seg's mask_rcnn_loss: detectron2's loss value and logged statistics (class-specific
    and class-agnostic logits); steps that store mask images run detectron2's own."""
    from detectron2.modeling.roi_heads import mask_head as d2
    from detectron2.structures import BitMasks, Boxes, Instances

    from d2seg.modeling.sync_free_rcnn import _D2_MASK_RCNN_LOSS, mask_rcnn_loss

    g = torch.Generator().manual_seed(0)
    insts = []
    for n in (3, 0, 2):
        inst = Instances((32, 32))
        xy = torch.rand(n, 2, generator=g) * 16
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 8], 1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand(n, 32, 32, generator=g) > 0.5)
        insts.append(inst)
    assert d2.mask_rcnn_loss is _D2_MASK_RCNN_LOSS
    for classes in (3, 1):
        logits = torch.randn(5, classes, 14, 14, generator=g)
        with EventStorage(0) as a:
            ref = _D2_MASK_RCNN_LOSS(logits, insts, vis_period)
        with EventStorage(0) as b:
            new = mask_rcnn_loss(logits, insts, vis_period)
        assert torch.equal(ref, new)
        assert a.histories().keys() == b.histories().keys()
        for k in a.histories():
            assert a.history(k).values() == b.history(k).values(), k
        assert len(a._vis_data) == len(b._vis_data)
    with EventStorage(0):
        empty = mask_rcnn_loss(torch.randn(0, 3, 14, 14, requires_grad=True), [insts[1]])
    assert empty.item() == 0 and empty.requires_grad
