"""Host synchronisations of a training step (d2seg/benchmark/syncs.py).

On a GPU, every value read back to the host stalls the device; d2seg's semantic models read
nothing back in the steady state of a training step. The CPU emulation of the audit follows
what would live on the GPU (parameters, the batch) and lists what reads it back."""
import os

import pytest
import torch

import d2seg  # noqa: F401
from d2seg.benchmark.subjects import SyntheticBatch
from d2seg.benchmark.syncs import HostSyncAudit, tensors_in
from d2seg.config import load_config
from detectron2.modeling import build_model

from conftest import REPO


def test_audit_counts_reads_of_device_tensors_only():
    x = torch.randn(8)
    host = torch.tensor([3, 4])
    with HostSyncAudit("cpu", roots=[x]) as a:
        y = (x * 2).relu()  # arithmetic: nothing
        bool((y > 0).any())  # a scalar read
        y.sum().item()  # a scalar read
        y[y > 0]  # boolean-mask indexing: nonzero
        y.nonzero()
        copy = y.cpu()  # a device-to-host copy ...
        copy.sum().item()  # ... whose later reads are free
        y.tolist()
        int(host.max())  # shape-like arithmetic on host tensors: free
    whats = [e.what for e in a.events]
    assert whats == ["_local_scalar_dense", "_local_scalar_dense", "index", "nonzero", "cpu",
                     "tolist"], whats
    assert all(e.where.startswith("tests/test_syncs.py:") for e in a.events)
    assert a.count == 6 and sum(a.by_site().values()) == 6
    assert a.events[0].stack[0] == "test_audit_counts_reads_of_device_tensors_only"
    # every operation on followed tensors is counted (device_ops); arithmetic on host tensors
    # is not; values written in place into a fresh tensor are followed
    with HostSyncAudit("cpu", roots=[x]) as b:
        y = x + 1
        host + 1
        padded = torch.nn.utils.rnn.pad_sequence([y[:3], y[:5]], batch_first=True)
        padded.sum().tolist()
    assert [e.what for e in b.events] == ["tolist"], b.events
    assert 3 <= b.device_ops <= 12, b.device_ops


def test_inner_site_names_the_torch_code_that_waited():
    """``where`` is the first frame outside torch (the caller); ``inner`` the innermost frames,
    torch's Python included: the GPU audit found a sync whose caller was only the harness
    (the autograd engine or a CUDA-graph tree), so the innermost frame is kept too."""
    x = torch.tensor([3.0, 1.0, 3.0])
    with HostSyncAudit("cpu", roots=[x]) as a:
        torch.unique(x, sorted=True, return_inverse=True)  # torch/functional.py -> _unique2
        x.sum().item()  # called directly: both frames are this file's
    assert [e.what for e in a.events] == ["_unique2", "_local_scalar_dense"], a.events
    first, second = a.events
    assert first.where.startswith("tests/test_syncs.py:")
    assert first.inner.startswith("torch/") and "torch/functional.py" in first.inner, first
    assert second.inner.startswith(second.where)
    assert sum(a.by_inner_site().values()) == 2


def test_syncs_in_a_finalizer_or_the_audits_own_exit_are_tagged():
    """A read made by a finalizer during a garbage collection is tagged "gc"; one made after
    the block, while the audit tears itself down, "exit" (the H100 audits had one sync
    attributed only to the `with` line that opened the audit)."""
    import gc

    x = torch.randn(4)

    class _Cycle:  # freed only by the cyclic collector; reads a followed tensor when freed
        def __init__(self, t):  # (a tensor that stays reachable: the collector drops the
            self.t, self.me = t, self  # weak references of what it frees, the audit's too)

        def __del__(self):
            self.t.sum().item()

    with HostSyncAudit("cpu", roots=[x]) as a:
        _Cycle(x)
        gc.collect()
        (x + 1).sum().item()
    assert [(e.what, e.in_gc, e.phase) for e in a.events] == [
        ("_local_scalar_dense", True, "block"), ("_local_scalar_dense", False, "block")]
    assert any(k.endswith(" [gc]") for k in a.by_site()), a.by_site()
    assert any(not k.endswith("]") for k in a.by_site())
    assert gc.callbacks.count(a._gc_callback) == 0  # removed at exit

    with HostSyncAudit("cpu", roots=[x]) as b:
        # torn down first, while the audit still records: as code run by the audit's exit
        b._stack.callback(lambda: (x * 3).sum().item())
    assert [(e.what, e.phase) for e in b.events] == [("_local_scalar_dense", "exit")]
    assert list(b.by_site())[0].endswith(" [exit]"), b.by_site()


