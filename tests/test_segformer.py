"""SegFormer: the Mix Transformer backbone and the all-MLP head (d2seg/modeling/backbone/mit.py,
heads/segformer_head.py, meta_arch/segformer.py): published parameter counts, strides and odd
input sizes, building without a config, gradients, train + eval through train_net, predict and
export."""
import functools
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
from d2seg.modeling.backbone import MixVisionTransformer
from d2seg.modeling.backbone.mit import MIT_PRESETS, mit_settings
from d2seg.modeling.heads import SegFormerHead
from d2seg.modeling.meta_arch import SegFormer

from conftest import REPO
from test_semantic_models import TRAIN_TINY, check_metrics, cfg_from, n_params, run_train_net

SHAPES = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation")
ISBI = os.path.join(REPO, "configs", "ISBI-SemanticSegmentation")
B0_CPU = os.path.join(SHAPES, "segformer_b0_cpu.yaml")
# A tiny MiT for fast tests: 4 stages of one block, widths 8..32.
TINY = ["MODEL.MIT.EMBED_DIMS", "[8, 16, 16, 32]", "MODEL.MIT.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.MIT.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.SEGFORMER.DECODER_DIM", "16"]
TINY_KW = dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


# Paper, Table 1 (ADE20K, 150 classes), in millions: (encoder, decoder, total).
PUBLISHED = {"b0": (3.4, 0.4, 3.8), "b1": (13.1, 0.6, 13.7), "b2": (24.2, 3.3, 27.5)}
DECODER_DIM = {"b0": 256, "b1": 256, "b2": 768}


@functools.lru_cache(maxsize=None)
def counts_150(name):
    """(encoder, decoder) parameters of the preset with the published decoder, 150 classes."""
    enc = MixVisionTransformer(**mit_settings(name))
    head = SegFormerHead(enc.output_shape(), num_classes=150, decoder_dim=DECODER_DIM[name])
    return n_params(enc), n_params(head)


def decoder_params(channels, dim, k):
    """Projections (weight + bias), fusing conv (no bias) + BN, classifier."""
    return sum(c * dim + dim for c in channels) + len(channels) * dim * dim + 2 * dim + dim * k + k


@pytest.mark.parametrize("name", ["b0", "b1", "b2"])
def test_parameter_counts_match_the_paper(name):
    e, d = counts_150(name)
    pub_e, pub_d, pub_t = PUBLISHED[name]
    # Total and decoder are the published values rounded to 0.1M.
    assert round((e + d) / 1e6, 1) == pub_t, (e, d)
    assert round(d / 1e6, 1) == pub_d, d
    # The published encoder sizes are (rounded total) - (rounded decoder): b0 3.8 - 0.4 = 3.4
    # for an exact 3.32M, b1 13.7 - 0.6 = 13.1 for 13.15M. So they carry up to two rounding
    # errors of 0.05M each: within 0.1M.
    assert abs(e / 1e6 - pub_e) <= 0.1, e


def test_exact_counts_and_presets():
    """Exact totals (150 classes) so that an architecture change shows up."""
    counts = {name: counts_150(name) for name in ("b0", "b1", "b2")}
    assert counts == {"b0": (3_319_392, 433_302), "b1": (13_151_424, 564_374),
                      "b2": (24_196_288, 3_265_686)}
    assert counts["b0"][1] == decoder_params([32, 64, 160, 256], 256, 150)
    assert counts["b2"][1] == decoder_params([64, 128, 320, 512], 768, 150)
    assert set(MIT_PRESETS) == {"b0", "b1", "b2", "b3", "b4", "b5"}
    assert MIT_PRESETS["b5"]["depths"] == (3, 6, 40, 3)
    assert mit_settings("B2", depths=[1, 1, 1, 1], embed_dims=[])["depths"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="MODEL.MIT.NAME.*'b9'"):
        mit_settings("b9")


def test_config_builds_the_published_b0_and_b2():
    for path, name, dim in ((os.path.join(SHAPES, "segformer_b0.yaml"), "b0", 256),
                            (os.path.join(SHAPES, "segformer_b2.yaml"), "b2", 768),
                            (os.path.join(ISBI, "segformer_b0_cpu.yaml"), "b0", 256),
                            (os.path.join(ISBI, "segformer_b2.yaml"), "b2", 768)):
        cfg = cfg_from(path)
        assert cfg.MODEL.MIT.NAME == name and cfg.SOLVER.OPTIMIZER == "ADAMW"
        model = build_model(cfg)
        assert isinstance(model, SegFormer) and isinstance(model.backbone, MixVisionTransformer)
        assert model.sem_seg_head.linear[0].out_channels == dim
        assert model.size_divisibility == 32
        k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        channels = list(MIT_PRESETS[name]["embed_dims"])
        assert n_params(model) == counts_150(name)[0] + decoder_params(channels, dim, k)


