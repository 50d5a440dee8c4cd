"""D2SEG.SPEED.MATMUL_RESIZE (d2seg/modeling/layers/resize.py): bilinear resizing as matrix
products, against F.interpolate, in the models that resize and through the fast-path plan."""
import os

import pytest
import torch
import torch.nn.functional as F

import d2seg  # noqa: F401
from d2seg.engine import fast_paths
from d2seg.modeling.layers.resize import bilinear_matrix, resize_bilinear, use_matmul_resize

from test_semantic_models import SHAPES, TINY, cfg_from

SIZES = [
    (16, 16, 128, 128),  # x8 (SegFormer's stride 32 -> 4)
    (64, 64, 128, 128),  # x2
    (6, 6, 64, 64),      # PSPNet's 6x6 bin
    (7, 9, 32, 31),      # ratios that are not integers
    (33, 20, 10, 7),     # down-sampling
    (1, 1, 5, 6),
    (5, 5, 5, 5),        # identity
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("h,w,out_h,out_w", SIZES)
def test_matmul_resize_equals_interpolate(h, w, out_h, out_w, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    xi = x.to(memory_format=torch.channels_last) if channels_last else x
    ref = F.interpolate(xi, size=(out_h, out_w), mode="bilinear", align_corners=False)
    out = resize_bilinear(xi, (out_h, out_w), "matmul")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)
    if channels_last and min(h, w) > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_matrix_rows_are_two_tap_and_sum_to_one():
    m = bilinear_matrix(16, 128)
    assert m.shape == (128, 16)
    torch.testing.assert_close(m.sum(1), torch.ones(128))
    assert int((m != 0).sum(1).max()) <= 2
    assert bilinear_matrix(16, 128) is m  # cached
    torch.testing.assert_close(bilinear_matrix(9, 9), torch.eye(9))


def test_matmul_resize_under_bf16_autocast_and_deterministic():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize_bilinear(x, (64, 64), "matmul")
    assert out.dtype == torch.bfloat16
    ref = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(resize_bilinear(x, (64, 64), "matmul").square().sum(), x)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="resize impl must be one of"):
        resize_bilinear(torch.zeros(1, 1, 2, 2), (4, 4), "nearest")


def test_tracing_keeps_the_resize_an_operator():
    """An export must stay valid for other input sizes: traced, "matmul" is F.interpolate."""

    class Up(torch.nn.Module):
        resize_impl = "matmul"

        def forward(self, x):
            return resize_bilinear(x, (x.shape[-2] * 2, x.shape[-1] * 2), self.resize_impl)

    traced = torch.jit.trace(Up(), torch.randn(1, 2, 4, 4))
    x = torch.randn(1, 2, 6, 5)
    torch.testing.assert_close(traced(x), F.interpolate(x, size=(12, 10), mode="bilinear",
                                                        align_corners=False))


HRNET_TINY = ("hrnet_w18_small_cpu.yaml", ["MODEL.HRNET.WIDTH", 4, "MODEL.HRNET.STEM_CHANNELS", 8,
                                           "MODEL.HRNET.STAGE1_CHANNELS", 4,
                                           "MODEL.HRNET.NUM_MODULES", [1, 1, 1],
                                           "MODEL.HRNET.NUM_BLOCKS", [1, 1, 1, 1]])
SEGFORMER_TINY = ("segformer_b0_cpu.yaml", ["MODEL.MIT.EMBED_DIMS", [8, 16, 16, 32],
                                            "MODEL.MIT.DEPTHS", [1, 1, 1, 1],
                                            "MODEL.MIT.NUM_HEADS", [1, 2, 2, 4],
                                            "MODEL.MIT.DROP_PATH_RATE", 0.0,
                                            "MODEL.SEGFORMER.DECODER_DIM", 16])


@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus", "pspnet", "unet_bilinear",
                                  "hrnet", "segformer", "semantic_fpn"])
