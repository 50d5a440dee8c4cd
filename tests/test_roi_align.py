"""CPU ROIAlign with its channels split over threads (D2SEG.SPEED.PARALLEL_ROI_ALIGN):
bit-identical to detectron2's ROIAlign (torchvision's kernels), forward and backward."""
import os

import pytest
import torch

import d2seg  # noqa: F401
from d2seg.config import load_config
from d2seg.engine import fast_paths
from d2seg.modeling.layers import roi_align as pra
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model

from conftest import REPO

RCNN = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _rois(n_img: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, n_img, (r, 1), generator=g).float()
    xy = torch.rand(r, 2, generator=g) * 100
    wh = torch.rand(r, 2, generator=g) * 40 + 1
    return torch.cat([b, xy, xy + wh], 1)


def _run(cls, x, rois, size, autocast, sampling=2, aligned=True):
    m = cls(size, 0.25, sampling, aligned)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(x, rois)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(g)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True),
                                            (torch.bfloat16, True), (torch.float64, False)])
@pytest.mark.parametrize("size,sampling,aligned", [((7, 7), 2, True), ((14, 14), 0, False)])
def test_parallel_roi_align_is_bit_identical(two_threads, dtype, autocast, size, sampling,
                                             aligned):
    x = torch.randn(3, 37, 32, 40).to(dtype).to(memory_format=torch.channels_last)
    rois = _rois(3, 50)
    assert pra.parallel_chunks(37) == 2  # the split is exercised (37 channels: 19 + 18)
    ref_out, ref_grad = _run(ROIAlign, x, rois, size, autocast, sampling, aligned)
    out, grad = _run(pra.ParallelROIAlign, x, rois, size, autocast, sampling, aligned)
    assert out.dtype == ref_out.dtype == dtype and grad.dtype == ref_grad.dtype
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_falls_back_where_a_split_cannot_help(two_threads, monkeypatch):
    calls = []
    real = pra._ChannelSplitROIAlign.apply
    monkeypatch.setattr(pra._ChannelSplitROIAlign, "apply",
                        lambda *a: calls.append(a[-1]) or real(*a))
    rois = _rois(2, 10)
    m = pra.ParallelROIAlign((7, 7), 0.25, 2, True)
    m(torch.randn(2, 15, 16, 16), rois)  # 15 channels: one chunk of >= 8 only
    torch.set_num_threads(1)
    m(torch.randn(2, 64, 16, 16), rois)  # one intra-op thread
    torch.set_num_threads(2)
    m(torch.randn(2, 64, 16, 16).half(), rois)  # fp16 outside autocast: torchvision's own path
    assert calls == []
    m(torch.randn(2, 64, 16, 16), rois)
    assert calls == [2]
    assert pra.parallel_chunks(64, threads=8) == 8 and pra.parallel_chunks(20, threads=8) == 2


def test_fast_path_switches_the_poolers_on_cpu_only():
    cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu"])
    plan = fast_paths.resolve(cfg)
    assert plan.parallel_roi_align and "parallel_roi_align=on" in fast_paths.describe(cfg)
    model = fast_paths.prepare_model(build_model(cfg), cfg, plan)
    poolers = [m for n, m in model.named_modules() if n.split(".")[-2:-1] == ["level_poolers"]]
    assert len(poolers) == 8 and all(type(m) is pra.ParallelROIAlign for m in poolers)
    off = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.PARALLEL_ROI_ALIGN", "off"])
    model = fast_paths.prepare_model(build_model(off), off)
    assert not any(type(m) is pra.ParallelROIAlign for m in model.modules())


def test_auto_is_off_on_cuda(monkeypatch):
    monkeypatch.setattr(fast_paths, "_device", lambda cfg: "cuda")
    monkeypatch.setattr(fast_paths, "_tf32_capable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu"])
    assert not fast_paths.resolve(cfg).parallel_roi_align


def test_a_training_step_matches_with_and_without(two_threads):
    """The whole Mask R-CNN loss and every gradient, bit for bit (one step, same seed)."""
    from d2seg.benchmark.subjects import SyntheticBatch
    from detectron2.utils.events import EventStorage

    results = []
    for value in ("on", "off"):
        cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.PARALLEL_ROI_ALIGN", value])
        torch.manual_seed(0)
        model = fast_paths.prepare_model(build_model(cfg), cfg)
        model.train()
        batch = SyntheticBatch("instance", 2, 64, 64, torch.device("cpu"), seed=3)
        torch.manual_seed(1)
        with EventStorage(0):
            losses = model(batch.d2_inputs(train=True))
        sum(losses.values()).backward()
        results.append(({k: v.detach() for k, v in losses.items()},
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = results
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert len(ga) == len(gb) > 0 and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_benchmark_script_writes_its_json(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "benchmarks/roi_align_cpu.py", "--batch", "2", "--size",
                        "64", "--rounds", "1", "--iters", "1", "--warmup", "1", "--precision",
                        "fp32", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["train_step_speedup"] > 0 and set(d["roi_align_speedup"]) == {"box_7x7",
                                                                          "mask_14x14"}
    assert "train step:" in r.stdout
