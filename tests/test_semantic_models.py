"""d2seg's semantic meta-architectures: shapes for odd input sizes, parameter counts, dilated
ResNet encoders, building without a config, learning, and train + eval through train_net."""
import math
import os

import pytest
import torch

import d2seg  # noqa: F401  (registers everything)
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import ResNet

from d2seg.config import get_cfg
from d2seg.modeling.backbone import UNetEncoder
from d2seg.modeling.heads import ASPPDecoderHead, ASPPHead, PSPHead, UNetHead
from d2seg.modeling.layers import ASPP
from d2seg.modeling.meta_arch import UNet

from conftest import REPO

SHAPES = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation")
ISBI = os.path.join(REPO, "configs", "ISBI-SemanticSegmentation")

# Even smaller than the *_cpu configs, for unit tests.
TINY_RESNET = ["MODEL.RESNETS.WIDTH_PER_GROUP", 4, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
               "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 8,
               "MODEL.SEM_SEG_HEAD.CONVS_DIM", 8, "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [4],
               "MODEL.PSP.POOL_CHANNELS", 4, "MODEL.PSP.CONVS_DIM", 8,
               "MODEL.PSP.AUX_CONVS_DIM", 4]
TINY = {
    "unet": ("unet_cpu.yaml", ["MODEL.UNET.BASE_CHANNELS", 4, "MODEL.UNET.DEPTH", 3]),
    "unet_bilinear": ("unet_cpu.yaml", ["MODEL.UNET.BASE_CHANNELS", 4,
                                        "MODEL.UNET.UPSAMPLE", "bilinear"]),
    "unet_resnet": ("unet_R_50.yaml", TINY_RESNET[:6] + [
        "MODEL.UNET.DECODER_CHANNELS", [16, 8, 8, 4, 4]]),
    "deeplabv3": ("deeplabv3_cpu.yaml", TINY_RESNET),
    "deeplabv3plus": ("deeplabv3plus_cpu.yaml", TINY_RESNET),
    "pspnet": ("pspnet_cpu.yaml", TINY_RESNET),
    "semantic_fpn": ("semantic_fpn_cpu.yaml", ["MODEL.FPN.OUT_CHANNELS", 8,
                                               "MODEL.SEM_SEG_HEAD.CONVS_DIM", 8]),
}


def cfg_from(path, opts=(), num_classes=None):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list([str(x) if not isinstance(x, list) else str(x) for x in opts])
    cfg.MODEL.DEVICE = "cpu"
    if num_classes is not None:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    return cfg


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_unet_classic_parameter_count():
    cfg = cfg_from(os.path.join(SHAPES, "unet.yaml"), num_classes=2)
    assert (cfg.MODEL.UNET.DEPTH, cfg.MODEL.UNET.BASE_CHANNELS, cfg.MODEL.UNET.NORM,
            cfg.MODEL.UNET.UPSAMPLE, len(cfg.MODEL.PIXEL_MEAN)) == (4, 64, "BN", "transposed", 3)
    model = build_model(cfg)
    assert isinstance(model, UNet)
    assert n_params(model) == 31_043_586
    # the ISBI config is the same network
    assert n_params(build_model(cfg_from(os.path.join(ISBI, "unet.yaml")))) == 31_043_586
    # without the redundant conv biases (detectron2's usual bias = not norm)
    cfg.MODEL.UNET.CONV_BIAS = False
    assert n_params(build_model(cfg)) == 31_043_586 - 5888


def test_unet_variants_change_the_network():
    cfg = cfg_from(os.path.join(SHAPES, "unet.yaml"), num_classes=2)
    cfg.MODEL.UNET.UPSAMPLE = "bilinear"
    m = build_model(cfg)
    ups = [s.up for s in m.sem_seg_head.stages]
    assert all(not isinstance(u, torch.nn.ConvTranspose2d) for u in ups)
    cfg.MODEL.UNET.DEPTH, cfg.MODEL.UNET.BASE_CHANNELS = 3, 8
    m = build_model(cfg)
    assert m.size_divisibility == 8 and len(m.sem_seg_head.stages) == 3
    assert m.backbone.output_shape()["enc3"] == ShapeSpec(channels=64, stride=8)
    cfg.MODEL.UNET.NORM = "GN"
    cfg.MODEL.UNET.BASE_CHANNELS = 32
    m = build_model(cfg)
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    cfg.MODEL.UNET.UPSAMPLE = "nearest"
    with pytest.raises(ValueError, match="MODEL.UNET.UPSAMPLE.*'nearest'"):
        build_model(cfg)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("arch", list(TINY))
