"""D2SEG.SPEED.RCNN_BATCHED (d2seg/modeling/batched_rcnn.py): the RPN's proposals, its anchor
targets and the ROI heads' proposal targets computed for the whole batch give detectron2's
proposals, matches, labels and sample counts; the samples are uniform random subsets; the RPN
losses equal detectron2's for the same targets; Mask R-CNN trains with it, with far fewer host
synchronisations."""
import itertools
import os
import types

import pytest
import torch

import d2seg  # noqa: F401  (registers everything)
from d2seg.benchmark.subjects import SyntheticBatch
from d2seg.benchmark.syncs import HostSyncAudit
from d2seg.config import load_config
from d2seg.engine import Trainer, fast_paths
from d2seg.modeling import batched_rcnn as br

from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import ROIHeads
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import REPO

RCNN = os.path.join(REPO, "configs", "Shapes-InstanceSegmentation", "mask_rcnn_R_18_FPN_cpu.yaml")


def _boxes(gen, n, scale=100.0, grid=4.0):
    """n random XYXY boxes on a coarse grid (so that IoU ties occur)."""
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = torch.rand(n, 2, generator=gen) * 0.4 * scale + grid
    return ((torch.cat([xy, xy + wh], 1)) / grid).round() * grid


@pytest.mark.parametrize("matcher", [
    Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),  # RPN
    Matcher([0.5], [0, 1]),  # ROI heads
])
def test_batched_iou_and_matching_equal_detectron2_per_image(matcher):
    gen = torch.Generator().manual_seed(0)
    anchors = _boxes(gen, 2000)
    gts = [_boxes(gen, n) for n in (3, 0, 7, 1)]  # an image without ground truth too
    gt, valid, _ = br._padded(gts, anchors)
    assert gt.shape == (4, 7, 4) and valid.sum(1).tolist() == [3, 0, 7, 1]
    quality = br.batched_pairwise_iou(gt, anchors)
    matches, labels = br.batched_match(matcher, quality, valid)
    ties = 0
    for i, g in enumerate(gts):
        q = pairwise_iou(Boxes(g), Boxes(anchors))
        assert torch.equal(quality[i, :len(g)], q)
        assert torch.equal(quality[i, len(g):], torch.zeros_like(quality[i, len(g):]))
        m, lab = matcher(q)
        assert torch.equal(matches[i], m) and torch.equal(labels[i], lab)
        if len(g) > 1:
            top2 = q.topk(2, dim=0).values
            ties += int(((top2[0] == top2[1]) & (top2[0] > 0)).sum())
    assert ties > 0  # the tie-breaking was exercised
    # chunked (several IoU blocks) gives the same
    old = br._IOU_BLOCK
    try:
        br._IOU_BLOCK = 7 * 2000  # one image per block
        m2, l2 = br._match_in_chunks(matcher, gt, valid, anchors)
    finally:
        br._IOU_BLOCK = old
    assert torch.equal(m2, matches) and torch.equal(l2, labels)


def test_sample_subsets_counts_membership_and_uniformity():
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    cand = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    counts = torch.tensor([2, 1])
    seen = {}
    for _ in range(3000):
        idx, taken = br.sample_subsets(cand, counts, 4)
        assert idx.shape == (2, 4) and taken.sum(1).tolist() == [2, 1]
        picked = [sorted(idx[r][taken[r]].tolist()) for r in range(2)]
        assert picked[1] == [2]
        assert all(cand[0, j] for j in picked[0]) and len(set(picked[0])) == 2
        seen[tuple(picked[0])] = seen.get(tuple(picked[0]), 0) + 1
    torch.set_rng_state(gen_state)
    pairs = list(itertools.combinations([0, 2, 3, 5, 6, 7], 2))
    assert sorted(seen) == pairs  # every 2-subset of the 6 candidates occurs ...
    assert max(seen.values()) < 1.35 * 3000 / 15 and min(seen.values()) > 0.65 * 3000 / 15


