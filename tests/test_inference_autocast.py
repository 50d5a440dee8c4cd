"""Mixed-precision inference (D2SEG.SPEED.INFERENCE_AMP, d2seg/inference/autocast.py)."""
import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import d2seg  # noqa: F401  (registers everything)
from d2seg.config import load_config
from d2seg.engine import Trainer, fast_paths
from d2seg.inference import SegPredictor, inference_autocast_dtype, use_inference_autocast
from d2seg.inference.autocast import InferenceAutocast, outputs_to_fp32

from conftest import REPO

SHAPES_SEM = os.path.join(REPO, "configs", "Shapes-SemanticSegmentation")
UNET = os.path.join(SHAPES_SEM, "unet_cpu.yaml")
SFPN = os.path.join(SHAPES_SEM, "semantic_fpn_R_50.yaml")
RCNN = os.path.join(REPO, "configs", "Shapes-InstanceSegmentation", "mask_rcnn_R_18_FPN_cpu.yaml")
PANOPTIC = os.path.join(REPO, "configs", "Shapes-PanopticSegmentation",
                        "panoptic_fpn_R_18_cpu.yaml")
TINY_UNET = ["MODEL.UNET.BASE_CHANNELS", "4", "MODEL.UNET.DEPTH", "3", "MODEL.DEVICE", "cpu"]
BF16_TRAINING = ["SOLVER.AMP.ENABLED", "True", "D2SEG.SPEED.AMP_DTYPE", "bfloat16"]


def _cfg(path, *opts):
    return load_config(path, ["MODEL.DEVICE", "cpu", *opts])


class _AutocastProbe:
    """Forward hook recording whether CPU autocast was on when a module ran."""

    def __init__(self, module: nn.Module):
        self.seen = []
        module.register_forward_hook(
            lambda m, i, o: self.seen.append(torch.is_autocast_enabled("cpu")))


# ----------------------------------------------------------------------------------------
# what "auto" / "on" / "off" resolve to
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,expected", [
    ([], None),  # the test suite pins fp32 training on CPU (conftest): fp32 inference
    (BF16_TRAINING, torch.bfloat16),  # auto: the precision the model trains in
    (BF16_TRAINING + ["D2SEG.SPEED.INFERENCE_AMP", "off"], None),
    (["D2SEG.SPEED.INFERENCE_AMP", "on"], torch.bfloat16),  # on without training AMP: bf16
    (["SOLVER.AMP.ENABLED", "True", "D2SEG.SPEED.INFERENCE_AMP", "on"], torch.bfloat16),
])
def test_semantic_resolution_on_cpu(opts, expected):
    assert fast_paths.resolve(_cfg(UNET, *opts)).inference_amp_dtype is expected


@pytest.mark.parametrize("path", [RCNN, PANOPTIC])
def test_rcnn_and_panoptic_evaluate_in_fp32_unless_asked(path):
    plan = fast_paths.resolve(_cfg(path, *BF16_TRAINING))
    assert plan.amp_dtype is torch.bfloat16 and plan.inference_amp_dtype is None
    plan = fast_paths.resolve(_cfg(path, "D2SEG.SPEED.INFERENCE_AMP", "on"))
    assert plan.inference_amp_dtype is torch.bfloat16


