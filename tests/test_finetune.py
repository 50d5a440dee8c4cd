"""Fine-tuning: MODEL.WEIGHTS into a model with another number of classes, torchvision ResNets,
model-zoo .pkl files, freezing (d2seg/checkpoint.py and Trainer.build_model/resume_or_load)."""
import logging
import os
import pickle

import pytest
import torch

import d2seg  # noqa: F401
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from d2seg.checkpoint import (
    FinetuneCheckpointer,
    convert_torchvision_resnet,
    freeze_parameters,
    load_weights,
)
from d2seg.config import load_config
from d2seg.engine import Trainer, default_argument_parser, main

from conftest import REPO

CFG = os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
HEAD_KEYS = {
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias",
}


def _cfg(*opts):
    return load_config(CFG, ["MODEL.DEVICE", "cpu", "D2SEG.DATASETS.REGISTER", "[]", *opts])


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def fvcore_log():
    h = _Capture()
    lg = logging.getLogger("fvcore.common.checkpoint")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    yield h.records
    lg.removeHandler(h)
    lg.setLevel(old)


@pytest.fixture(scope="module")
def five_class_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(_cfg("MODEL.ROI_HEADS.NUM_CLASSES", "5"))
    path = tmp_path_factory.mktemp("ck") / "five.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, path)
    return str(path), {k: v.clone() for k, v in model.state_dict().items()}


def test_head_with_other_class_count_is_skipped_in_one_line(five_class_ckpt, fvcore_log):
    path, sd5 = five_class_ckpt
    torch.manual_seed(1)
    model = build_model(_cfg())  # 3 classes
    summary = load_weights(model, path)
    assert {k for k, _, _ in summary["skipped_shape"]} == HEAD_KEYS
    assert summary["missing"] == [] and summary["unexpected"] == []
    sd3 = model.state_dict()
    assert summary["loaded"] == len(sd3) - len(HEAD_KEYS)
    for k, v in sd3.items():
        if k not in HEAD_KEYS:
            assert torch.equal(v, sd5[k]), k
    lines = [r.getMessage() for r in fvcore_log if "shape differs" in r.getMessage()]
    assert len(lines) == 1
    assert "roi_heads.box_predictor.cls_score.weight (6, 512)->(4, 512)" in lines[0]
    # no per-tensor warnings of fvcore on top of the one line
    assert not [r for r in fvcore_log if "Skip loading parameter" in r.getMessage()]
    # for inference (--eval-only, predict, export) the same file is an error, and the
    # fine-tuning line, which would say the weights were skipped to train, is not logged
    fvcore_log.clear()
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS: .*five.pth: \d+ tensor\(s\) have "
                                         r"other shapes"):
        load_weights(build_model(_cfg()), path, complete=True, context="MODEL.WEIGHTS")
    assert not [r for r in fvcore_log if "shape differs" in r.getMessage()]