@pytest.mark.parametrize("size", [(37, 61), (100, 129), (64, 96), (5, 3)])
def test_backbone_strides_and_odd_sizes(size):
    torch.manual_seed(0)
    enc = MixVisionTransformer(**TINY_KW).eval()
    shapes = enc.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res4": 16,
                                                        "res5": 32}
    assert {k: v.channels for k, v in shapes.items()} == {"res2": 8, "res3": 16, "res4": 16,
                                                          "res5": 32}
    with torch.no_grad():
        out = enc(torch.randn(2, 3, *size))
    h, w = size
    for name in ("res2", "res3", "res4", "res5"):
        # stride-4 patch embedding (k 7, pad 3), then stride 2 (k 3, pad 1): ceil divisions
        s = 4 if name == "res2" else 2
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
        assert out[name].shape == (2, shapes[name].channels, h, w), name
        assert torch.isfinite(out[name]).all()
    if size[0] % 32 == 0 and size[1] % 32 == 0:
        for name, s in shapes.items():
            assert out[name].shape[-2:] == (size[0] // s.stride, size[1] // s.stride)


def test_out_features_subset_builds_only_needed_stages():
    enc = MixVisionTransformer(**TINY_KW, out_features=["res2", "res4"])
    assert list(enc.output_shape()) == ["res2", "res4"] and len(enc.stages) == 3
    out = enc(torch.randn(1, 3, 64, 64))
    assert set(out) == {"res2", "res4"} and out["res4"].shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="MODEL.MIT.OUT_FEATURES"):
        MixVisionTransformer(out_features=["res6"])
    with pytest.raises(ValueError, match="MODEL.MIT.EMBED_DIMS"):
        MixVisionTransformer(embed_dims=(8, 16, 32))
    with pytest.raises(ValueError, match="not divisible by its number of heads"):
        MixVisionTransformer(embed_dims=(8, 16, 30, 32), num_heads=(1, 2, 4, 4))
    head_shapes = {"res2": ShapeSpec(channels=8, stride=4)}
    with pytest.raises(ValueError, match="MODEL.SEGFORMER.IN_FEATURES.*res3"):
        SegFormerHead(head_shapes, num_classes=2, in_features=["res2", "res3"])


def test_init_and_layer_norms():
    enc = MixVisionTransformer(**mit_settings("b0"), drop_path_rate=0.1)
    lns = [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in lns)
    assert all(isinstance(s.norm, torch.nn.LayerNorm) for s in enc.stages)  # per stage output
    lin = enc.stages[0].blocks[0].attn.q.weight
    assert 0.015 < lin.std() < 0.025 and torch.all(enc.stages[0].blocks[0].attn.q.bias == 0)
    sr = enc.stages[0].blocks[0].attn.sr  # fan-out normal: std sqrt(2 / (8 * 8 * 32))
    assert abs(sr.weight.std().item() - (2 / (8 * 8 * 32)) ** 0.5) < 0.005
    dps = [b.drop_path.p for s in enc.stages for b in s.blocks]
    assert dps[0] == 0.0 and abs(dps[-1] - 0.1) < 1e-9 and dps == sorted(dps)
    assert not any("pos" in n for n, _ in enc.named_parameters())  # no positional embedding


def test_head_without_config_and_logits_stride():
    torch.manual_seed(0)
    enc = MixVisionTransformer(**TINY_KW)
    head = SegFormerHead(enc.output_shape(), num_classes=3, decoder_dim=16)
    assert head.common_stride == 4 and head.in_features == ["res2", "res3", "res4", "res5"]
    feats = enc(torch.randn(2, 3, 64, 96))
    head.eval()
    logits, losses = head(feats)
    assert logits.shape == (2, 3, 64, 96) and losses == {}
    assert head.layers(feats).shape == (2, 3, 16, 24)
    head.train()
    _, losses = head(feats, torch.randint(0, 3, (2, 64, 96)))
    assert set(losses) == {"loss_sem_seg_ce"}
    model = SegFormer(backbone=enc, sem_seg_head=head, pixel_mean=[0.0] * 3,
                      pixel_std=[1.0] * 3).eval()
    assert model.size_divisibility == 32
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 37, 61) * 255},
                     {"image": torch.rand(3, 100, 129) * 255, "height": 50, "width": 60}])
    assert out[0]["sem_seg"].shape == (3, 37, 61) and out[1]["sem_seg"].shape == (3, 50, 60)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_backward_odd_sizes_every_parameter_gets_a_gradient(num_classes):
    torch.manual_seed(0)
    # no drop path / dropout: a dropped branch would leave its parameters without gradient
    cfg = cfg_from(B0_CPU, TINY + ["MODEL.MIT.DROP_PATH_RATE", "0.0",
                                   "MODEL.SEGFORMER.DROPOUT", "0.0"], num_classes)
    model = build_model(cfg).train()
    batch = []
    for h, w in [(37, 61), (100, 129)]:
        t = torch.randint(0, max(num_classes, 2), (h, w))
        t[:2] = 255
        batch.append({"image": torch.rand(3, h, w) * 255, "sem_seg": t})
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg_ce", "loss_sem_seg_dice"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 37, 61) * 255},
                     {"image": torch.rand(3, 33, 35) * 255, "height": 66, "width": 70}])
    k = 2 if num_classes == 1 else num_classes
    assert out[0]["sem_seg"].shape == (k, 37, 61) and out[1]["sem_seg"].shape == (k, 66, 70)
    with torch.no_grad():  # eval is deterministic (no drop path / dropout)
        a = model([{"image": batch[0]["image"]}])[0]["sem_seg"]
        b = model([{"image": batch[0]["image"]}])[0]["sem_seg"]
    assert torch.equal(a, b)