SEMANTIC = [
    ("Shapes-SemanticSegmentation/unet_cpu.yaml", []),
    ("Shapes-SemanticSegmentation/deeplabv3plus_cpu.yaml", []),
    ("Shapes-SemanticSegmentation/pspnet_cpu.yaml", []),
    ("Shapes-SemanticSegmentation/segformer_b0_cpu.yaml", []),
    ("Shapes-SemanticSegmentation/hrnet_w18_small_cpu.yaml", []),
    ("ISBI-SemanticSegmentation/unet_cpu.yaml",  # binary: one channel, BCE + Dice + Focal
     ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1", "MODEL.SEM_SEG_LOSS.NAMES", "['BCE','Dice','Focal']",
      "MODEL.SEM_SEG_LOSS.WEIGHTS", "[1.0,1.0,1.0]"]),
]


@pytest.mark.parametrize("config, opts", SEMANTIC, ids=[c for c, _ in SEMANTIC])
def test_semantic_training_step_reads_nothing_back(config, opts):
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs", config), ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg).train()
    k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    batch = SyntheticBatch("semantic", 2, 64, 64, torch.device("cpu"),
                           num_sem_classes=max(k, 2)).d2_inputs()
    roots = list(model.parameters()) + list(model.buffers()) + list(tensors_in(batch))
    audits = []
    for _ in range(2):
        with HostSyncAudit("cpu", roots) as a:
            sum(model(batch).values()).backward()
        audits.append(a)
    first, steady = audits
    # the only read a GPU would see: the segmentor's check of the first batch's target values
    gpu_reads = [e for e in first.events if "_host_check" not in e.stack]
    assert len(gpu_reads) == 1 and gpu_reads[0].stack[:2] == ["check_targets", "forward"], \
        first.by_site()
    # steady state: only the losses' value checks of CPU targets, which GPUs skip
    assert steady.count >= 1
    assert all("_host_check" in e.stack for e in steady.events), steady.by_site()


@pytest.mark.parametrize("config, opts", SEMANTIC, ids=[c for c, _ in SEMANTIC])
def test_semantic_training_step_runs_on_the_meta_device(config, opts):
    """Meta tensors have shapes but no values: a forward + backward that completes on them
    cannot have read a value back (``.item()`` / ``bool()`` / boolean indexing raise there).
    The same code runs on a GPU, where such reads would stall the device."""
    cfg = load_config(os.path.join(REPO, "configs", config), ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg).train().to("meta")
    model._targets_checked = True  # the first-batch check reads values, by design
    batch = [{"image": torch.empty(3, 64, 64, device="meta"),
              "sem_seg": torch.empty(64, 64, dtype=torch.long, device="meta")} for _ in range(2)]
    losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert total.device.type == "meta" and total.dim() == 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", ["Shapes-SemanticSegmentation/unet_cpu.yaml",
                                    "Shapes-SemanticSegmentation/deeplabv3plus_cpu.yaml"])