def test_model_zoo_pkl_format(five_class_ckpt, tmp_path):
    _, sd5 = five_class_ckpt
    pkl = tmp_path / "zoo.pkl"
    with open(pkl, "wb") as f:  # detectron2 model-zoo layout: numpy arrays + __author__
        pickle.dump({"model": {k: v.numpy() for k, v in sd5.items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    model = build_model(_cfg())
    summary = load_weights(model, str(pkl))
    assert {k for k, _, _ in summary["skipped_shape"]} == HEAD_KEYS
    k = "backbone.bottom_up.res3.0.conv1.weight"
    assert torch.equal(model.state_dict()[k], sd5[k])


def test_torchvision_resnet18_state_dict(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # make BN statistics non-trivial
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(_cfg("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1",
                             "False"))
    ck = FinetuneCheckpointer(model)
    ck.load(str(path), checkpointables=[])
    s = ck.last_summary
    assert s["format"] == "torchvision-resnet" and s["skipped_shape"] == []
    assert not [k for k in s["missing"] if ".bottom_up." in k]
    assert s["unexpected"] == []
    sd, tvsd = model.state_dict(), tv.state_dict()
    pairs = {
        "backbone.bottom_up.stem.conv1.weight": "conv1.weight",
        "backbone.bottom_up.stem.conv1.norm.running_mean": "bn1.running_mean",
        "backbone.bottom_up.res2.1.conv2.weight": "layer1.1.conv2.weight",
        "backbone.bottom_up.res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
        "backbone.bottom_up.res3.0.shortcut.norm.running_var": "layer2.0.downsample.1.running_var",
        "backbone.bottom_up.res5.1.conv1.norm.weight": "layer4.1.bn1.weight",
    }
    for d2k, tvk in pairs.items():
        assert torch.equal(sd[d2k], tvsd[tvk]), d2k
    n_tv = len([k for k in tvsd if not k.startswith("fc.") and "num_batches" not in k])
    assert s["loaded"] == n_tv  # what came from the file, not the tensors the model has


@pytest.mark.parametrize("wrap", ["state_dict", "encoder.", "module.", "plain", "smp"])
def test_wrapped_torchvision_resnet_files_load_the_same(tmp_path, wrap):
    """A ResNet saved as {"state_dict": ...} (timm, Lightning), as smp's "encoder." or
    DataParallel's "module."; the count is what came from the file."""
    import torchvision

    torch.manual_seed(0)
    tvsd = torchvision.models.resnet18(weights=None).state_dict()
    obj = {"state_dict": tvsd} if wrap == "state_dict" else \
        tvsd if wrap == "plain" else {wrap + k: v for k, v in tvsd.items()} if wrap != "smp" \
        else {**{"encoder." + k: v for k, v in tvsd.items() if not k.startswith("fc.")},
              "decoder.blocks.0.conv1.0.weight": torch.zeros(256, 768, 3, 3),
              "segmentation_head.0.weight": torch.zeros(1, 16, 3, 3)}  # a whole smp Unet
    torch.save(obj, tmp_path / "w.pth")
    model = build_model(_cfg("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1",
                             "False"))
    summary = load_weights(model, str(tmp_path / "w.pth"))
    assert summary["format"] == "torchvision-resnet"
    assert summary["loaded"] == len([k for k in tvsd if not k.startswith("fc.")
                                     and "num_batches" not in k])
    assert torch.equal(model.state_dict()["backbone.bottom_up.res4.1.conv2.weight"],
                       tvsd["layer3.1.conv2.weight"])


def test_a_file_that_fits_nothing_is_an_error(tmp_path):
    torch.save({"model": {"encoder.conv.weight": torch.zeros(3, 3), "decoder.w": torch.ones(2)}},
               tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: none of its 2 tensors fits the model "
                                         r"\(names in the file start with \['decoder\.', "
                                         r"'encoder\.'\], the model's with \['backbone\."):
        load_weights(build_model(_cfg()), str(tmp_path / "other.pth"))
    torch.save({"optimizer": {}}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="empty.pth"):
        load_weights(build_model(_cfg()), str(tmp_path / "empty.pth"))
    # not a checkpoint at all (an image saved as .pth), a truncated download: one line
    (tmp_path / "image.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS '.*image.pth': not a readable "
                                         r"checkpoint \(UnpicklingError: "):
        load_weights(build_model(_cfg()), str(tmp_path / "image.pth"))
    torch.save({"model": {"w": torch.zeros(100)}}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cut.pth': not a readable checkpoint"):
        load_weights(build_model(_cfg()), str(tmp_path / "cut.pth"))


def test_torchvision_bottleneck_keys_match_detectron2_resnet50():
    import torchvision

    cfg = _cfg("MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
               "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.OUT_FEATURES", "['res5']")
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    converted = convert_torchvision_resnet(torchvision.models.resnet50(weights=None).state_dict())
    assert set(converted) == set(backbone.state_dict())
    for k, v in backbone.state_dict().items():
        assert converted[k].shape == v.shape, k


def test_freeze_parameters_and_optimizer():
    cfg = _cfg("MODEL.RESNETS.NORM", "BN")
    model = build_model(cfg)
    n_params = len([p for p in model.parameters() if p.requires_grad])
    frozen = freeze_parameters(model, [r"backbone\.bottom_up\.(stem|res2)\."])
    assert frozen and all(n.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))
                          for n in frozen)
    assert isinstance(model.backbone.bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert isinstance(model.backbone.bottom_up.res3[0].conv1.norm, torch.nn.BatchNorm2d)
    assert not any(p.requires_grad for p in model.backbone.bottom_up.res2.parameters())
    opt = Trainer.build_optimizer(cfg, model)
    in_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert in_opt == len([p for p in model.parameters() if p.requires_grad])
    assert in_opt < n_params - len([f for f in frozen if "norm" not in f])
    with pytest.raises(ValueError, match="'backbone.nope' matches no parameter"):
        freeze_parameters(model, ["backbone.nope"])


def test_finetune_through_train_net(five_class_ckpt, shared_data, tmp_path):
    """2 iterations of train_net's code path from the 5-class checkpoint, backbone frozen."""
    path, sd5 = five_class_ckpt
    args = default_argument_parser().parse_args([
        "--config-file", CFG, "OUTPUT_DIR", str(tmp_path),
        "DATASETS.TRAIN", "('fruits_nuts_train',)", "DATASETS.TEST", "()",
        "D2SEG.DATASETS.REGISTER", "[]", "MODEL.WEIGHTS", path,
        "D2SEG.FINETUNE.FREEZE", r"('backbone\.',)", "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "400",
        "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0", "D2SEG.PLOT_CURVES", "False",
    ])
    main(args)
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    for k in ("backbone.bottom_up.stem.conv1.weight", "backbone.fpn_output3.weight"):
        assert torch.equal(final[k], sd5[k]), k  # frozen: as loaded
    assert final["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    k = "roi_heads.box_head.fc1.weight" if "roi_heads.box_head.fc1.weight" in final else \
        "proposal_generator.rpn_head.conv.weight"
    assert not torch.equal(final[k], sd5[k])  # trained
    log = open(tmp_path / "log.txt").read()
    assert log.count("skipped because their shape differs") == 1
    assert "Froze" in log


def test_torchvision_resnet50_into_a_deeplab_stem_and_the_fix(tmp_path, fvcore_log):
    """torchvision's 7x7 stem does not fit the DeepLab configs' 3-conv stem: said, and its
    bn1 kept off the random stem conv; with the basic stem the whole ResNet-50 loads."""
    import torchvision

    tvsd = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(tvsd, tmp_path / "r50.pth")
    n_tv = len([k for k in tvsd if not k.startswith("fc.") and "num_batches" not in k])
    deeplab = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/deeplabv3_R_50.yaml")
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]
    model = build_model(load_config(deeplab, opts))
    before = {k: v.clone() for k, v in model.state_dict().items() if ".stem." in k}
    summary = load_weights(model, str(tmp_path / "r50.pth"))
    assert any("STEM_TYPE basic MODEL.RESNETS.STEM_OUT_CHANNELS 64" in r.getMessage()
               for r in fvcore_log)
    for k, v in before.items():  # nothing of torchvision's stem landed on the deep stem
        assert torch.equal(model.state_dict()[k], v), k
    assert summary["loaded"] < n_tv
    model = build_model(load_config(deeplab, opts + ["MODEL.RESNETS.STEM_TYPE", "basic",
                                                     "MODEL.RESNETS.STEM_OUT_CHANNELS", "64"]))
    summary = load_weights(model, str(tmp_path / "r50.pth"))
    assert summary["loaded"] == n_tv and summary["skipped_shape"] == []
    assert torch.equal(model.state_dict()["backbone.stem.conv1.weight"], tvsd["conv1.weight"])


def _nvlabs_mit_state_dict(embed_dims, depths, sr_ratios, in_channels=3, mlp_ratio=4):
    """A Mix Transformer in SegFormer's official (NVlabs) key layout, as its mit_b*.pth files
    hold it (written from that layout, not from d2seg's names), with random values."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd, prev = {}, in_channels
    for s, (c, n, sr) in enumerate(zip(embed_dims, depths, sr_ratios), start=1):
        k = 7 if s == 1 else 3
        sd.update({f"patch_embed{s}.proj.weight": r(c, prev, k, k),
                   f"patch_embed{s}.proj.bias": r(c),
                   f"patch_embed{s}.norm.weight": r(c), f"patch_embed{s}.norm.bias": r(c)})
        h = c * mlp_ratio
        for j in range(n):
            b = f"block{s}.{j}."
            sd.update({b + "norm1.weight": r(c), b + "norm1.bias": r(c),
                       b + "attn.q.weight": r(c, c), b + "attn.q.bias": r(c),
                       b + "attn.kv.weight": r(2 * c, c), b + "attn.kv.bias": r(2 * c),
                       b + "attn.proj.weight": r(c, c), b + "attn.proj.bias": r(c),
                       b + "norm2.weight": r(c), b + "norm2.bias": r(c),
                       b + "mlp.fc1.weight": r(h, c), b + "mlp.fc1.bias": r(h),
                       b + "mlp.dwconv.dwconv.weight": r(h, 1, 3, 3),
                       b + "mlp.dwconv.dwconv.bias": r(h),
                       b + "mlp.fc2.weight": r(c, h), b + "mlp.fc2.bias": r(c)})
            if sr > 1:
                sd.update({b + "attn.sr.weight": r(c, c, sr, sr), b + "attn.sr.bias": r(c),
                           b + "attn.norm.weight": r(c), b + "attn.norm.bias": r(c)})
        sd.update({f"norm{s}.weight": r(c), f"norm{s}.bias": r(c)})
        prev = c
    sd.update({"head.weight": r(1000, prev), "head.bias": r(1000)})  # ImageNet classifier
    return sd


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "mmseg"])
def test_segformer_imagenet_encoder_loads_into_d2segs_mix_transformer(tmp_path, wrap):
    """SegFormer's published mit_b*.pth (NVlabs layout) fine-tunes d2seg's SegFormer: every
    encoder tensor lands on its counterpart; also inside {"state_dict"} and a whole mmseg
    SegFormer (its "backbone." encoder taken, the decode head left out)."""
    from d2seg.checkpoint import is_segformer_mit

    path = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/segformer_b0_cpu.yaml")
    dims, depths = (8, 16, 16, 32), (1, 2, 1, 1)
    cfg = load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.MIT.EMBED_DIMS", str(list(dims)),
                             "MODEL.MIT.DEPTHS", str(list(depths)), "MODEL.MIT.NUM_HEADS",
                             "[1, 2, 2, 4]", "MODEL.SEGFORMER.DECODER_DIM", "16"])
    model = build_model(cfg)
    nv = _nvlabs_mit_state_dict(dims, depths, (8, 4, 2, 1))  # MiT's reductions (every size)
    assert is_segformer_mit(nv)
    obj = nv if wrap == "plain" else {"state_dict": nv} if wrap == "state_dict" else \
        {"state_dict": {**{"backbone." + k: v for k, v in nv.items() if k[:5] != "head."},
                        "decode_head.linear_pred.weight": torch.zeros(19, 256, 1, 1)}}
    torch.save(obj, tmp_path / "mit.pth")
    summary = load_weights(model, str(tmp_path / "mit.pth"))
    assert summary["format"] == "segformer-mit" and summary["skipped_shape"] == []
    assert summary["loaded"] == len(nv) - 2  # all but the classifier
    assert summary["unexpected"] == []
    sd = model.state_dict()
    enc = {k for k in sd if k.startswith("backbone.")}
    assert not enc & set(summary["missing"])  # the whole encoder came from the file
    for d2k, nvk in {"backbone.stages.0.patch_embed.proj.weight": "patch_embed1.proj.weight",
                     "backbone.stages.1.blocks.1.mlp.dwconv.weight":
                         "block2.1.mlp.dwconv.dwconv.weight",
                     "backbone.stages.0.blocks.0.attn.sr.weight": "block1.0.attn.sr.weight",
                     "backbone.stages.3.norm.bias": "norm4.bias"}.items():
        assert torch.equal(sd[d2k], nv[nvk]), d2k


def test_segformer_encoder_into_a_model_without_one_is_an_error(tmp_path):
    torch.save(_nvlabs_mit_state_dict((8, 16, 16, 32), (1, 1, 1, 1), (8, 4, 2, 1)),
               tmp_path / "mit.pth")
    with pytest.raises(ValueError, match="mit.pth is a SegFormer Mix Transformer .* use "
                                         "MODEL.META_ARCHITECTURE SegFormer"):
        load_weights(build_model(_cfg()), str(tmp_path / "mit.pth"))


def test_a_file_of_another_architecture_sharing_a_tensor_or_two_is_an_error(tmp_path):
    """A 2-class U-Net checkpoint shares only its predictor's bias with a DeepLabV3: 'Loaded 1
    of 370 model tensors' and training from scratch, without an error."""
    unet = build_model(load_config(os.path.join(
        REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2"]))
    torch.save({"model": unet.state_dict()}, tmp_path / "unet.pth")
    deeplab = build_model(load_config(os.path.join(
        REPO, "configs/Shapes-SemanticSegmentation/deeplabv3_cpu.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2"]))
    with pytest.raises(ValueError, match=r"unet\.pth: only \d of its \d+ tensors fit the "
                                         r"model's \d+ .* another model"):
        load_weights(deeplab, str(tmp_path / "unet.pth"))


def test_a_mix_transformer_of_another_size_is_an_error(tmp_path):
    """mit_b2 (depths 3, 4, 6, 3) into MODEL.MIT.NAME b1 (same widths, depths 2, 2, 2, 2)
    loaded the first blocks of each stage and dropped the rest, with a normal-looking count."""
    path = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/segformer_b0_cpu.yaml")
    model = build_model(load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.MIT.NAME", "b1"]))
    torch.save(_nvlabs_mit_state_dict((64, 128, 320, 512), (3, 4, 6, 3), (8, 4, 2, 1)),
               tmp_path / "mit_b2.pth")
    with pytest.raises(ValueError, match=r"mit_b2.pth is a Mix Transformer with widths \[64, "
                                         r"128, 320, 512\] and depths \[3, 4, 6, 3\] \(mit_b2\); "
                                         r"the model's has .* \[2, 2, 2, 2\] \(mit_b1\)"):
        load_weights(model, str(tmp_path / "mit_b2.pth"))
