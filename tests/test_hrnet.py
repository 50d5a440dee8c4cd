"""HRNet / HRNetV2 (d2seg/modeling/backbone/hrnet.py, heads/hrnet_head.py, meta_arch/hrnet.py):
published parameter counts, shapes and strides for odd sizes, the fusion's exact resizing,
building without a config, HRNet under DeepLabV3+ / PSPNet / FPN (Semantic FPN, Mask R-CNN,
Panoptic FPN), gradients, train + eval through train_net, export and predict."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import d2seg  # noqa: F401  (registers everything)
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from d2seg.config import load_config
from d2seg.modeling.backbone import HRNet, build_hrnet_backbone
from d2seg.modeling.backbone.hrnet import HRNET_PRESETS, HRModule, HRNetSpec
from d2seg.modeling.layers.blocks import gn_groups as _gn_groups
from d2seg.modeling.heads import ASPPDecoderHead, HRNetV2Head, PSPHead
from d2seg.modeling.meta_arch import HRNetV2

from conftest import REPO
from test_semantic_models import TRAIN_TINY, check_metrics, run_train_net

SHAPES = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation")
ISBI = os.path.join(REPO, "configs", "ISBI-SemanticSegmentation")
CPU_CFG = os.path.join(SHAPES, "hrnet_w18_small_cpu.yaml")

# A tiny HRNet for unit tests: widths 4/8/16/32, one block and one module per stage.
TINY_HR = ["MODEL.HRNET.WIDTH", "4", "MODEL.HRNET.STEM_CHANNELS", "8",
           "MODEL.HRNET.STAGE1_CHANNELS", "4", "MODEL.HRNET.NUM_MODULES", "[1, 1, 1]",
           "MODEL.HRNET.NUM_BLOCKS", "[1, 1, 1, 1]"]
TINY_SPEC = HRNetSpec(stem_channels=8, stage1_channels=4, width=4, num_modules=(1, 1, 1),
                      num_blocks=(1, 1, 1, 1))


def cfg_from(path, opts=(), num_classes=None):
    cfg = load_config(path, list(opts) + ["MODEL.DEVICE", "cpu"])
    if num_classes is not None:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    return cfg


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def halve(n, times):
    """Size after ``times`` stride-2 3x3 convs with padding 1: ceil(n / 2) each."""
    for _ in range(times):
        n = (n + 1) // 2
    return n


def batch(sizes, num_classes=2):
    out = []
    for h, w in sizes:
        t = torch.randint(0, max(num_classes, 2), (h, w))
        t[:2] = 255
        out.append({"image": torch.rand(3, h, w) * 255, "sem_seg": t})
    return out


def assert_all_parameters_get_gradients(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]} (+{max(0, len(missing) - 5)})"


# --- architecture -------------------------------------------------------------------------
# Published HRNetV2 segmentation models (Cityscapes, 19 classes), parameters in millions, as
# the HRNet-Semantic-Segmentation repository and the HRNetV2 paper list them. They count
# backbone + segmentation head (the head is 0.06-0.53 M of it; no ImageNet classifier). The
# official head's first 1x1 conv has a bias before its BN (ours does not: bias = not norm),
# 15 W more parameters (270 for W18, 720 for W48), which does not change the rounding.
PUBLISHED_M = {"w18_small_v1": 1.5, "w18_small_v2": 3.9, "w18": 9.6, "w48": 65.9}
# This implementation's exact totals (backbone + head, 19 classes), guarding against changes.
EXACT = {"w18_small_v1": 1_540_579, "w18_small_v2": 3_939_309, "w18": 9_640_849,
         "w32": 29_546_035, "w48": 65_858_659}


@pytest.mark.parametrize("preset", list(EXACT))
def test_parameter_counts_match_published(preset):
    bb = HRNet(spec=preset)
    head = HRNetV2Head(bb.output_shape(), num_classes=19)
    total = n_params(bb) + n_params(head)
    assert total == EXACT[preset]
    if preset in PUBLISHED_M:  # published numbers have one decimal: +- 0.05 M
        assert abs(total / 1e6 - PUBLISHED_M[preset]) < 0.05, total
    # the head is the published last_inp_channels wide: 15 W
    w = HRNET_PRESETS[preset].width
    assert head.fuse.out_channels == 15 * w and head.predictor.in_channels == 15 * w


def test_presets_structure():
    w18 = HRNet(spec="w18")
    assert [len(s) for s in w18.stages] == [1, 4, 3]
    assert len(w18.layer1) == 4 and w18.layer1[-1].conv3.out_channels == 256
    assert [len(b) for b in w18.stages[2][0].branches] == [4, 4, 4, 4]
    assert {k: (v.channels, v.stride) for k, v in w18.output_shape().items()} == {
        "hr1": (18, 4), "hr2": (36, 8), "hr3": (72, 16), "hr4": (144, 32)}
    v1 = HRNet(spec="w18_small_v1")
    assert [len(s) for s in v1.stages] == [1, 1, 1] and len(v1.layer1) == 1
    assert [b[0].conv1.out_channels for b in v1.stages[2][0].branches] == [16, 32, 64, 128]
    v2 = HRNet(spec="w18_small_v2")
    assert [len(s) for s in v2.stages] == [1, 3, 2] and len(v2.layer1) == 2
    assert w18.size_divisibility == 32


def test_config_keys_build_the_backbone():
    cfg = cfg_from(CPU_CFG)
    assert cfg.MODEL.HRNET.NAME == "w18_small_v1"
    model = build_model(cfg)
    assert isinstance(model, HRNetV2) and isinstance(model.backbone, HRNet)
    assert model.backbone.spec == HRNET_PRESETS["w18_small_v1"]
    assert model.size_divisibility == 32
    assert isinstance(model.sem_seg_head, HRNetV2Head) and model.sem_seg_head.common_stride == 4
    # overrides replace the preset's values
    bb = build_hrnet_backbone(cfg_from(CPU_CFG, TINY_HR + ["MODEL.HRNET.OUT_FEATURES",
                                                          "['hr1', 'hrcat']"]),
                              ShapeSpec(channels=1))
    assert bb.spec == TINY_SPEC and bb.stem[0].in_channels == 1
    assert {k: (v.channels, v.stride) for k, v in bb.output_shape().items()} == {
        "hr1": (4, 4), "hrcat": (60, 4)}
    for opts, match in [
        (["MODEL.HRNET.NAME", "w19"], "MODEL.HRNET.NAME 'w19'"),
        (["MODEL.HRNET.NUM_MODULES", "[1, 1]"], "MODEL.HRNET.NUM_MODULES"),
        (["MODEL.HRNET.NUM_BLOCKS", "[1, 1, 0, 1]"], "MODEL.HRNET.NUM_BLOCKS"),
        (["MODEL.HRNET.OUT_FEATURES", "['res5']"], "MODEL.HRNET.OUT_FEATURES.*res5"),
        (["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['hr1', 'p3']"], "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_model(cfg_from(CPU_CFG, opts))


@pytest.mark.parametrize("size", [(37, 61), (100, 129), (64, 64)])
def test_backbone_shapes_and_strides_any_size(size):
    torch.manual_seed(0)
    bb = HRNet(spec=TINY_SPEC, out_features=["hr1", "hr2", "hr3", "hr4", "hrcat"]).eval()
    h, w = size
    with torch.no_grad():
        out = bb(torch.randn(2, 3, h, w))
    shapes = bb.output_shape()
    for k in range(4):
        name = f"hr{k + 1}"
        assert shapes[name].stride == 4 * 2 ** k
        assert out[name].shape == (2, 4 * 2 ** k, halve(h, k + 2), halve(w, k + 2)), name
    assert out["hrcat"].shape == (2, 60, halve(h, 2), halve(w, 2))
    assert torch.equal(out["hrcat"][:, :4], out["hr1"])  # hr1 first, not resized


def test_fusion_resizes_to_the_exact_branch_size():
    """Odd sizes: a branch of 3x5 up-sampled to a 5x9 branch (ratio 5/3, 9/5), not x2."""
    torch.manual_seed(0)
    m = HRModule([4, 8], num_blocks=1).eval()
    xs = [torch.randn(1, 4, 5, 9), torch.randn(1, 8, 3, 5)]
    with torch.no_grad():
        y = m(xs)
    assert y[0].shape == (1, 4, 5, 9) and y[1].shape == (1, 8, 3, 5)
    # only the requested outputs get fusion layers (and are computed)
    m1 = HRModule([4, 8, 16], num_blocks=1, out_branches=[2])
    assert list(m1.fuse.keys()) == ["2"]
    assert [o is None for o in m1([torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4),
                                   torch.randn(1, 16, 2, 2)])] == [True, True, False]


@pytest.mark.parametrize("num_classes", [1, 3])
def test_hrnetv2_train_and_eval_odd_sizes(num_classes):
    torch.manual_seed(0)
    model = build_model(cfg_from(CPU_CFG, TINY_HR, num_classes))
    model.train()
    losses = model(batch([(37, 61), (45, 31)], num_classes))
    assert set(losses) == {"loss_sem_seg_ce", "loss_sem_seg_dice"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert_all_parameters_get_gradients(model)
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 100, 129) * 255},
                     {"image": torch.rand(3, 37, 61) * 255, "height": 50, "width": 70}])
    k = 2 if num_classes == 1 else num_classes
    assert out[0]["sem_seg"].shape == (k, 100, 129)  # the input size
    assert out[1]["sem_seg"].shape == (k, 50, 70)  # the requested output size


def test_gn_and_syncbn_norms():
    assert _gn_groups(64) == 32 and _gn_groups(18) == 3 and _gn_groups(270) == 30
    assert _gn_groups(36) == 9 and _gn_groups(2) == 1
    model = build_model(cfg_from(CPU_CFG, TINY_HR + ["MODEL.HRNET.NORM", "GN",
                                                     "MODEL.SEM_SEG_HEAD.NORM", "GN"]))
    gns = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()
    sum(model(batch([(33, 47)])).values()).backward()
    bb = HRNet(spec=TINY_SPEC, norm="SyncBN")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in bb.modules())


def test_build_without_config():
    bb = HRNet(in_channels=1, spec=TINY_SPEC)
    head = HRNetV2Head(bb.output_shape(), num_classes=3)
    # [] means all features, as for SegFormerHead and MODEL.SEM_SEG_HEAD.IN_FEATURES
    assert HRNetV2Head(bb.output_shape(), num_classes=3, in_features=[]).in_features == \
        head.in_features == list(bb.output_shape())
    model = HRNetV2(backbone=bb, sem_seg_head=head, pixel_mean=[0.0], pixel_std=[1.0])
    assert model.size_divisibility == 32
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(1, 23, 45)}])
    assert out[0]["sem_seg"].shape == (3, 23, 45)
    # the head also takes the backbone's own concatenation as a single input
    bb2 = HRNet(spec=TINY_SPEC, out_features=["hrcat"])
    head2 = HRNetV2Head(bb2.output_shape(), num_classes=2, channels=16)
    assert head2.in_features == ["hrcat"] and head2.fuse.in_channels == 60
    assert head2.fuse.out_channels == 16
    head2.train()
    _, losses = head2(bb2(torch.randn(2, 3, 64, 64)), torch.randint(0, 2, (2, 64, 64)))
    assert set(losses) == {"loss_sem_seg_ce"}
    with pytest.raises(ValueError, match="MODEL.HRNET.NAME 'w64'"):
        HRNet(spec="w64")


# --- HRNet under the other heads ----------------------------------------------------------
def test_hrnet_under_deeplabv3plus():
    torch.manual_seed(0)
    cfg = cfg_from(os.path.join(SHAPES, "deeplabv3plus_hrnet_w18.yaml"), TINY_HR + [
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "8", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "8",
        "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[4]"])
    model = build_model(cfg)
    assert isinstance(model.backbone, HRNet) and isinstance(model.sem_seg_head, ASPPDecoderHead)
    head = model.sem_seg_head
    assert head.in_feature == "hr4" and head.low_features == ["hr1"] and head.common_stride == 4
    # HRNet's last fusion computes only hr1 and hr4
    assert list(model.backbone.stages[-1][-1].fuse.keys()) == ["0", "3"]
    model.train()
    sum(model(batch([(37, 61), (64, 48)], 5)).values()).backward()
    assert_all_parameters_get_gradients(model)  # nothing unused (DDP-safe)
    model.eval()
    with torch.no_grad():
        assert model([{"image": torch.rand(3, 37, 61) * 255}])[0]["sem_seg"].shape == (5, 37, 61)
    # the full-size config builds
    full = build_model(cfg_from(os.path.join(SHAPES, "deeplabv3plus_hrnet_w18.yaml")))
    assert full.sem_seg_head.aspp.dilations == [3, 6, 9]


def test_hrnet_under_pspnet():
    torch.manual_seed(0)
    cfg = cfg_from(os.path.join(SHAPES, "pspnet_cpu.yaml"), TINY_HR + [
        "MODEL.BACKBONE.NAME", "build_hrnet_backbone", "MODEL.HRNET.OUT_FEATURES",
        "['hr3', 'hrcat']", "MODEL.PSP.IN_FEATURE", "hrcat", "MODEL.PSP.AUX_IN_FEATURE", "hr3",
        "MODEL.PSP.POOL_CHANNELS", "4", "MODEL.PSP.CONVS_DIM", "8",
        "MODEL.PSP.AUX_CONVS_DIM", "4"])
    model = build_model(cfg)
    assert isinstance(model.sem_seg_head, PSPHead) and model.sem_seg_head.common_stride == 4
    model.train()
    losses = model(batch([(45, 31), (40, 40)], 5))
    assert {"loss_sem_seg_ce", "loss_aux_ce"} <= set(losses)
    sum(losses.values()).backward()
    assert_all_parameters_get_gradients(model)
    model.eval()
    with torch.no_grad():
        assert model([{"image": torch.rand(3, 45, 31) * 255}])[0]["sem_seg"].shape == (5, 45, 31)


def test_hrnet_fpn_under_semantic_fpn_and_mask_rcnn():
    from detectron2.modeling.backbone import FPN

    torch.manual_seed(0)
    fpn_opts = TINY_HR + ["MODEL.BACKBONE.NAME", "build_hrnet_fpn_backbone",
                          "MODEL.FPN.IN_FEATURES", "['hr1', 'hr2', 'hr3', 'hr4']",
                          "MODEL.FPN.OUT_CHANNELS", "16"]
    sem = build_model(cfg_from(os.path.join(SHAPES, "semantic_fpn_cpu.yaml"),
                               fpn_opts + ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "8"]))
    assert isinstance(sem.backbone, FPN) and isinstance(sem.backbone.bottom_up, HRNet)
    assert {k: v.stride for k, v in sem.backbone.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    sem.train()
    losses = sem(batch([(64, 96)], 5))
    assert all(torch.isfinite(v) for v in losses.values())
    # Mask R-CNN: one training forward and one inference
    rcnn = build_model(cfg_from(os.path.join(REPO, "configs", "Shapes-InstanceSegmentation",
                                             "mask_rcnn_R_18_FPN_cpu.yaml"),
                              fpn_opts + ["MODEL.FPN.OUT_CHANNELS", "32"]))  # GN: 32 groups
    assert isinstance(rcnn.backbone.bottom_up, HRNet)
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    inst = Instances((64, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 8.0, 40.0, 30.0]]))
    inst.gt_classes = torch.tensor([1])
    m = torch.zeros(1, 64, 96, dtype=torch.bool)
    m[:, 8:30, 10:40] = True
    inst.gt_masks = BitMasks(m)
    rcnn.train()
    with EventStorage():
        losses = rcnn([{"image": torch.rand(3, 64, 96) * 255, "instances": inst}])
    assert {"loss_mask", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    rcnn.eval()
    with torch.no_grad():
        out = rcnn([{"image": torch.rand(3, 64, 96) * 255}])
    assert out[0]["instances"].image_size == (64, 96)
    # Panoptic FPN: one inference
    pan = build_model(cfg_from(os.path.join(REPO, "configs", "Shapes-PanopticSegmentation",
                                            "panoptic_fpn_R_18_cpu.yaml"),
                               fpn_opts + ["MODEL.FPN.OUT_CHANNELS", "32"])).eval()
    assert isinstance(pan.backbone.bottom_up, HRNet)
    with torch.no_grad():
        out = pan([{"image": torch.rand(3, 64, 96) * 255}])
    assert out[0]["sem_seg"].shape[-2:] == (64, 96) and "panoptic_seg" in out[0]
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES"):
        build_model(cfg_from(os.path.join(SHAPES, "semantic_fpn_cpu.yaml"),
                             TINY_HR + ["MODEL.BACKBONE.NAME", "build_hrnet_fpn_backbone"]))


# --- train_net, export, predict -----------------------------------------------------------
def test_train_and_eval_through_train_net(tmp_path):
    res = run_train_net(CPU_CFG, tmp_path, *TRAIN_TINY, *TINY_HR)
    check_metrics(res, ["water", "sand", "circle", "triangle", "rectangle"])
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "shapes_sem_seg_val" / "sem_seg_metrics.json").is_file()


def test_configs_build():
    """The realistic configs build the published networks (5 shapes classes)."""
    counts = {}
    for name in ("hrnet_w18.yaml", "hrnet_w48.yaml"):
        counts[name] = n_params(build_model(cfg_from(os.path.join(SHAPES, name))))
    # 19 -> 5 classes removes 14 classifier rows of 15 W + 1
    assert counts["hrnet_w18.yaml"] == EXACT["w18"] - 14 * 271
    assert counts["hrnet_w48.yaml"] == EXACT["w48"] - 14 * 721
    isbi = build_model(cfg_from(os.path.join(ISBI, "hrnet_w18_small_cpu.yaml")))
    assert n_params(isbi) == EXACT["w18_small_v1"] - 17 * 241
    cfg = cfg_from(os.path.join(ISBI, "hrnet_w18_small_cpu.yaml"))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH, tuple(cfg.INPUT.CROP.SIZE)) == (
        600, 4, (256, 256))
    assert cfg_from(os.path.join(ISBI, "hrnet_w18.yaml")).INPUT.CROP.ENABLED is False


def test_export_torchscript_and_onnx_dynamic_size(tmp_path):
    from d2seg.export import export_semantic

    torch.manual_seed(0)
    model = build_model(cfg_from(CPU_CFG, TINY_HR))
    results = export_semantic(model, str(tmp_path), 64, 64, check_sizes=((64, 96), (37, 61)))
    assert [r["format"] for r in results] == ["torchscript", "onnx"]
    for r in results:
        assert not r.get("error"), r
        assert r["dynamic"] and os.path.isfile(r["path"])
        assert r["checked_shapes"] == [[64, 96], [37, 61]]
        assert r["max_abs_diff"] < 1e-3, r


def test_predict_tool(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import predict as predict_tool

    img = tmp_path / "x.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (70, 93, 3), dtype=np.uint8)
                    ).save(img)
    out = tmp_path / "out"
    written = predict_tool.main(["--config-file", CPU_CFG, "--input", str(img), "--output",
                                 str(out), "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "0",
                                 *TINY_HR])
    assert set(written) == {"sem_seg"}
    lab = np.asarray(Image.open(out / "sem_seg" / "x.png"))
    assert lab.shape == (70, 93) and lab.max() < 5