def test_models_give_the_same_losses_and_gradients(arch):
    """Every model that resizes features or its training logits: same losses and gradients
    with either impl (float64; train mode with batch statistics, odd sizes)."""
    from detectron2.modeling import build_model

    if arch == "segformer":
        name, opts = SEGFORMER_TINY
    elif arch == "hrnet":
        name, opts = HRNET_TINY
    else:
        name, opts = TINY[arch]
    path = os.path.join(SHAPES, name)
    torch.manual_seed(0)
    model = build_model(cfg_from(path, opts, 3)).double()
    model.train()
    batch = [{"image": torch.rand(3, 45, 61, dtype=torch.float64) * 255,
              "sem_seg": torch.randint(0, 3, (45, 61))} for _ in range(2)]
    results = []
    for on in (False, True):
        n = use_matmul_resize(model, on)
        assert n >= 1
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # dropout
        losses = model(batch)
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        {k: p.grad.clone() for k, p in model.named_parameters()
                         if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-9, atol=1e-11)
    assert g0.keys() == g1.keys()
    # the loss resizes the logits in float32: float32 rounding, relative to the largest
    # gradient (a bias before a BatchNorm has a zero gradient up to rounding noise)
    scale = max(float(g.abs().max()) for g in g0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * scale, msg=k)


def test_plan_auto_is_off_on_cpu_and_switchable(monkeypatch):
    name, opts = TINY["deeplabv3plus"]
    cfg = cfg_from(os.path.join(SHAPES, name), opts)
    assert not fast_paths.resolve(cfg).matmul_resize
    assert "matmul_resize=off" in fast_paths.describe(cfg)
    cfg.D2SEG.SPEED.MATMUL_RESIZE = "on"
    assert fast_paths.resolve(cfg).matmul_resize
    from d2seg.engine.trainer import Trainer

    model = Trainer.build_model(cfg)
    impls = {m.resize_impl for m in model.modules() if hasattr(m, "resize_impl")}
    assert impls == {"matmul"}
    monkeypatch.setattr(fast_paths, "_device", lambda c: "cuda")
    monkeypatch.setattr(fast_paths, "_tf32_capable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg.D2SEG.SPEED.MATMUL_RESIZE = "auto"
    # auto on CUDA: on for DeepLabV3+ (measured faster on an H100), off for models not measured
    assert cfg.MODEL.META_ARCHITECTURE == "DeepLabV3Plus"
    assert fast_paths.resolve(cfg).matmul_resize
    name, opts = TINY["pspnet"]
    psp = cfg_from(os.path.join(SHAPES, name), opts)
    assert not fast_paths.resolve(psp).matmul_resize
    psp.D2SEG.DETERMINISTIC = True  # the interpolate backward's atomics are not deterministic
    assert fast_paths.resolve(psp).matmul_resize
    cfg.D2SEG.SPEED.MATMUL_RESIZE = "on"
    assert fast_paths.resolve(cfg).matmul_resize
    cfg.D2SEG.SPEED.MATMUL_RESIZE = "off"
    assert not fast_paths.resolve(cfg).matmul_resize
    cfg.D2SEG.DETERMINISTIC = True  # "off" is off
    assert not fast_paths.resolve(cfg).matmul_resize
    name, opts = SEGFORMER_TINY
    cfg = cfg_from(os.path.join(SHAPES, name), opts)
    assert cfg.MODEL.META_ARCHITECTURE in fast_paths.MATMUL_RESIZE_META_ARCHS
    assert fast_paths.resolve(cfg).matmul_resize  # auto: on CUDA for SegFormer


def test_export_with_matmul_resize_stays_dynamic(tmp_path):
    """A model switched to "matmul" (as on a GPU) exports to TorchScript and ONNX that stay
    valid for other input sizes: traced, the resizes are F.interpolate."""
    from detectron2.modeling import build_model

    from d2seg.export import export_semantic

    torch.manual_seed(0)
    name, opts = TINY["deeplabv3plus"]
    model = build_model(cfg_from(os.path.join(SHAPES, name), opts, 3))
    assert use_matmul_resize(model) >= 1
    results = export_semantic(model, str(tmp_path), 64, 64, check_sizes=((64, 96), (96, 64)))
    for r in results:
        assert r["dynamic"] and r["checked_shapes"] == [[64, 96], [96, 64]]
        assert r["max_abs_diff"] < 1e-3, r