def test_segformer_learns_a_toy_task():
    """The tiny SegFormer separates a bright square from the background."""
    torch.manual_seed(0)
    model = build_model(cfg_from(B0_CPU, TINY + ["MODEL.MIT.DROP_PATH_RATE", "0.0"], 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = []
    for i in range(4):
        img = torch.rand(3, 32, 32) * 60
        t = torch.zeros(32, 32, dtype=torch.long)
        r, c = 4 + 4 * i, 16 - 4 * i
        img[:, r:r + 12, c:c + 12] += 150
        t[r:r + 12, c:c + 12] = 1
        batch.append({"image": img, "sem_seg": t})
    model.train()
    first = None
    for _ in range(30):
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
        assert iou(p["sem_seg"].argmax(0) == 1, b["sem_seg"] == 1) > 0.7


def test_train_and_eval_through_train_net(tmp_path):
    res = run_train_net(B0_CPU, tmp_path, *TRAIN_TINY, *TINY)
    check_metrics(res, ["water", "sand", "circle", "triangle", "rectangle"])
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "shapes_sem_seg_val" / "sem_seg_metrics.json").is_file()
    # the checkpoint reloads for evaluation with post-processing
    res = run_train_net(B0_CPU, tmp_path / "eval", *TRAIN_TINY, *TINY, "MODEL.WEIGHTS",
                        str(tmp_path / "model_final.pth"), "MODEL.SEM_SEG_POSTPROCESS.ENABLED",
                        "True", "MODEL.SEM_SEG_POSTPROCESS.MIN_AREA", "20",
                        flags=["--eval-only"])
    check_metrics(res, ["water", "sand", "circle", "triangle", "rectangle"])


def test_predict_tool(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import predict as predict_tool

    img = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (70, 90, 3), dtype=np.uint8)
                    ).save(img)
    out = tmp_path / "out"
    written = predict_tool.main(["--config-file", B0_CPU, "--input", str(img), "--output",
                                 str(out), "--sliding-window", "64", "64", "--flip",
                                 "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "0", *TINY])
    assert set(written) == {"sem_seg"}
    lab = np.asarray(Image.open(out / "sem_seg" / "a.png"))
    assert lab.shape == (70, 90) and lab.max() < 5


def test_export_torchscript_and_onnx_dynamic_size(tmp_path):
    pytest.importorskip("onnxruntime")
    from d2seg.export import export_semantic

    torch.manual_seed(0)
    model = build_model(load_config(B0_CPU, ["MODEL.DEVICE", "cpu", *TINY]))
    results = export_semantic(model, str(tmp_path), 64, 64, check_sizes=((64, 96), (70, 45)))
    assert [r["format"] for r in results] == ["torchscript", "onnx"]
    for r in results:
        assert r["error"] == "" and r["dynamic"] and os.path.isfile(r["path"]), r
        assert r["checked_shapes"] == [[64, 96], [70, 45]]
        assert r["max_abs_diff"] < 1e-3, r


def test_drop_path_drops_whole_samples_in_training_only():
    """The blocks' stochastic depth (torchvision's StochasticDepth, "row"): whole samples of
    the residual branch zeroed with probability p and the rest scaled by 1 / (1 - p) in
    training; identity in eval."""
    from d2seg.modeling.backbone.mit import MiTBlock

    block = MiTBlock(8, 1, 1.0, 2, drop_path=0.3)
    torch.manual_seed(0)
    x = torch.ones(1000, 4, 3)
    block.drop_path.train()
    y = block.drop_path(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.7).all(1))
    assert 0.2 < (per_sample[:, 0] == 0).float().mean() < 0.4
    assert torch.equal(block.drop_path.eval()(x), x)


@pytest.mark.parametrize("norm", ["BN", ""])
def test_folded_decoder_equals_the_published_concatenation(norm):
    """SegFormerHead.layers folds the fusing conv into the projections; the published
    concatenate-then-fuse form gives the same logits, in training (batch statistics) too."""
    torch.manual_seed(0)
    enc = MixVisionTransformer(**TINY_KW)
    head = SegFormerHead(enc.output_shape(), num_classes=3, decoder_dim=12, norm=norm,
                         dropout=0.0)
    for p in head.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    feats = {k: v.detach() for k, v in enc(torch.randn(2, 3, 61, 45)).items()}
    for mode in (True, False):
        head.train(mode)
        a, b = head.layers(feats), head.layers_reference(feats)
        assert a.shape == b.shape == (2, 3, 16, 12)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_isbi_config_trains_and_reports_membrane(tmp_path, shared_data, isbi_registered):
    res = run_train_net(os.path.join(ISBI, "segformer_b0_cpu.yaml"), tmp_path, *TINY,
                        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
                        "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1")
    check_metrics(res, ["cell", "membrane"])