def test_compiled_head_and_loss_are_one_graph_off_the_cpu(config):
    """torch.compile (D2SEG.SPEED.COMPILE compiles the backbone and the sem_seg head, whose
    forward computes the losses in training) traces head + losses as one graph on a device
    other than the CPU: no graph break, so the loss is fused with the head and nothing waits
    for the device in between."""
    import torch._dynamo as dynamo

    cfg = load_config(os.path.join(REPO, "configs", config), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).train().to("meta")
    feats = model.backbone(torch.empty(2, 3, 64, 64, device="meta"))
    targets = torch.empty(2, 64, 64, dtype=torch.long, device="meta")
    dynamo.reset()
    try:
        ex = dynamo.explain(model.sem_seg_head)(feats, targets)
    finally:
        dynamo.reset()
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_sync_free_matcher_matches_detectron2():
    from detectron2.modeling.matcher import Matcher

    from d2seg.modeling.sync_free_rcnn import SyncFreeMatcher

    g = torch.Generator().manual_seed(0)
    matchers = [Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),  # RPN
                Matcher([0.5], [0, 1], allow_low_quality_matches=False),  # ROI heads
                Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)]
    for _ in range(100):
        m, n = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
        q = ((torch.rand(m, n, generator=g) * 1.2).clamp(max=1.0) * 10).round() / 10  # ties
        for ref in matchers:
            a, b = ref(q), SyncFreeMatcher.from_matcher(ref)(q)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == b[1].dtype
    empty = torch.zeros(0, 7)  # no ground truth
    a, b = matchers[0](empty), SyncFreeMatcher.from_matcher(matchers[0])(empty)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _rcnn_losses(sync_free: bool, steps: int = 2):
    from detectron2.utils.events import EventStorage

    from d2seg.engine import Trainer

    cfg = load_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                         "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.RCNN_SYNC_FREE",
                       "on" if sync_free else "off", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
                       "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                       # detectron2's per-image code, where the matchers run image by image
                       "D2SEG.SPEED.RCNN_BATCHED", "off"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    opt = Trainer.build_optimizer(cfg, model)
    batch = SyntheticBatch("instance", 2, 96, 96, torch.device("cpu"), num_thing_classes=3,
                           instances_per_image=3).d2_inputs()
    out = []
    with EventStorage(0):
        for _ in range(steps):
            torch.manual_seed(1)  # the same proposal sampling draws on both sides
            losses = model(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            out.append({k: v.item() for k, v in losses.items()})
    return model, out, batch


def test_rcnn_sync_free_trains_identically_with_fewer_host_syncs():
    from detectron2.utils.events import EventStorage

    from d2seg.modeling.sync_free_rcnn import SyncFreeMatcher

    model_a, plain, _ = _rcnn_losses(False)
    model_b, free, batch = _rcnn_losses(True)
    assert plain == free  # bit-identical losses over two optimizer steps
    assert type(model_b.proposal_generator.anchor_matcher) is SyncFreeMatcher
    assert type(model_b.roi_heads.proposal_matcher) is SyncFreeMatcher
    assert type(model_a.roi_heads.proposal_matcher) is not SyncFreeMatcher
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    counts = []
    for model in (model_a, model_b):
        roots = list(model.parameters()) + list(model.buffers()) + list(tensors_in(batch))
        with EventStorage(0), HostSyncAudit("cpu", roots) as a:
            sum(model(batch).values()).backward()
        counts.append(a)
    sites = counts[1].by_site()
    assert not [k for k in sites if "matcher.py" in k or "roi_heads.py:20" in k], sites
    assert counts[1].count < counts[0].count - 10, (counts[0].count, counts[1].count)


@pytest.mark.parametrize("parallel", [False, True])
def test_sync_free_pooler_matches_detectron2_bit_for_bit(parallel):
    """pooler_forward (RCNN_SYNC_FREE): the same pooled features and gradients as detectron2's
    ROIPooler.forward, boxes spread over all FPN levels, an image without boxes, one host
    read instead of a nonzero per level."""
    import types

    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    from d2seg.modeling.layers.roi_align import use_parallel_roi_align
    from d2seg.modeling.sync_free_rcnn import pooler_forward

    g = torch.Generator().manual_seed(0)
    pooler = ROIPooler((7, 7), (1 / 4, 1 / 8, 1 / 16, 1 / 32), 2, "ROIAlignV2")
    if parallel:
        assert use_parallel_roi_align(pooler, sparse_grad=True) == 4
    feats = [torch.randn(3, 8, 256 // s, 256 // s, generator=g) for s in (4, 8, 16, 32)]

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 128
        wh = torch.exp(torch.rand(n, 2, generator=g) * 5.5)  # 1 to 245 px: every level
        return Boxes(torch.cat([xy, (xy + wh).clamp(max=255)], 1))
    box_lists = [boxes(40), boxes(0), boxes(25)]
    results = []
    for fn in (ROIPooler.forward, pooler_forward):
        xs = [f.clone().requires_grad_() for f in feats]
        out = types.MethodType(fn, pooler)(xs, box_lists)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, [x.grad for x in xs]))
    (ref, ref_grads), (new, new_grads) = results
    assert torch.equal(ref, new) and ref.shape == (65, 8, 7, 7)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, new_grads))
    with HostSyncAudit("cpu", feats + [b.tensor for b in box_lists]) as a:
        types.MethodType(pooler_forward, pooler)(feats, box_lists)
    assert [e.what for e in a.events] == ["tolist"], a.by_site()


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_sync_free_anchor_grids_are_made_on_the_device(monkeypatch, offset):
    """grid_offsets (RCNN_SYNC_FREE): detectron2's anchors, bit for bit, without building
    each level's grid on the CPU and copying it over (a host wait per copy on a GPU)."""
    import types

    from detectron2.modeling import anchor_generator as d2_anchor

    from d2seg.modeling.sync_free_rcnn import _grid_anchors

    gen = d2_anchor.DefaultAnchorGenerator(
        sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=[4, 8, 16, 32, 64], offset=offset)
    grids = [[200, 304], [100, 152], [50, 76], [25, 38], [13, 19]]  # 800x1216 input
    ref = gen._grid_anchors(grids)

    def no_copy(src, dst):
        raise AssertionError("a grid was built on the CPU and copied")
    monkeypatch.setattr(d2_anchor, "move_device_like", no_copy)
    new = types.MethodType(_grid_anchors, gen)(grids)
    assert len(new) == 5 and all(torch.equal(a, b) for a, b in zip(ref, new))
    assert d2_anchor._create_grid_offsets.__module__ == d2_anchor.__name__  # restored


