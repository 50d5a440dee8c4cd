"""D2SEG.SPEED.FOLD_NORM (d2seg/modeling/fold_norm.py): fixed BatchNorms folded into the
convolution before them give the unfolded layer's outputs and gradients, keep the state_dict,
follow weights loaded later, leave training-mode BatchNorms alone, and are applied by the
Trainer and the predictor where the config says so."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import d2seg  # noqa: F401  (registers everything)
from d2seg.config import load_config
from d2seg.engine import Trainer, fast_paths
from d2seg.modeling.fold_norm import NormFoldedConv2d, fold_norms, folded_weight_and_bias

from detectron2.config import get_cfg as d2_get_cfg
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from conftest import REPO

RCNN = os.path.join(REPO, "configs", "Shapes-InstanceSegmentation", "mask_rcnn_R_18_FPN_cpu.yaml")
UNET = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation", "unet_cpu.yaml")


def _randomise(norm: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters (a fresh norm is the identity)."""
    with torch.no_grad():
        c = norm.running_var.numel()
        norm.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
        norm.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def _conv(norm_kind: str, bias: bool, gen: torch.Generator, **kw) -> Conv2d:
    norm = {"frozen": FrozenBatchNorm2d(8), "bn": nn.BatchNorm2d(8),
            "bn_noaffine": nn.BatchNorm2d(8, affine=False)}[norm_kind]
    _randomise(norm, gen)
    conv = Conv2d(6, 8, bias=bias, norm=norm, activation=F.relu, **kw)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        if bias:
            conv.bias.copy_(torch.randn(8, generator=gen))
    return conv


@pytest.mark.parametrize("norm_kind", ["frozen", "bn", "bn_noaffine"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1),
                                dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
                                dict(kernel_size=1)])
def test_folded_conv_equals_conv_then_norm(norm_kind, bias, kw):
    gen = torch.Generator().manual_seed(0)
    conv = _conv(norm_kind, bias, gen, **kw).eval()
    x = torch.randn(2, 6, 13, 17, generator=gen)
    ref = conv(x)
    folded = copy.deepcopy(conv)
    assert fold_norms(folded) == 1 and type(folded) is NormFoldedConv2d
    out = folded(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the helper on its own: one convolution, no norm, no activation
    w, b = folded_weight_and_bias(conv, conv.norm)
    torch.testing.assert_close(F.relu(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation,
                                               conv.groups)), ref, rtol=1e-5, atol=1e-5)


def _resnet(norm: str) -> nn.Module:
    cfg = d2_get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(0)
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            _randomise(m, gen)
    return model


