"""pad_to_batch gives detectron2's ImageList.from_tensors result (values, shape, sizes)."""
import pytest
import torch
from detectron2.structures import ImageList

from d2seg.modeling.batching import pad_to_batch


@pytest.mark.parametrize("shapes,div,pad", [
    ([(3, 32, 48)] * 4, 32, 0.0),           # fixed crops: stacked, nothing to pad
    ([(3, 30, 40), (3, 32, 48)], 0, 0.0),   # different sizes, no divisibility
    ([(3, 30, 40), (3, 17, 50)], 32, 0.0),  # padded up to multiples of 32
    ([(30, 40), (25, 41)], 8, 255.0),       # label maps padded with the ignore value
    ([(3, 33, 20)], 16, 0.0),               # one image
])
def test_pad_to_batch_equals_detectron2(shapes, div, pad):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(0, 200, s, generator=g).to(torch.uint8 if len(s) == 2 else torch.float32)
          for s in shapes]
    ref = ImageList.from_tensors(ts, div, pad)
    out = pad_to_batch(ts, div, pad)
    assert out.tensor.shape == ref.tensor.shape and out.tensor.dtype == ref.tensor.dtype
    assert torch.equal(out.tensor, ref.tensor) and out.tensor.is_contiguous()
    assert [tuple(int(v) for v in s) for s in ref.image_sizes] == out.image_sizes


def test_pad_to_batch_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="differ before the last two dimensions"):
        pad_to_batch([torch.zeros(3, 8, 8), torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match="no tensors"):
        pad_to_batch([])


def test_pad_to_batch_makes_no_cpu_reduction():
    """The batch size comes from Python integers: no aten::max / stack of sizes."""
    from torch.profiler import profile

    ts = [torch.zeros(3, 32, 32), torch.zeros(3, 16, 32)]
    with profile() as p:
        pad_to_batch(ts, 32)
    names = {e.key for e in p.key_averages()}
    assert "aten::max" not in names


@pytest.mark.parametrize("shapes", [
    [(3, 64, 64)] * 3,              # same size, divisible: stacked, normalised as one batch
    [(3, 64, 64), (3, 48, 64)],     # padded
    [(3, 60, 60)] * 2,              # same size, not divisible by 16: padded
])
def test_segmentor_preprocess_equals_per_image_normalise_and_pad(shapes):
    import os

    from conftest import REPO
    from detectron2.modeling import build_model

    import d2seg  # noqa: F401
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "Shapes-SemanticSegmentation",
                                     "unet_cpu.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.UNET.BASE_CHANNELS = 4
    m = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 255, s, generator=g, dtype=torch.uint8)}
              for s in shapes]
    out = m.preprocess_image(inputs)
    ref = ImageList.from_tensors([(x["image"].float() - m.pixel_mean) / m.pixel_std
                                  for x in inputs], m.size_divisibility)
    assert torch.equal(out.tensor, ref.tensor) and out.tensor.is_contiguous()
    assert out.image_sizes == [tuple(int(v) for v in s) for s in ref.image_sizes]