def test_forward_backward_odd_sizes(arch, num_classes):
    torch.manual_seed(0)
    name, opts = TINY[arch]
    cfg = cfg_from(os.path.join(SHAPES, name), opts, num_classes)
    model = build_model(cfg)
    model.train()
    sizes = [(37, 53), (45, 31)]
    batch = []
    for h, w in sizes:
        t = torch.randint(0, max(num_classes, 2), (h, w))
        t[:2] = 255
        batch.append({"image": torch.rand(3, h, w) * 255, "sem_seg": t})
    losses = model(batch)
    expected = {"loss_sem_seg_ce", "loss_sem_seg_dice"}
    if arch == "pspnet":
        expected |= {"loss_aux_ce", "loss_aux_dice"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 41, 29) * 255, "height": 61, "width": 43},
                     {"image": torch.rand(3, 33, 35) * 255}])
    k = 2 if num_classes == 1 else num_classes
    assert out[0]["sem_seg"].shape == (k, 61, 43)  # original size ("height", "width")
    assert out[1]["sem_seg"].shape == (k, 33, 35)  # input size by default
    if num_classes == 1:  # [0, z]: softmax = [1 - sigmoid(z), sigmoid(z)]
        assert torch.all(out[0]["sem_seg"][0] == 0)



def test_a_label_map_of_another_size_than_its_image_is_refused():
    """Images and labels are padded apart and the logits resized to the labels: a 32x48 label
    map with a 64x64 image would give a finite loss on misaligned pixels. It names the file."""
    name, opts = TINY["unet"]
    model = build_model(cfg_from(os.path.join(SHAPES, name), opts, 2)).train()
    batch = [{"image": torch.rand(3, 64, 64) * 255, "sem_seg": torch.zeros(64, 64, dtype=torch.long),
              "file_name": "ok.png"},
             {"image": torch.rand(3, 64, 64) * 255, "sem_seg": torch.zeros(32, 48, dtype=torch.long),
              "file_name": "b.png"}]
    with pytest.raises(ValueError, match=r"sizes differ .*\('b\.png', \(64, 64\), \(32, 48\)\)"):
        model(batch)

def test_eval_pads_to_size_divisibility_and_crops_back():
    """The output for a 24x30 input is the top-left 24x30 of the prediction on the input
    normalised and zero-padded to 24x32 (size divisibility 8)."""
    torch.manual_seed(0)
    name, opts = TINY["unet"]
    model = build_model(cfg_from(os.path.join(SHAPES, name), opts, 2)).eval()
    assert model.size_divisibility == 8
    img = torch.rand(3, 24, 30) * 255
    with torch.no_grad():
        out = model([{"image": img}])[0]["sem_seg"]
        padded = torch.zeros(1, 3, 24, 32)
        padded[0, :, :, :30] = (img - model.pixel_mean) / model.pixel_std
        logits, _ = model.sem_seg_head(model.backbone(padded))
    assert out.shape == (2, 24, 30)
    assert torch.allclose(out, logits[0, :, :24, :30], atol=1e-5)


@pytest.mark.parametrize("config, depth, strides, dilations", [
    ("deeplabv3_R_50.yaml", 50, {"res2": 4, "res4": 16, "res5": 16}, {"res4": 1, "res5": 2}),
    ("deeplabv3plus_R_50.yaml", 50, {"res2": 4, "res4": 16, "res5": 16}, {"res4": 1, "res5": 2}),
    ("deeplabv3_R_101_os8.yaml", 101, {"res2": 4, "res4": 8, "res5": 8}, {"res4": 2, "res5": 4}),
    ("pspnet_R_50.yaml", 50, {"res2": 4, "res4": 8, "res5": 8}, {"res4": 2, "res5": 4}),
])
def test_dilated_resnet_encoders(config, depth, strides, dilations):
    cfg = cfg_from(os.path.join(SHAPES, config))
    model = build_model(cfg)
    bb = model.backbone
    assert isinstance(bb, ResNet)  # detectron2's ResNet
    shapes = bb.output_shape()
    assert {k: shapes[k].stride for k in strides} == strides
    n_res4 = {50: 6, 101: 23}[depth]
    assert len(bb.res4) == n_res4
    assert bb.res4[0].conv2.dilation == (dilations["res4"],) * 2
    assert bb.res5[0].conv2.dilation[0] >= dilations["res5"]  # x multi-grid
    # trained from scratch: trainable BatchNorm, nothing frozen
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert cfg.MODEL.WEIGHTS == ""
    head = model.sem_seg_head
    if isinstance(head, ASPPHead):
        assert head.common_stride == strides["res5"]
        assert head.aspp.dilations == list(cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS)
    if isinstance(head, ASPPDecoderHead):
        assert head.common_stride == 4 and head.low_features == ["res2"]
    if isinstance(head, PSPHead):
        assert head.ppm.bins == [1, 2, 3, 6] and head.aux_in_feature == "res4"