def _outputs_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum((v * v).mean() for v in out.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float rounding, relative to the tensor's scale (deep nets reorder sums)."""
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= rel * b.abs().max().item(), (a - b).abs().max()


def test_frozen_resnet_trains_identically_folded():
    """A model-zoo style ResNet (FrozenBN everywhere): same outputs and parameter gradients."""
    model = _resnet("FrozenBN").train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    out0, grads0 = _outputs_and_grads(model, x)
    folded = copy.deepcopy(model)
    n = fold_norms(folded)
    assert n == sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    assert fold_norms(folded) == 0  # idempotent
    out1, grads1 = _outputs_and_grads(folded, x)
    assert grads0.keys() == grads1.keys() and len(grads0) == 20  # the conv weights
    for k in out0:
        _assert_close(out1[k], out0[k])
    for k in grads0:
        _assert_close(grads1[k], grads0[k])


def test_state_dict_unchanged_and_later_loads_are_seen():
    model = _resnet("FrozenBN").eval()
    folded = copy.deepcopy(model).requires_grad_(False)  # frozen: the fold is cached
    fold_norms(folded)
    sd0, sd1 = model.state_dict(), folded.state_dict()
    assert list(sd0) == list(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with torch.no_grad():
        folded(torch.randn(1, 3, 32, 32))
    assert "_d2seg_fold" in folded.stem.conv1.__dict__
    # load other weights into the folded model afterwards: it uses them (no stale fold)
    other = _resnet("FrozenBN").eval()
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.mul_(3.0)
            if isinstance(m, Conv2d):
                m.weight.mul_(-1.0)
    folded.load_state_dict(other.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = other(x), folded(x)
    for k in ref:
        _assert_close(out[k], ref[k])


def test_training_mode_batchnorm_runs_unfolded():
    """A trainable BatchNorm in training mode uses batch statistics: the switched layer runs
    detectron2's path bit for bit (and updates the running statistics); in eval it folds."""
    model = _resnet("BN")
    folded = copy.deepcopy(model)
    assert fold_norms(folded) == 20
    x = torch.randn(2, 3, 64, 64)
    model.train(), folded.train()
    out0, grads0 = _outputs_and_grads(model, x)
    out1, grads1 = _outputs_and_grads(folded, x)
    assert all(torch.equal(out0[k], out1[k]) for k in out0)
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    assert torch.equal(model.stem.conv1.norm.running_mean, folded.stem.conv1.norm.running_mean)
    model.eval(), folded.eval()
    with torch.no_grad():
        ref, out = model(x), folded(x)
    for k in ref:
        _assert_close(out[k], ref[k])


def test_forward_only_calls_run_unfolded_off_the_listed_devices(monkeypatch):
    """Where a device is not in FOLD_FORWARD_ONLY_DEVICES (CUDA; the CPU made to act like it
    here), calls no gradient flows through run detectron2's path bit for bit - no_grad
    evaluation and frozen layers whose input needs no gradient - while layers the backward
    goes through still fold. On the CPU (listed) every fixed norm folds."""
    from d2seg.modeling import fold_norm as fold_norm_module

    model = _resnet("FrozenBN")
    for m in (model.stem, model.res2):  # frozen as the zoo's FREEZE_AT 2; res3-5 trainable
        m.requires_grad_(False)
    folded = copy.deepcopy(model)
    fold_norms(folded)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    unfolded_calls = []
    d2_forward = Conv2d.forward

    def counting_forward(self, inp):
        if type(self) is NormFoldedConv2d:
            unfolded_calls.append(self)
        return d2_forward(self, inp)

    monkeypatch.setattr(Conv2d, "forward", counting_forward)
    frozen = {m for m in folded.modules() if type(m) is NormFoldedConv2d
              and not m.weight.requires_grad}
    assert 0 < len(frozen) < 20
    seen = {}
    for devices in (("cpu",), ()):
        monkeypatch.setattr(fold_norm_module, "FOLD_FORWARD_ONLY_DEVICES", devices)
        unfolded_calls.clear()
        with torch.no_grad():
            ref, out = model(x), folded(x)
        seen[devices, "eval"] = set(unfolded_calls)
        if devices == ():
            assert all(torch.equal(out[k], ref[k]) for k in ref)  # detectron2's kernels
        unfolded_calls.clear()
        out0, grads0 = _outputs_and_grads(model, x)
        out1, grads1 = _outputs_and_grads(folded, x)
        seen[devices, "train"] = set(unfolded_calls)
        for k in out0:
            _assert_close(out1[k], out0[k])
        for k in grads0:
            _assert_close(grads1[k], grads0[k])
    # listed (CPU): frozen layers always fold; only trainable layers too small to pay do not
    assert not seen[("cpu",), "eval"] & frozen and not seen[("cpu",), "train"] & frozen
    # unlisted (CUDA): every no_grad call, and in training the frozen layers besides those
    assert len(seen[(), "eval"]) == 20
    assert seen[(), "train"] == frozen | seen[("cpu",), "train"]
    assert len(seen[(), "train"]) < 20  # the backward still goes through folded layers


def test_other_layers_are_left_alone():
    gn = Conv2d(4, 4, 3, padding=1, norm=nn.GroupNorm(2, 4))
    plain = Conv2d(4, 4, 3, padding=1)
    no_stats = Conv2d(4, 4, 3, padding=1, norm=nn.BatchNorm2d(4, track_running_stats=False))
    seq = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))  # not a detectron2 Conv2d
    model = nn.ModuleList([gn, plain, no_stats, seq])
    assert fold_norms(model) == 0
    assert {type(m) for m in (gn, plain, no_stats)} == {Conv2d}


def test_trainer_folds_frozen_norms_where_the_config_says():
    """Trainer.build_model with a FrozenBN ResNet (the model-zoo setting): folded under
    "auto", untouched with "off"; GN configs have nothing to fold."""
    opts = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.DEVICE", "cpu"]
    assert fast_paths.resolve(load_config(RCNN, opts)).fold_norm
    model = Trainer.build_model(load_config(RCNN, opts))
    n = sum(type(m) is NormFoldedConv2d for m in model.modules())
    assert n == 20  # R18: stem + 8 blocks x 2 convs + 3 shortcuts
    off = Trainer.build_model(load_config(RCNN, opts + ["D2SEG.SPEED.FOLD_NORM", "off"]))
    assert not any(type(m) is NormFoldedConv2d for m in off.modules())
    assert "fold_norm=off" in fast_paths.describe(load_config(RCNN, opts + [
        "D2SEG.SPEED.FOLD_NORM", "off"]))
    gn = Trainer.build_model(load_config(RCNN, ["MODEL.DEVICE", "cpu"]))
    assert not any(type(m) is NormFoldedConv2d for m in gn.modules())


def test_predictor_folds_and_predicts_the_same(tmp_path):
    """SegPredictor (tools/predict.py) folds the U-Net's eval-mode BatchNorms: same logits."""
    from d2seg.inference.predictor import SegPredictor

    opts = ["MODEL.UNET.BASE_CHANNELS", "4", "MODEL.UNET.DEPTH", "2", "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TEST", "0"]
    cfg = load_config(UNET, opts)
    torch.manual_seed(0)
    model = Trainer.build_model(load_config(UNET, opts + ["D2SEG.SPEED.FOLD_NORM", "off"]))
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m, gen)
    path = str(tmp_path / "unet.pth")
    torch.save({"model": model.state_dict()}, path)
    cfg.MODEL.WEIGHTS = path
    folded = SegPredictor(cfg)
    cfg_off = cfg.clone()
    cfg_off.D2SEG.SPEED.FOLD_NORM = "off"
    plain = SegPredictor(cfg_off)
    assert sum(type(m) is NormFoldedConv2d for m in folded.model.modules()) > 0
    assert not any(type(m) is NormFoldedConv2d for m in plain.model.modules())
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    a, b = folded(image)["sem_seg"], plain(image)["sem_seg"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_cached_fold_follows_optimizer_steps(impl):
    """Evaluation between training steps sees every update (torch's fused SGD updates in
    place without bumping the version counter, so trainable layers never cache the fold):
    eval outputs match the unfolded model trained the same."""
    plain = _resnet("FrozenBN")
    folded = copy.deepcopy(plain)
    fold_norms(folded)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    outs = []
    for model in (plain, folded):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, **{impl: True})
        for step in range(3):
            model.eval()
            with torch.no_grad():
                before = model(x)["res5"].clone()  # fills (and later must refresh) the cache
            model.train()
            opt.zero_grad()
            sum((v * v).mean() for v in model(x).values()).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            after = model(x)["res5"]
        assert not torch.allclose(before, after)  # the weights did change
        outs.append(after)
    _assert_close(outs[1], outs[0], rel=1e-3)