def _rpn_inputs(gen, n_img=3, n_anchor=600):
    anchors = [Boxes(_boxes(gen, n_anchor // 2)), Boxes(_boxes(gen, n_anchor // 2))]
    gts = []
    for n in (2, 0, 5)[:n_img]:
        inst = Instances((120, 120))
        inst.gt_boxes = Boxes(_boxes(gen, n))
        gts.append(inst)
    return anchors, gts


def _fake_rpn(batch_size_per_image=64):
    from detectron2.modeling.box_regression import Box2BoxTransform

    rpn = types.SimpleNamespace(
        anchor_matcher=Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        batch_size_per_image=batch_size_per_image, positive_fraction=0.5,
        box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), smooth_l1_beta=0.0,
        loss_weight={"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0}, box_reg_loss_type="smooth_l1")
    return rpn


def _rpn_targets(seed):
    """A fake RPN, its inputs and the batched targets for them."""
    gen = torch.Generator().manual_seed(seed)
    anchors, gts = _rpn_inputs(gen)
    rpn = _fake_rpn()
    torch.manual_seed(0)
    labels, boxes = br.rpn_label_and_sample(rpn, anchors, gts)
    return gen, rpn, anchors, gts, labels, boxes


def test_rpn_anchor_targets_match_detectron2_counts_and_boxes():
    _, rpn, anchors, gts, labels, boxes = _rpn_targets(1)
    all_anchors = Boxes.cat(anchors)
    for lab, box, inst in zip(labels, boxes, gts):
        assert lab.dtype == torch.int8 and lab.shape == (600,) and box.shape == (600, 4)
        if len(inst):
            m, full = rpn.anchor_matcher(pairwise_iou(inst.gt_boxes, all_anchors))
        else:
            m, full = torch.zeros(600, dtype=torch.int64), torch.zeros(600, dtype=torch.int8)
        n_pos = min(int((full == 1).sum()), 32)
        n_neg = min(int((full == 0).sum()), 64 - n_pos)
        assert int((lab == 1).sum()) == n_pos and int((lab == 0).sum()) == n_neg
        assert bool((full[lab == 1] == 1).all()) and bool((full[lab == 0] == 0).all())
        if len(inst):
            pos = lab == 1
            assert torch.equal(box[pos], inst.gt_boxes.tensor[m[pos]])
        else:
            assert not box.any()


def test_rpn_losses_equal_detectron2_for_the_same_targets():
    gen, rpn, anchors, _, labels, boxes = _rpn_targets(2)
    logits = [torch.randn(3, 300, generator=gen, requires_grad=True) for _ in range(2)]
    deltas = [torch.randn(3, 300, 4, generator=gen, requires_grad=True) for _ in range(2)]
    with EventStorage(0) as storage:
        ours = br.rpn_losses(rpn, anchors, logits, labels, deltas, boxes)
        ours_logged = {k: storage.history(k).latest() for k in
                       ("rpn/num_pos_anchors", "rpn/num_neg_anchors")}
        theirs = RPN.losses(rpn, anchors, logits, labels, deltas, boxes)
        theirs_logged = {k: storage.history(k).latest() for k in ours_logged}
    assert ours_logged == theirs_logged
    grads = []
    for losses in (ours, theirs):
        for p in logits + deltas:
            p.grad = None
        sum(losses.values()).backward()
        grads.append([p.grad.clone() for p in logits + deltas])
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("min_size,training", [(0.0, True), (8.0, True), (8.0, False)])
def test_proposals_equal_detectron2(min_size, training, threads, monkeypatch):
    # 2 threads: the images' NMS run in two parts at once (images 0, 1 and image 2)
    monkeypatch.setattr(br.torch, "get_num_threads", lambda: threads)
    groups, run = [], br.run_in_parallel
    monkeypatch.setattr(br, "run_in_parallel",
                        lambda tasks: groups.append(len(tasks)) or run(tasks))
    gen = torch.Generator().manual_seed(3)
    sizes = [(90, 120), (120, 70), (64, 64)]
    props = [torch.randn(3, n, 4, generator=gen) * 40 + 50 for n in (500, 130)]
    props = [torch.cat([p[..., :2], p[..., :2] + p[..., 2:].abs()], -1) for p in props]
    logits = [torch.randn(3, n, generator=gen) for n in (500, 130)]
    args = (props, logits, sizes, 0.7, 200, 150, min_size, training)
    ours, theirs = br.find_top_proposals(*args), find_top_rpn_proposals(*args)
    assert groups == ([2] if threads == 2 else [])
    for a, b in zip(ours, theirs):
        assert a.image_size == b.image_size
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
    if min_size:  # the small-box filter removed some: the nonzero path ran
        assert sum(len(a) for a in ours) < 3 * 150
    bad = [p.clone() for p in props]
    bad[0][1, 7, 2] = float("nan")
    if training:
        with pytest.raises(FloatingPointError, match="diverged"):
            br.find_top_proposals(bad, logits, sizes, 0.7, 200, 150, min_size, True)
    else:  # inference drops the bad box, as detectron2 does
        ours = br.find_top_proposals(bad, logits, sizes, 0.7, 200, 150, min_size, False)
        theirs = find_top_rpn_proposals(bad, logits, sizes, 0.7, 200, 150, min_size, False)
        assert all(torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
                   for a, b in zip(ours, theirs))


def _roi_inputs(gen):
    proposals, targets = [], []
    for n_prop, n_gt in ((300, 3), (120, 0), (250, 6)):
        p = Instances((100, 100))
        p.proposal_boxes = Boxes(_boxes(gen, n_prop))
        p.objectness_logits = torch.randn(n_prop, generator=gen)
        t = Instances((100, 100))
        t.gt_boxes = Boxes(_boxes(gen, n_gt))
        t.gt_classes = torch.randint(0, 3, (n_gt,), generator=gen)
        t.gt_masks = BitMasks(torch.rand(n_gt, 100, 100, generator=gen) > 0.5)
        proposals.append(p)
        targets.append(t)
    return proposals, targets


def test_roi_targets_match_detectron2():
    gen = torch.Generator().manual_seed(4)
    proposals, targets = _roi_inputs(gen)
    heads = types.SimpleNamespace(proposal_matcher=Matcher([0.5], [0, 1]), num_classes=3,
                                  batch_size_per_image=128, positive_fraction=0.25,
                                  proposal_append_gt=True)
    with EventStorage(0) as storage:
        torch.manual_seed(0)
        ours = br.roi_label_and_sample(heads, proposals, targets)
        ours_log = storage.history("roi_head/num_fg_samples").latest()
        heads._sample_proposals = types.MethodType(ROIHeads._sample_proposals, heads)
        theirs = ROIHeads.label_and_sample_proposals(heads, proposals, targets)
        assert storage.history("roi_head/num_fg_samples").latest() == ours_log
    for a, b, p, t in zip(ours, theirs, proposals, targets):
        # the same number of foreground and background samples, foreground first
        fg_a = (a.gt_classes < 3).tolist()
        assert fg_a == sorted(fg_a, reverse=True) and a._d2seg_num_fg == sum(fg_a)
        assert sum(fg_a) == int((b.gt_classes < 3).sum()) and len(a) == len(b)
        assert set(a.get_fields()) == set(b.get_fields())
        # every sample is a candidate (proposal or gt box) with detectron2's labels for it
        cand = torch.cat([p.proposal_boxes.tensor, t.gt_boxes.tensor])
        cand_logits = torch.cat([p.objectness_logits, torch.full((len(t),), br._GT_LOGIT)])
        if len(t):
            m, lab = heads.proposal_matcher(pairwise_iou(t.gt_boxes, Boxes(cand)))
            cls = torch.where(lab == 0, 3, t.gt_classes[m])
        else:
            cls = torch.full((len(cand),), 3)
        pos = (a.proposal_boxes.tensor[:, None] == cand[None]).all(-1).float().argmax(1)
        assert torch.equal(cand[pos], a.proposal_boxes.tensor)
        torch.testing.assert_close(a.objectness_logits, cand_logits[pos])
        assert torch.equal(a.gt_classes, cls[pos])
        assert len(set(pos.tolist())) == len(pos)  # no candidate twice
        if len(t):
            assert torch.equal(a.gt_boxes.tensor, t.gt_boxes.tensor[m[pos]])
            assert torch.equal(a.gt_masks.tensor, t.gt_masks.tensor[m[pos]])
        else:
            assert not a.has("gt_boxes")


def _model(batched: bool):
    cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.RCNN_BATCHED",
                             "on" if batched else "off", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
                             "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"])
    assert fast_paths.resolve(cfg).rcnn_batched == batched
    torch.manual_seed(0)
    return cfg, Trainer.build_model(cfg).train()


def test_switch_and_swaps():
    sem = load_config(os.path.join(REPO, "configs", "Shapes-SemanticSegmentation",
                                   "unet_cpu.yaml"), ["MODEL.DEVICE", "cpu"])
    assert not fast_paths.resolve(sem).rcnn_batched
    _, on = _model(True)
    _, off = _model(False)
    assert "predict_proposals" in vars(on.proposal_generator)
    assert "label_and_sample_proposals" in vars(on.roi_heads)
    assert "_forward_mask" in vars(on.roi_heads)
    assert not {"predict_proposals", "label_and_sample_anchors", "losses"} & \
        set(vars(off.proposal_generator))
    assert "label_and_sample_proposals" not in vars(off.roi_heads)
    assert br.make_batched(off) == 5
    # the same weights give the same predictions either way (inference path)
    on.load_state_dict(off.state_dict())
    on.eval(), off.eval()
    gen = torch.Generator().manual_seed(5)
    inputs = [{"image": (torch.rand(3, 96, 128, generator=gen) * 255), "height": 96,
               "width": 128}]
    off_ref = _model(False)[1]
    off_ref.load_state_dict(off.state_dict())
    with torch.no_grad():
        a, b = on(inputs)[0]["instances"], off_ref.eval()(inputs)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_mask_rcnn_trains_with_fewer_host_syncs():
    batch = SyntheticBatch("instance", 4, 96, 96, torch.device("cpu"), num_thing_classes=3,
                           instances_per_image=3).d2_inputs()
    batch[1]["instances"] = batch[1]["instances"][:0]  # an image without objects
    counts, losses = {}, {}
    for batched in (False, True):
        cfg, model = _model(batched)
        opt = Trainer.build_optimizer(cfg, model)
        roots = list(model.parameters()) + list(model.buffers())
        roots += [x["image"] for x in batch] + [x["instances"].gt_boxes.tensor for x in batch]
        with EventStorage(0):
            for step in range(3):
                torch.manual_seed(step)
                with HostSyncAudit(torch.device("cpu"), roots) as audit:
                    out = model(batch)
                opt.zero_grad()
                sum(out.values()).backward()
                opt.step()
                assert all(torch.isfinite(v) for v in out.values()), out
        counts[batched], losses[batched] = audit.count, out
    assert set(losses[True]) == set(losses[False])
    # per image: proposal checks, sampling, foreground selection; here 4 images
    assert counts[True] <= counts[False] - 4 * 6, counts


@pytest.mark.parametrize("zoo_config", ["Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
                                        "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"])
def test_zoo_rcnn_variants_train_with_d2seg_defaults(zoo_config):
    """Cascade heads (three matchers, stage 0 sampled here) and keypoint heads (their loss
    reshapes with .view: kept out of channels_last, a CPU default) train and predict."""
    from detectron2 import model_zoo
    from detectron2.structures import Keypoints

    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.ROI_HEADS.NUM_CLASSES",
                         "3", "MODEL.PIXEL_STD", "[57.0, 57.0, 57.0]",
                         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"])
    plan = fast_paths.resolve(cfg)
    assert plan.rcnn_batched and plan.channels_last
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    assert "label_and_sample_proposals" in vars(model.roi_heads)
    batch = SyntheticBatch("instance", 2, 128, 128, torch.device("cpu"), num_thing_classes=3,
                           instances_per_image=3).d2_inputs()
    if cfg.MODEL.KEYPOINT_ON:
        for x in batch:
            inst, box = x["instances"], x["instances"].gt_boxes.tensor
            kp = torch.full((len(inst), 17, 3), 2.0)
            kp[..., 0] = ((box[:, 0] + box[:, 2]) / 2)[:, None]
            kp[..., 1] = ((box[:, 1] + box[:, 3]) / 2)[:, None]
            inst.gt_keypoints = Keypoints(kp)
            inst.remove("gt_masks")
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_keypoint" in losses) == cfg.MODEL.KEYPOINT_ON
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"]}])[0]["instances"]
    assert out.has("pred_keypoints" if cfg.MODEL.KEYPOINT_ON else "pred_masks")


def test_parallel_proposal_nms_keeps_the_callers_autocast(monkeypatch):
    """Under CPU bf16 autocast the RPN's scores are bf16 and its boxes fp32; torchvision's
    autocast kernel casts both for ``nms``. Autocast is per thread, so the images' NMS on the
    pool's threads must run under the caller's state (else: a dtype error)."""
    monkeypatch.setattr(br.torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(5)
    sizes = [(90, 120), (120, 70), (64, 64), (100, 100)]
    props = [torch.randn(4, n, 4, generator=gen) * 40 + 50 for n in (600, 150)]
    props = [torch.cat([p[..., :2], p[..., :2] + p[..., 2:].abs()], -1) for p in props]
    logits = [torch.randn(4, n, generator=gen).bfloat16() for n in (600, 150)]
    args = (props, logits, sizes, 0.7, 300, 200, 0.0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = br.find_top_proposals(*args), find_top_rpn_proposals(*args)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