def test_aspp_rates_and_image_pooling_configurable():
    x = torch.randn(2, 16, 9, 11)
    a = ASPP(16, 8, [2, 4, 6, 8], norm="BN", image_pooling=True)
    b = ASPP(16, 8, [3], norm="BN", image_pooling=False)
    assert a(x).shape == b(x).shape == (2, 8, 9, 11)
    assert len(a.branches) == 5 and len(b.branches) == 2
    assert a.project.in_channels == 6 * 8 and b.project.in_channels == 2 * 8
    assert not hasattr(b, "pool_conv")
    with pytest.raises(ValueError, match="dilations"):
        ASPP(16, 8, [0])
    # through the config
    cfg = cfg_from(os.path.join(SHAPES, "deeplabv3_cpu.yaml"), TINY_RESNET)
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [6, 12]
    cfg.MODEL.SEM_SEG_HEAD.ASPP_IMAGE_POOLING = False
    head = build_model(cfg).sem_seg_head
    assert head.aspp.dilations == [6, 12] and not head.aspp.image_pooling


@pytest.mark.parametrize("config, opts", [
    ("deeplabv3plus_cpu.yaml", ["MODEL.SEM_SEG_HEAD.NORM", "GN"]),  # 24-channel projection
    ("unet_cpu.yaml", ["MODEL.UNET.NORM", "GN"]),  # 16-channel first level
])
def test_group_norm_at_widths_that_are_not_multiples_of_32(config, opts):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(SHAPES, config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts] + [str(x) for x in TINY_RESNET])
    model = build_model(cfg)
    gns = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_channels % m.num_groups == 0 for m in gns)
    from d2seg.modeling.layers.blocks import gn_groups

    assert any(m.num_channels % 32 for m in gns)  # the widths that failed before
    assert all(m.num_groups == gn_groups(m.num_channels) for m in gns)  # 32 where they allow
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255}])
    assert out[0]["sem_seg"].shape == (5, 64, 64)