def test_mask_rcnn_under_inference_autocast_returns_fp32_instances():
    torch.manual_seed(0)
    cfg = _cfg(RCNN, "D2SEG.SPEED.INFERENCE_AMP", "on", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
               "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "50")
    model = Trainer.build_model(cfg).eval()
    assert inference_autocast_dtype(model) is torch.bfloat16
    with torch.no_grad():
        inst = model(_inputs(1, 128))[0]["instances"]
    assert len(inst) > 0
    assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.pred_masks.dtype == torch.bool


def test_cuda_follows_the_training_dtype(monkeypatch):
    monkeypatch.setattr(fast_paths, "_device", lambda cfg: "cuda")
    monkeypatch.setattr(fast_paths, "_tf32_capable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    sem = _cfg(UNET, "SOLVER.AMP.ENABLED", "True")
    assert fast_paths.resolve(sem).inference_amp_dtype is torch.float16
    sem.SOLVER.AMP.ENABLED = False
    assert fast_paths.resolve(sem).inference_amp_dtype is None
    sem.D2SEG.SPEED.INFERENCE_AMP = "on"
    assert fast_paths.resolve(sem).inference_amp_dtype is torch.float16


def test_invalid_value_names_key_and_value():
    cfg = _cfg(UNET)
    cfg.D2SEG.SPEED.INFERENCE_AMP = "half"
    with pytest.raises(ValueError, match=r"D2SEG.SPEED.INFERENCE_AMP.*'half'"):
        fast_paths.resolve(cfg)


def test_plan_reports_the_inference_dtype():
    cfg = _cfg(UNET, *BF16_TRAINING)
    assert fast_paths.resolve(cfg).as_dict()["inference_amp_dtype"] == "bfloat16"
    assert "inference_amp=bfloat16" in fast_paths.describe(cfg)
    assert "inference_amp=off" in fast_paths.describe(_cfg(UNET))


# ----------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------
def _built(*opts, path=UNET):
    torch.manual_seed(0)
    model = Trainer.build_model(_cfg(path, *TINY_UNET if path == UNET else (), *opts))
    return model.eval()


def _inputs(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g).float()}
            for _ in range(n)]


def test_trainer_model_evaluates_in_bf16_and_returns_fp32_logits():
    model = _built(*BF16_TRAINING)
    assert inference_autocast_dtype(model) is torch.bfloat16
    probe = _AutocastProbe(model.backbone)
    with torch.no_grad():
        out = model(_inputs())
    assert probe.seen == [True]
    assert all(o["sem_seg"].dtype == torch.float32 for o in out)

    fp32 = copy.deepcopy(model)
    use_inference_autocast(fp32, None)
    assert inference_autocast_dtype(fp32) is None and "forward" not in fp32.__dict__
    with torch.no_grad():
        ref = fp32(_inputs())
    assert probe.seen == [True, False]  # the copy's hook (shared list): no autocast there
    for a, b in zip(out, ref):
        assert not torch.equal(a["sem_seg"], b["sem_seg"])  # it did run in bf16
        agree = (a["sem_seg"].argmax(0) == b["sem_seg"].argmax(0)).float().mean()
        assert agree > 0.97
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=0.15, rtol=0.05)