def test_sync_free_box_deltas_are_detectron2s_and_checked_on_cpu():
    """SyncFreeBox2BoxTransform: detectron2's deltas bit for bit; the positive-width check
    (a host read on a GPU) only for CPU tensors; swapped into a built Mask R-CNN."""
    from detectron2.modeling.box_regression import Box2BoxTransform

    from d2seg.modeling.sync_free_rcnn import SyncFreeBox2BoxTransform, make_sync_free

    g = torch.Generator().manual_seed(0)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 50], 1)
    src, tgt = boxes(500), boxes(500)
    for weights in ((10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)):
        ref = Box2BoxTransform(weights)
        new = SyncFreeBox2BoxTransform.from_transform(ref)
        assert new.weights == ref.weights and new.scale_clamp == ref.scale_clamp
        assert torch.equal(new.deltas(src, tgt), ref.get_deltas(src, tgt))
        assert torch.equal(new.get_deltas(src, tgt), ref.get_deltas(src, tgt))
    bad = src.clone()
    bad[0, 2] = bad[0, 0]  # zero width
    with pytest.raises(AssertionError, match="not valid"):
        new.get_deltas(bad, tgt)  # CPU: still checked
    cfg = load_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                         "mask_rcnn_R_18_FPN_cpu.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    make_sync_free(model)
    assert type(model.proposal_generator.box2box_transform) is SyncFreeBox2BoxTransform
    assert type(model.roi_heads.box_predictor.box2box_transform) is SyncFreeBox2BoxTransform


# Where d2seg's R-CNN trainer step still waits for the device (CPU emulation, batch B): the
# RPN's NMS once per image (torchvision's kernel copies its mask to the host), the box-delta
# width checks (CPU only: on a GPU the check is skipped), one count read per ROI pooler (box,
# mask), the sampled-proposal and mask counts of the batched heads, the box loss's foreground
# indices, and the one float64 transfer of the losses and the queued statistics. B + 8 in all
# (plain detectron2: 75 at B = 2). A new wait anywhere in the step fails this test: on a GPU
# each one stalls the launch queue (docs/benchmarks.md, "Host synchronisations").
RCNN_SYNC_SITES = {
    "nonzero @ torchvision/ops/boxes.py": "per image",
    "_local_scalar_dense @ detectron2/modeling/box_regression.py": 2,
    "tolist @ d2seg/modeling/sync_free_rcnn.py": 2,
    "tolist @ d2seg/modeling/batched_rcnn.py": 2,
    "nonzero @ detectron2/layers/wrappers.py": 1,
    "cpu @ d2seg/engine/train_step.py": 1,
}


@pytest.mark.parametrize("config", ["Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml",
                                    "Shapes-PanopticSegmentation/panoptic_fpn_R_18_cpu.yaml"])
def test_rcnn_trainer_step_stays_inside_its_host_sync_budget(config):
    from d2seg.benchmark.harness import Settings, _batch_for, audit_host_syncs
    from d2seg.benchmark.subjects import D2SegSubject

    cpu, batch = torch.device("cpu"), 2
    sub = D2SegSubject(os.path.join(REPO, "configs", config), [], cpu, "fp32", batch,
                       max_iter=10)
    try:
        data = _batch_for(sub, sub.cfg, sub.task, batch, (128, 128), cpu,
                          Settings(instances_per_image=2))
        sub.set_batch(data)
        sub.train_steps(1)
        audit = audit_host_syncs(sub, cpu)
    finally:
        sub.close()
    counts = {}
    for site, n in audit["sites"].items():
        key = site.split(":")[0]
        assert key in RCNN_SYNC_SITES, f"a new host sync in the step: {site} ({audit['sites']})"
        counts[key] = counts.get(key, 0) + n
    for key, n in counts.items():
        allowed = batch if RCNN_SYNC_SITES[key] == "per image" else RCNN_SYNC_SITES[key]
        assert n <= allowed, f"{key}: {n} > {allowed} ({audit['sites']})"
    assert audit["per_step"] == sum(counts.values()) <= batch + 8, audit["sites"]