def test_build_without_config():
    enc = UNetEncoder(in_channels=3, depth=2, base_channels=4, norm="BN")
    head = UNetHead(enc.output_shape(), num_classes=3, norm="BN", upsample="bilinear")
    model = UNet(backbone=enc, sem_seg_head=head, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    assert model.size_divisibility == 4
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 10, 7)}])
    assert out[0]["sem_seg"].shape == (3, 10, 7)
    # heads built from shapes alone, with the default CE loss
    shapes = {"res2": ShapeSpec(channels=8, stride=4), "res5": ShapeSpec(channels=16, stride=16)}
    h = ASPPDecoderHead(shapes, project_features=["res2"], project_channels=[4], num_classes=2,
                        decoder_channels=8, aspp_channels=8)
    feats = {"res2": torch.randn(2, 8, 8, 8), "res5": torch.randn(2, 16, 2, 2)}
    h.train()
    _, losses = h(feats, torch.randint(0, 2, (2, 32, 32)))
    assert set(losses) == {"loss_sem_seg_ce"}
    with pytest.raises(ValueError, match="PROJECT_FEATURES"):
        ASPPDecoderHead(shapes, project_features=["res3"], project_channels=[4], num_classes=2)
    # a backbone's whole output_shape(): ASPP on the deepest non-project feature, as ASPPHead
    more = dict(shapes, res3=ShapeSpec(channels=8, stride=8), res4=ShapeSpec(channels=8, stride=16))
    more["res5"] = ShapeSpec(channels=16, stride=32)
    h = ASPPDecoderHead(more, project_features=["res2"], project_channels=[4], num_classes=2,
                        decoder_channels=8, aspp_channels=8)
    assert h.in_feature == "res5"
    # a dilated ResNet: res4 and res5 share the stride; ASPP takes res5 (2048 channels in R50)
    dilated = {"res2": shapes["res2"], "res3": ShapeSpec(channels=8, stride=8),  # stage order
               "res4": ShapeSpec(channels=8, stride=16), "res5": ShapeSpec(channels=16, stride=16)}
    h = ASPPDecoderHead(dilated, project_features=["res2"], project_channels=[4], num_classes=2,
                        decoder_channels=8, aspp_channels=8)
    assert h.in_feature == "res5" and h.aspp.branches[0].weight.shape[1] == 16
    h = ASPPHead(dilated, num_classes=2, aspp_channels=8)
    assert h.in_feature == "res5" and h.aspp.branches[0].weight.shape[1] == 16
    with pytest.raises(ValueError, match=r"^MODEL\.SEM_SEG_HEAD\.PROJECT_FEATURES \[.res2.\]: .* "
                                         r"needs a deeper feature for ASPP besides them"):
        ASPPDecoderHead({"res2": shapes["res2"]}, project_features=["res2"], project_channels=[4],
                        num_classes=2)
    # a 1-channel image for a 3-channel model: an error naming MODEL.PIXEL_MEAN, not a silent
    # broadcast (float) or an in-place error (uint8)
    for dtype in (torch.float32, torch.uint8):
        with pytest.raises(ValueError, match="C = 3 channels.*MODEL.PIXEL_MEAN"):
            model([{"image": torch.zeros(1, 10, 7, dtype=dtype)}])
    model.train()
    with pytest.raises(ValueError, match=r"missing in \['b.png'\]"):
        model([{"image": torch.rand(3, 8, 8), "sem_seg": torch.zeros(8, 8, dtype=torch.long)},
               {"image": torch.rand(3, 8, 8), "file_name": "b.png"}])