def test_inference_mode_cache_is_reusable_with_gradients():
    """A fold cached under torch.inference_mode is an ordinary tensor: a later forward that
    records gradients through frozen layers can save it for backward."""
    model = _resnet("FrozenBN").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_norms(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)["res5"].clone()
    x.requires_grad_(True)
    out = model(x)["res5"]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    _assert_close(out.detach(), ref)


def test_small_outputs_with_gradients_run_unfolded():
    """With gradients, a layer whose output is smaller than its weight is not worth folding:
    it runs detectron2's path (bit-identical); larger outputs fold."""
    gen = torch.Generator().manual_seed(5)
    conv = _conv("frozen", False, gen, kernel_size=3, padding=1)  # weight: 8*6*9 = 432
    plain = copy.deepcopy(conv)
    fold_norms(conv)
    small = torch.randn(1, 6, 4, 4)  # output 8*4*4 = 128 < 432
    assert torch.equal(conv(small), plain(small))
    big = torch.randn(1, 6, 16, 16)  # 2048 >= 432: folded, equal up to rounding
    torch.testing.assert_close(conv(big), plain(big), rtol=1e-5, atol=1e-5)


def test_fold_norm_benchmark_script_runs(tmp_path):
    """benchmarks/fold_norm.py (the fast path's own measurement) at a toy size."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "fold_norm_bench", os.path.join(REPO, "benchmarks", "fold_norm.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fold.json"
    record = bench.main(["--device", "cpu", "--depth", "18", "--size", "48x64", "--rounds", "1",
                         "--iters", "1", "--threads", "0", "--profile", "--json", str(out)])
    assert json.loads(out.read_text())["layers_folded"] == record["layers_folded"] == 20
    assert record["max_rel_output_diff"] < 1e-4
    assert set(record["speedup"]) == {"train", "eval", "eval_frozen"}
    assert all(v > 0 for v in record["speedup"].values())
    assert set(record["ms_per_step_median"]["eval"]) == {"detectron2", "folded", "folded_frozen"}
    # the profiles name the kernels: the frozen model's convolutions carry the folded bias
    profiles = record["eval_profiles"]
    assert set(profiles) == {"detectron2", "folded", "folded_frozen"}
    assert "batch_norm" in profiles["detectron2"] and "batch_norm" not in profiles["folded_frozen"]


def test_folded_under_bf16_autocast():
    """Under autocast the folded weight and bias are cast like any conv's (bf16 here); the
    result matches detectron2's conv-then-norm in bf16 to bf16 precision, and gradients flow."""
    model = _resnet("FrozenBN").train()
    folded = copy.deepcopy(model)
    fold_norms(folded)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    outs = []
    for m in (model, folded):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)["res5"]
        assert out.dtype == torch.bfloat16
        out.float().mean().backward()
        outs.append(out.detach().float())
    _assert_close(outs[1], outs[0], rel=5e-2)
    assert all(torch.isfinite(p.grad).all() for p in folded.parameters() if p.grad is not None)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_folds_like_the_conv(padding):
    """torch's string paddings ("same" / "valid") work with the fold and its size rule."""
    gen = torch.Generator().manual_seed(7)
    conv = _conv("frozen", True, gen, kernel_size=3, padding=padding).train()
    plain = copy.deepcopy(conv)
    fold_norms(conv)
    for size in (3, 16):  # below and above the size where folding pays
        x = torch.randn(1, 6, size, size, generator=gen)
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fold_uses_the_norms_eps():
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    from d2seg.modeling.fold_norm import fold_norms

    norm = FrozenBatchNorm2d(4, eps=1e-3)
    norm.running_var.fill_(1e-3)
    conv = Conv2d(3, 4, 3, padding=1, bias=False, norm=norm).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = conv(x)
    fold_norms(conv)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
