"""CPU ROIAlign with its channels split over threads (D2SEG.SPEED.PARALLEL_ROI_ALIGN):
bit-identical to detectron2's ROIAlign (torchvision's kernels), forward and backward; its
input gradient as a sparse matrix product (D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD): the forward
unchanged, the gradient within a few float roundings (bit-identical with a fixed sampling
ratio where MKL's sparse product adds in order, as on the AMD EPYC development CPU; an Intel
AVX-512 CPU's MKL path adds in another order: ~1 ulp)."""
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


def _within_rounding(a: torch.Tensor, ref: torch.Tensor, ulps: float = 4) -> bool:
    """|a - ref| <= ulps * eps(dtype) * max|ref| everywhere: the same sums added in another
    order (or with fused multiply-adds), not different arithmetic."""
    if a.dtype != ref.dtype or a.shape != ref.shape:
        return False
    if ref.numel() == 0:
        return True
    a64, r64 = a.double(), ref.double()
    return float((a64 - r64).abs().max()) <= ulps * torch.finfo(ref.dtype).eps * float(
        r64.abs().max())


def _run(cls, x, rois, size, autocast, sampling=2, aligned=True, sparse=False):
    m = cls(size, 0.25, sampling, aligned)
    if sparse:
        m.sparse_grad = True
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True),
                                            (torch.float64, False)])
@pytest.mark.parametrize("size,sampling,aligned", [((7, 7), 2, True), ((14, 14), 1, False),
                                                   ((5, 3), 4, True)])
def test_sparse_gradient_matches_with_a_fixed_sampling_ratio(threads, dtype, autocast, size,
                                                             sampling, aligned):
    """Power-of-two sample counts: the division is exact, so what is left is the order of the
    additions inside the sparse product (measured on an Intel Xeon with AVX-512, 2026-11-29:
    float32 max 1.9e-6 on gradients up to 12.4; bit-identical on the AMD EPYC)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(3, 37, 32, 40).to(dtype)
        # regions partly or wholly outside the 160x128 px image, and tiny ones
        rois = torch.cat([_rois(3, 50), torch.tensor([[0, -30.0, -20, 10, 15],
                                                      [1, 150, 100, 400, 300],
                                                      [2, 5, 5, 5.2, 5.1]])])
        ref_out, ref_grad = _run(ROIAlign, x, rois, size, autocast, sampling, aligned)
        out, grad = _run(pra.ParallelROIAlign, x, rois, size, autocast, sampling, aligned,
                         sparse=True)
    finally:
        torch.set_num_threads(before)
    assert grad.dtype == ref_grad.dtype == dtype
    assert torch.equal(out, ref_out)
    assert ref_grad.abs().max() > 0 and _within_rounding(grad, ref_grad)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_sparse_gradient_with_the_adaptive_grid_matches_to_rounding(two_threads, aligned,
                                                                    dtype, tol):
    x = torch.randn(2, 24, 32, 40, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    big = torch.cat([torch.randint(0, 2, (20, 1), generator=g).float(),
                     torch.rand(20, 2, generator=g) * 60,
                     torch.rand(20, 2, generator=g) * 60 + 70], 1)  # grids of 3-6 per bin
    degenerate = torch.tensor([[0, 30.0, 40, 30, 40],    # empty: no sampling point
                               [1, 50.0, 60, 40, 55],    # reversed corners
                               [1, -90.0, -90, -70, -60]])  # outside the map
    rois = torch.cat([_rois(2, 40), big, degenerate]).to(dtype)
    ref_out, ref_grad = _run(ROIAlign, x, rois, (7, 7), False, 0, aligned)
    out, grad = _run(pra.ParallelROIAlign, x, rois, (7, 7), False, 0, aligned, sparse=True)
    assert torch.equal(out, ref_out)
    assert ref_grad.abs().max() > 0
    assert (grad - ref_grad).abs().max() <= tol * ref_grad.abs().max()


def test_gradient_matrix_is_roi_align():
    """The matrix applied forward reproduces torchvision's roi_align; too large -> None."""
    import torchvision

    x = torch.randn(2, 16, 20, 24, dtype=torch.float64)
    rois = _rois(2, 30, seed=3).double()
    for sampling, aligned in ((0, True), (2, False)):
        mt = pra.roi_align_grad_matrix(rois, 0.25, 7, 7, sampling, aligned, 2, 20, 24)
        assert mt.layout == torch.sparse_csr and mt.shape == (2 * 20 * 24 + 1, 30 * 7 * 7)
        dense = mt.to_dense()
        assert torch.all(dense[-1] == 0)  # the row of dropped entries holds only zeros
        y = dense[:-1].t() @ x.permute(0, 2, 3, 1).reshape(-1, 16)
        y = y.view(30, 7, 7, 16).permute(0, 3, 1, 2)
        ref = torchvision.ops.roi_align(x, rois, (7, 7), 0.25, sampling, aligned)
        assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    assert pra.roi_align_grad_matrix(rois, 0.25, 7, 7, 2, True, 2, 20, 24,
                                     max_entries=30 * 49 * 16 - 1) is None
    # the adaptive grid counts its points exactly (no padding to the largest region's grid)
    grid = ((rois[:, 3:] - rois[:, 1:3]) * 0.25 / 7).ceil()
    entries = int(grid.prod(1).sum()) * 49 * 4
    assert pra.roi_align_grad_matrix(rois, 0.25, 7, 7, 0, True, 2, 20, 24,
                                     max_entries=entries) is not None
    assert pra.roi_align_grad_matrix(rois, 0.25, 7, 7, 0, True, 2, 20, 24,
                                     max_entries=entries - 1) is None