def test_training_calls_do_not_autocast_and_checkpoints_are_unchanged():
    model = _built()
    keys = list(model.state_dict())
    use_inference_autocast(model, torch.bfloat16)
    assert list(model.state_dict()) == keys
    probe = _AutocastProbe(model.backbone)
    model.train()
    batch = [dict(x, sem_seg=torch.randint(0, 2, (64, 64))) for x in _inputs()]
    losses = model(batch)
    assert probe.seen == [False] and all(v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()


def test_wrapping_twice_replaces_the_dtype_and_fp16_on_cpu_runs_fp32():
    model = _built()
    use_inference_autocast(model, torch.bfloat16)
    use_inference_autocast(model, torch.float16)
    assert isinstance(model.forward, InferenceAutocast)
    assert not isinstance(model.forward.eager, InferenceAutocast)  # never nested
    probe = _AutocastProbe(model.backbone)
    with torch.no_grad():
        model(_inputs(1))
    assert probe.seen == [False]  # CPU autocast has no usable fp16: the plain forward
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        InferenceAutocast(model, torch.float32)


def test_copies_and_pickles_keep_autocasting_their_own_model():
    """deepcopy (EMA / SWA copies) and torch.save / torch.load of the whole module rebind the
    wrapper to the copy, which autocasts and never recurses into the wrapper."""
    import io

    model = _built()
    use_inference_autocast(model, torch.bfloat16)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert other is not model and other.forward.module is other
        assert other.forward.eager.__self__ is other
        assert inference_autocast_dtype(other) == torch.bfloat16
        probe = _AutocastProbe(other.backbone)
        with torch.no_grad():
            out = other(_inputs(1))
        assert probe.seen == [True] and out[0]["sem_seg"].dtype == torch.float32


def test_tracing_sees_the_fp32_forward():
    conv = nn.Conv2d(3, 4, 3).eval()
    use_inference_autocast(conv, torch.bfloat16)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert conv(x).dtype == torch.float32
        traced = torch.jit.trace(conv, x, check_trace=False)  # the eager call is bf16
        torch.testing.assert_close(traced(x), nn.Conv2d.forward(conv, x))


def test_outputs_to_fp32_keeps_structure():
    bf = torch.ones(2, dtype=torch.bfloat16)
    out = outputs_to_fp32([{"a": bf, "b": (bf, torch.ones(1, dtype=torch.long))}, "text"])
    assert out[0]["a"].dtype == torch.float32 and out[0]["b"][0].dtype == torch.float32
    assert out[0]["b"][1].dtype == torch.long and out[1] == "text"


def test_semantic_fpn_upsamples_fp32_logits_under_autocast():
    """detectron2's SemanticSegmentor with d2seg's head: the head's eval logits are fp32
    before detectron2 upsamples them."""
    model = _built(*BF16_TRAINING, "MODEL.RESNETS.DEPTH", "18",
                   "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", path=SFPN)
    seen = []
    model.sem_seg_head.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    with torch.no_grad():
        out = model(_inputs(1))
    assert seen == [torch.float32] and out[0]["sem_seg"].dtype == torch.float32
    # detectron2's SemanticSegmentor returns (K, H, W)-contiguous maps; on CPU the prepared
    # model hands them over classes-innermost (fast argmax(0) in the evaluators)
    assert out[0]["sem_seg"].stride()[0] == 1


def test_pixel_major_outputs_hook_only_touches_eval_sem_seg():
    from d2seg.modeling.postprocessing import use_pixel_major_outputs

    class Toy(nn.Module):
        def forward(self, x):
            return [{"sem_seg": torch.randn(3, 5, 7), "other": torch.randn(3, 5, 7)}]

    toy = use_pixel_major_outputs(use_pixel_major_outputs(Toy()))
    assert len(toy._forward_hooks) == 1  # registered once
    out = toy.eval()(None)[0]
    assert out["sem_seg"].stride() == (1, 21, 3) and out["other"].is_contiguous()
    assert toy.train()(None)[0]["sem_seg"].is_contiguous()


def test_predictor_prepares_the_model_as_evaluation_does(tmp_path):
    cfg = _cfg(UNET, *TINY_UNET, *BF16_TRAINING, "INPUT.MIN_SIZE_TEST", "0")
    cfg.freeze()
    pred = SegPredictor(cfg)
    assert inference_autocast_dtype(pred.model) is torch.bfloat16
    # the model evaluation runs: the plan's channels_last (CPU, semantic), no torch.compile
    assert fast_paths.resolve(cfg).channels_last
    assert getattr(pred.model.backbone, "_d2seg_channels_last", False)
    assert not fast_paths.compiled_modules(pred.model)
    out = pred(np.zeros((40, 48, 3), dtype=np.uint8))
    assert out["sem_seg"].dtype == torch.float32 and out["sem_seg"].shape[-2:] == (40, 48)


def test_inference_amp_benchmark_compares_both_precisions(tmp_path):
    """benchmarks/inference_amp.py on a (random) tiny U-Net over 2 shapes validation images."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import inference_amp

    opts = [*TINY_UNET, "D2SEG.SHAPES.NUM_TRAIN", "2", "D2SEG.SHAPES.NUM_VAL", "2",
            "D2SEG.SHAPES.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "TEST.NUM_VIS", "0"]
    cfg = _cfg(UNET, *opts)
    with open(tmp_path / "config.yaml", "w") as f:
        f.write(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": Trainer.build_model(cfg).state_dict()}, tmp_path / "model_final.pth")
    rc = inference_amp.main(["--runs", str(tmp_path), "--device", "cpu", "--rounds", "2",
                             "--json", str(tmp_path / "r.json")])
    assert rc == 0
    import json

    r = json.load(open(tmp_path / "r.json"))["results"][0]
    assert r["images"] == 2 and r["family"] == "semantic"
    off, on = r["precisions"]["off"], r["precisions"]["on"]
    assert (off["autocast_dtype"], on["autocast_dtype"]) == ("float32", "bfloat16")
    assert len(off["s_per_image_rounds"]) == 2 and r["speedup"] > 0
    assert 0 <= r["pixels_differing"] < 0.5
    for p in (off, on):
        assert "mIoU" in p["metrics"]["sem_seg"] and "mDice" in p["metrics"]["sem_seg_metrics"]