def test_unet_learns_a_toy_task():
    """A tiny U-Net separates a bright square from the background within 60 steps."""
    torch.manual_seed(0)
    name, opts = TINY["unet"]
    cfg = cfg_from(os.path.join(SHAPES, name), opts, 2)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = []
    for i in range(4):
        img = torch.rand(3, 32, 32) * 60
        t = torch.zeros(32, 32, dtype=torch.long)
        r, c = 4 + 4 * i, 20 - 4 * i
        img[:, r:r + 8, c:c + 8] += 150
        t[r:r + 8, c:c + 8] = 1
        batch.append({"image": img, "sem_seg": t})
    model.train()
    first = None
    for _ in range(60):
        loss = sum(model(batch).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    with torch.no_grad():
        pred = model([{"image": b["image"]} for b in batch])
    from d2seg.metrics import iou

    for p, b in zip(pred, batch):
        assert iou(p["sem_seg"].argmax(0) == 1, b["sem_seg"] == 1) > 0.8


# --- a few iterations of train + eval through train_net's code path -----------------------
TRAIN_TINY = ["D2SEG.SHAPES.NUM_TRAIN", "6", "D2SEG.SHAPES.NUM_VAL", "2",
              "D2SEG.SHAPES.IMAGE_SIZE", "96", "INPUT.MIN_SIZE_TRAIN", "(96,)",
              "INPUT.MIN_SIZE_TEST", "96", "INPUT.CROP.SIZE", "(64,64)",
              "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
              "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0"]


def run_train_net(config, out, *extra, flags=()):
    from d2seg.engine import default_argument_parser, main

    args = default_argument_parser().parse_args(
        ["--config-file", config, *flags, "OUTPUT_DIR", str(out), *extra])
    return main(args)


def check_metrics(res, classes):
    assert "sem_seg" in res and "sem_seg_metrics" in res
    m = res["sem_seg_metrics"]
    for k in ["mIoU", "mDice", "pACC", "mBIoU"] + [f"{p}-{c}" for c in classes
                                                   for p in ("IoU", "Dice", "BIoU")]:
        assert k in m, k
        assert math.isnan(m[k]) or 0.0 <= m[k] <= 100.0, (k, m[k])
    # d2seg's evaluator against detectron2's SemSegEvaluator (an independent implementation)
    # on the same predictions, and Dice against IoU (Dice = 2 IoU / (1 + IoU) per class)
    # (detectron2 leaves out a class absent from the ground truth, d2seg scores a prediction
    # of it 0: docs/semantic.md, Metrics)
    d2 = res["sem_seg"]
    for c in classes:
        iou, ref = m[f"IoU-{c}"], d2[f"IoU-{c}"]
        if math.isnan(ref):
            assert math.isnan(iou) or iou == 0.0, c
        else:
            assert iou == pytest.approx(ref, abs=1e-6), c
        if not math.isnan(iou):
            assert m[f"Dice-{c}"] == pytest.approx(200 * iou / (100 + iou), abs=1e-6), c
    every = [k[len("IoU-"):] for k in m if k.startswith("IoU-")]
    ious = [m[f"IoU-{c}"] for c in every if not math.isnan(m[f"IoU-{c}"])]
    assert m["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-6)
    if all(math.isnan(m[f"IoU-{c}"]) == math.isnan(d2[f"IoU-{c}"]) for c in every):
        assert m["mIoU"] == pytest.approx(d2["mIoU"], abs=1e-6)
    assert m["pACC"] == pytest.approx(d2["pACC"], abs=1e-6)


@pytest.mark.parametrize("config", ["unet_cpu.yaml", "deeplabv3_cpu.yaml",
                                    "deeplabv3plus_cpu.yaml", "pspnet_cpu.yaml",
                                    "semantic_fpn_cpu.yaml"])
def test_train_and_eval_through_train_net(tmp_path, config):
    opts = list(TRAIN_TINY)
    if config != "unet_cpu.yaml" and config != "semantic_fpn_cpu.yaml":
        opts += [str(x) if not isinstance(x, list) else str(x) for x in TINY_RESNET]
    res = run_train_net(os.path.join(SHAPES, config), tmp_path, *opts)
    check_metrics(res, ["water", "sand", "circle", "triangle", "rectangle"])
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "shapes_sem_seg_val" / "sem_seg_metrics.json").is_file()


def test_eval_only_with_post_processing_through_train_net(tmp_path):
    cfg = os.path.join(SHAPES, "unet_cpu.yaml")
    opts = TRAIN_TINY + ["MODEL.UNET.BASE_CHANNELS", "4", "MODEL.SEM_SEG_LOSS.NAMES",
                         "['Focal', 'Tversky']", "MODEL.SEM_SEG_LOSS.WEIGHTS", "[1.0, 0.5]",
                         "DATALOADER.SAMPLER_TRAIN", "SemSegRepeatFactorTrainingSampler",
                         "DATALOADER.REPEAT_THRESHOLD", "0.3",
                         "INPUT.FG_CROP.ENABLED", "True"]
    trained = run_train_net(cfg, tmp_path, *opts)
    check_metrics(trained, ["water", "sand", "circle"])
    res = run_train_net(cfg, tmp_path / "eval", *opts, "MODEL.WEIGHTS",
                        str(tmp_path / "model_final.pth"),
                        "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True",
                        "MODEL.SEM_SEG_POSTPROCESS.MIN_AREA", "20", flags=["--eval-only"])
    check_metrics(res, ["water", "sand", "circle"])
    assert not (tmp_path / "eval" / "model_final.pth").exists()  # evaluated, not trained
    # a config whose model does not fit the checkpoint (another NUM_CLASSES): stop, not
    # evaluate random layers
    with pytest.raises(ValueError, match=r"--eval-only: .*model_final.pth: 2 tensor\(s\) have "
                                         r"other shapes than the model"):
        run_train_net(cfg, tmp_path / "eval2", *opts, "MODEL.WEIGHTS",
                      str(tmp_path / "model_final.pth"), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7",
                      "D2SEG.DATASETS.CHECK", "off", flags=["--eval-only"])
    # nor a checkpoint that lacks layers of the model (here: the head), nor predict with either
    ck = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    ck["model"] = {k: v for k, v in ck["model"].items() if "sem_seg_head" not in k}
    torch.save(ck, tmp_path / "no_head.pth")
    with pytest.raises(ValueError, match=r"--eval-only: .*no_head.pth: \d+ parameter\(s\) of the "
                                         r"model are not in it \(sem_seg_head"):
        run_train_net(cfg, tmp_path / "eval3", *opts, "MODEL.WEIGHTS", str(tmp_path / "no_head.pth"),
                      "D2SEG.DATASETS.CHECK", "off", flags=["--eval-only"])
    from d2seg.inference import SegPredictor
    from d2seg.inference.run import predict_config

    for weights, extra in (("model_final.pth", ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7"]),
                           ("no_head.pth", [])):
        pcfg = predict_config(cfg, opts + ["MODEL.WEIGHTS", str(tmp_path / weights)] + extra)
        with pytest.raises(ValueError, match=r"MODEL.WEIGHTS: .*random layers"):
            SegPredictor(pcfg)


def test_integer_pixel_mean_and_an_unused_head_name(caplog):
    import logging

    from d2seg.modeling.backbone import UNetEncoder
    from d2seg.modeling.heads import UNetHead
    from d2seg.modeling.meta_arch import UNet

    backbone = UNetEncoder(depth=2, base_channels=4)
    model = UNet(backbone=backbone, sem_seg_head=UNetHead(backbone.output_shape(), num_classes=2),
                 pixel_mean=[128, 128, 128], pixel_std=[64, 64, 64]).eval()
    assert model.pixel_mean.dtype == torch.float32
    with torch.no_grad():
        assert model([{"image": torch.rand(3, 16, 16) * 255}])[0]["sem_seg"].shape == (2, 16, 16)
    cfg = cfg_from(os.path.join(SHAPES, "unet_cpu.yaml"), ["MODEL.SEM_SEG_HEAD.NAME", "ASPPHead"])
    with caplog.at_level(logging.WARNING):
        assert isinstance(build_model(cfg).sem_seg_head, UNetHead)
    assert "MODEL.SEM_SEG_HEAD.NAME='ASPPHead' is not used" in caplog.text


def test_isbi_config_trains_and_reports_membrane(tmp_path, shared_data, isbi_registered):
    res = run_train_net(os.path.join(ISBI, "unet_cpu.yaml"), tmp_path, "SOLVER.MAX_ITER", "2",
                        "SOLVER.IMS_PER_BATCH", "2", "MODEL.UNET.BASE_CHANNELS", "4",
                        "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1")
    check_metrics(res, ["cell", "membrane"])


def test_registered_names_are_the_documented_modules():
    """Every head, backbone and meta-architecture d2seg documents is in its detectron2
    registry under its name (a decorator above the wrong definition registered a helper)."""
    import inspect

    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    heads = {n for n, _ in SEM_SEG_HEADS_REGISTRY}
    # the lists of d2seg/modeling/__init__.py's docstring
    assert {"UNetHead", "ASPPHead", "ASPPDecoderHead", "PSPHead", "SemSegFPNLossHead",
            "SegFormerHead", "HRNetV2Head"} <= heads
    assert {"UNet", "DeepLabV3", "DeepLabV3Plus", "PSPNet", "SegFormer", "HRNetV2"} <= \
        {n for n, _ in META_ARCH_REGISTRY}
    assert {"build_unet_backbone", "build_mit_backbone", "build_hrnet_backbone",
            "build_hrnet_fpn_backbone", "build_resnet_deeplab_backbone"} <= \
        {n for n, _ in BACKBONE_REGISTRY}
    for n, obj in SEM_SEG_HEADS_REGISTRY:
        assert inspect.isclass(obj) and not n.startswith("_"), n
    for n, obj in META_ARCH_REGISTRY:
        assert inspect.isclass(obj), n


def test_size_divisibility_is_checked_against_a_resnets_deepest_stride():
    """detectron2's ResNet reports no size_divisibility: a padding of 8 with a stride-32
    ResNet was accepted, and eval logits were then stretched onto the input (not cropped)."""
    from detectron2.modeling.backbone.resnet import BasicStem, ResNet

    from d2seg.modeling.heads import ASPPHead
    from d2seg.modeling.meta_arch import DeepLabV3

    b = ResNet(BasicStem(3, 8, norm="BN"), ResNet.make_default_stages(18, norm="BN"),
               out_features=["res5"])
    head = ASPPHead(b.output_shape(), num_classes=2, aspp_channels=8)
    kw = dict(backbone=b, sem_seg_head=head, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    with pytest.raises(ValueError, match="SIZE_DIVISIBILITY=8 is not a multiple of the "
                                         "backbone's deepest stride 32"):
        DeepLabV3(size_divisibility=8, **kw)
    assert DeepLabV3(**kw).size_divisibility == 32
    assert DeepLabV3(size_divisibility=64, **kw).size_divisibility == 64