def test_sparse_gradient_falls_back_and_handles_no_regions(two_threads, monkeypatch):
    m = pra.ParallelROIAlign((7, 7), 0.25, 2, True)
    m.sparse_grad = True
    x = torch.randn(2, 16, 20, 24, requires_grad=True)
    out = m(x, torch.zeros(0, 5))
    out.sum().backward()
    assert out.shape == (0, 16, 7, 7) and torch.equal(x.grad, torch.zeros_like(x))
    # too many entries: torchvision's backward, the same gradient
    rois = _rois(2, 20)
    ref = _run(ROIAlign, x, rois, (7, 7), False)[1]
    monkeypatch.setattr(pra, "MAX_SPARSE_ENTRIES", 10)
    assert torch.equal(_run(pra.ParallelROIAlign, x, rois, (7, 7), False, sparse=True)[1], ref)
    monkeypatch.setattr(pra, "MAX_SPARSE_ENTRIES", 10 ** 9)  # and the product: within rounding
    sparse = _run(pra.ParallelROIAlign, x, rois, (7, 7), False, sparse=True)[1]
    assert _within_rounding(sparse, ref)
    # channels_last input: the gradient comes back channels_last
    xc = x.detach().to(memory_format=torch.channels_last)
    grad = _run(pra.ParallelROIAlign, xc, rois, (7, 7), False, sparse=True)[1]
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_falls_back_where_a_split_cannot_help(two_threads, monkeypatch):
    calls = []
    real = pra._CPUROIAlign.apply
    monkeypatch.setattr(pra._CPUROIAlign, "apply",
                        lambda *a: calls.append(a[-2]) or real(*a))
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
    assert plan.sparse_roi_align_grad and "sparse_roi_align_grad=on" in fast_paths.describe(cfg)
    model = fast_paths.prepare_model(build_model(cfg), cfg, plan)
    poolers = [m for n, m in model.named_modules() if n.split(".")[-2:-1] == ["level_poolers"]]
    assert len(poolers) == 8 and all(type(m) is pra.ParallelROIAlign for m in poolers)
    assert all(m.split_channels and m.sparse_grad for m in poolers)
    off = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.PARALLEL_ROI_ALIGN", "off",
                             "D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD", "off"])
    model = fast_paths.prepare_model(build_model(off), off)
    assert not any(type(m) is pra.ParallelROIAlign for m in model.modules())
    # either alone
    sparse_only = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.PARALLEL_ROI_ALIGN",
                                     "off"])
    model = fast_paths.prepare_model(build_model(sparse_only), sparse_only)
    poolers = [m for m in model.modules() if type(m) is pra.ParallelROIAlign]
    assert len(poolers) == 8 and all(m.sparse_grad and not m.split_channels for m in poolers)


def test_auto_is_off_on_cuda(monkeypatch):
    monkeypatch.setattr(fast_paths, "_device", lambda cfg: "cuda")
    monkeypatch.setattr(fast_paths, "_tf32_capable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu"])
    assert not fast_paths.resolve(cfg).parallel_roi_align
    assert not fast_paths.resolve(cfg).sparse_roi_align_grad
    on = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD", "on"])
    assert not fast_paths.resolve(on).sparse_roi_align_grad  # CPU-only


def test_a_training_step_matches_with_and_without(two_threads):
    """The whole Mask R-CNN loss bit for bit and every gradient (one step, same seed): the
    split alone bit for bit against neither switch; both switches (the CPU config's fixed
    sampling ratio of 2) within float rounding of the sparse product's addition order."""
    from d2seg.benchmark.subjects import SyntheticBatch
    from detectron2.utils.events import EventStorage

    results = []
    for split, sparse in (("on", "on"), ("on", "off"), ("off", "off")):
        cfg = load_config(RCNN, ["MODEL.DEVICE", "cpu", "D2SEG.SPEED.PARALLEL_ROI_ALIGN", split,
                                 "D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD", sparse])
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
    (la, ga), (lb, gb), (lc, gc) = results
    for losses in (la, lb):
        assert losses.keys() == lc.keys() and all(torch.equal(losses[k], lc[k]) for k in lc)
    assert len(gb) == len(gc) > 0 and all(torch.equal(b, c) for b, c in zip(gb, gc))
    assert len(ga) == len(gc) and all(_within_rounding(a, c, ulps=64) for a, c in zip(ga, gc))


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
    assert set(d["roi_align_sparse_grad_speedup"]) == {"box_7x7", "mask_14x14"}
    assert "train step:" in r.stdout
