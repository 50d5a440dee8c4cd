"""Post-processing on hand-made masks, the config-built post-processor, the threshold search."""
import functools
import os

import numpy as np
import pytest
import torch

from d2seg.modeling.postprocessing import (
    SemSegPostProcessor,
    foreground_probability,
    keep_largest_component,
    morphological_close,
    morphological_open,
    postprocess_mask,
    remove_small_regions,
    search_threshold,
)


def blobs():
    m = np.zeros((20, 20), bool)
    m[1:4, 1:4] = True      # 9 px
    m[8:18, 8:18] = True    # 100 px
    m[1, 15] = True         # 1 px speck
    return m


def test_remove_small_regions_and_keep_largest():
    m = blobs()
    out = remove_small_regions(m, 10)
    assert out.sum() == 100 and out[8:18, 8:18].all()
    assert remove_small_regions(m, 9).sum() == 109
    assert remove_small_regions(m, 0).sum() == 110
    assert keep_largest_component(m).sum() == 100
    empty = np.zeros((5, 5), bool)
    assert not keep_largest_component(empty).any() and not remove_small_regions(empty, 3).any()
    # 8-connectivity: diagonal neighbours are one component
    d = np.eye(4, dtype=bool)
    assert remove_small_regions(d, 4).sum() == 4


def test_open_and_close():
    m = blobs()
    opened = morphological_open(m, 3)
    assert not opened[1, 15]                     # speck removed
    assert opened[9:17, 9:17].all()              # big square's inside kept
    assert not (opened & ~m).any()               # opening never adds pixels
    holed = np.zeros((12, 12), bool)
    holed[2:10, 2:10] = True
    holed[5, 5] = False
    closed = morphological_close(holed, 3)
    assert closed[5, 5] and not (holed & ~closed).any()
    # the image border has no effect: a square in the corner keeps its border pixels (the
    # 3x3 elliptic kernel is a cross, so only its free corner (4, 4) goes)
    border = np.zeros((10, 10), bool)
    border[:5, :5] = True
    expected = border.copy()
    expected[4, 4] = False
    np.testing.assert_array_equal(morphological_open(border, 3), expected)
    with pytest.raises(ValueError, match="odd"):
        morphological_open(m, 4)


def test_postprocess_mask_order():
    m = blobs()
    assert postprocess_mask(m, min_area=10, keep_largest=True).sum() == 100
    assert postprocess_mask(m).sum() == m.sum()


def test_post_processor_binary_threshold():
    p = torch.tensor([[0.1, 0.55], [0.65, 0.9]])
    z = torch.log(p / (1 - p)).unsqueeze(0)  # one-channel logits
    two = torch.cat([torch.zeros_like(z), z])  # [0, z]: softmax class 1 = p
    np.testing.assert_allclose(foreground_probability(z).numpy(), p.numpy(), rtol=1e-5)
    np.testing.assert_allclose(foreground_probability(two).numpy(), p.numpy(), rtol=1e-5)
    assert SemSegPostProcessor(num_classes=1, threshold=0.5)(z).tolist() == [[0, 1], [1, 1]]
    assert SemSegPostProcessor(num_classes=2, threshold=0.6)(two).tolist() == [[0, 0], [1, 1]]
    assert SemSegPostProcessor(num_classes=2, threshold=0.7)(two).tolist() == [[0, 0], [0, 1]]


def test_post_processor_binary_mask_ops():
    m = blobs()
    logits = torch.from_numpy(np.where(m, 5.0, -5.0)).float().unsqueeze(0)
    pp = SemSegPostProcessor(num_classes=1, min_area=10)
    assert pp(logits).sum().item() == 100
    # ops on class 0 (the background) instead: its small holes get filled
    holed = np.ones((12, 12), bool)
    holed[5, 5] = False  # a 1-px "background" island inside the foreground
    lg = torch.from_numpy(np.where(holed, 5.0, -5.0)).float().unsqueeze(0)
    assert SemSegPostProcessor(num_classes=2, min_area=2, classes=[0])(
        torch.cat([torch.zeros_like(lg), lg])).min().item() == 1


def test_post_processor_multiclass():
    label = np.zeros((20, 20), int)
    label[8:18, 8:18] = 2
    label[1:3, 1:3] = 2          # small class-2 region -> background
    label[1:4, 10:14] = 1        # class 1, 12 px, kept
    logits = torch.nn.functional.one_hot(torch.from_numpy(label), 3).permute(2, 0, 1).float()
    out = SemSegPostProcessor(num_classes=3, min_area=5)(logits).numpy()
    expected = label.copy()
    expected[1:3, 1:3] = 0
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="THRESHOLD=0.3 applies to binary problems"):
        SemSegPostProcessor(num_classes=3, threshold=0.3)
    with pytest.raises(ValueError, match="OPEN_KERNEL"):
        SemSegPostProcessor(num_classes=2, open_kernel=4)


def test_search_threshold_finds_the_best():
    rng = np.random.default_rng(0)
    probs = [rng.random((16, 16)).astype(np.float32) for _ in range(3)]
    gts = [(p > 0.3).astype(np.uint8) for p in probs]
    gts[0][0, :4] = 255  # ignored pixels
    res = search_threshold(probs, gts, thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    assert res["threshold"] == pytest.approx(0.3) and res["dice"] == pytest.approx(1.0)
    assert [t for t, _ in res["scores"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    dices = dict(res["scores"])
    assert dices[0.2] < 1.0 and dices[0.4] < 1.0
    # with post-processing applied per image after thresholding
    res2 = search_threshold(probs, gts, thresholds=[0.3],
                            postprocess=functools.partial(postprocess_mask, min_area=1000))
    assert res2["dice"] == 0.0  # everything removed


def _tiny_unet_cfg(num_classes: int):
    """A CPU UNet config of 4 base channels, depth 2 (no dataset needed)."""
    import d2seg  # noqa: F401  (registers the model and the config keys)
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "UNet"
    cfg.MODEL.BACKBONE.NAME = "build_unet_backbone"
    cfg.MODEL.UNET.BASE_CHANNELS = 4
    cfg.MODEL.UNET.DEPTH = 2
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    return cfg


def test_meta_arch_applies_post_processing():
    from detectron2.modeling import build_model

    cfg = _tiny_unet_cfg(1)
    cfg.MODEL.SEM_SEG_POSTPROCESS.ENABLED = True
    cfg.MODEL.SEM_SEG_POSTPROCESS.THRESHOLD = 0.5
    cfg.MODEL.SEM_SEG_POSTPROCESS.MIN_AREA = 3
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 13, 10) * 255, "height": 26, "width": 20}])[0]
    assert out["sem_seg"].shape == (2, 26, 20) and out["sem_seg_logits"].shape == (2, 26, 20)
    assert set(out["sem_seg"].unique().tolist()) <= {0.0, 1.0}
    assert (out["sem_seg"].sum(0) == 1).all()
    expected = SemSegPostProcessor(cfg)(out["sem_seg_logits"])
    assert torch.equal(out["sem_seg"].argmax(0), expected)


def test_search_threshold_tool_on_isbi(tmp_path, shared_data, isbi_registered):
    """tools/search_threshold.py on a (random) tiny U-Net over the 5 ISBI validation slices."""
    import importlib.util
    import json
    import os

    import d2seg  # noqa: F401
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from conftest import REPO
    from d2seg.config import get_cfg

    config = os.path.join(REPO, "configs", "ISBI-SemanticSegmentation", "unet_cpu.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.UNET.BASE_CHANNELS = 4
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    weights = tmp_path / "w"
    weights.mkdir()
    DetectionCheckpointer(build_model(cfg), save_dir=str(weights)).save("model")
    spec = importlib.util.spec_from_file_location(
        "search_threshold", os.path.join(REPO, "tools", "search_threshold.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "thr.json"
    res = tool.main(["--config-file", config, "--thresholds", "0.1:0.9:0.2", "--min-area", "5",
                     "--output", str(out), "MODEL.UNET.BASE_CHANNELS", "4",
                     "MODEL.WEIGHTS", str(weights / "model.pth")])
    assert res["num_images"] == 5 and res["dataset"] == "isbi2012_membrane_val"
    assert [t for t, _ in res["scores"]] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert res["dice"] == max(d for _, d in res["scores"])
    assert json.load(open(out))["threshold"] == res["threshold"]
    # a dataset of D2SEG.DATASETS.REGISTER (your own data) is registered by the tool too
    base = os.path.join(shared_data, "isbi2012_membrane", "train")
    spec = (f"name=thr_own,type=sem_seg,image_root={base}/image,sem_seg_root={base}/label,"
            "classes=[cell,membrane],label_map={255:0,0:1},val_fraction=0.1")
    res = tool.main(["--config-file", config, "--thresholds", "0.5", "MODEL.UNET.BASE_CHANNELS",
                     "4", "MODEL.WEIGHTS", str(weights / "model.pth"),
                     "D2SEG.DATASETS.REGISTER", str((spec,)), "DATASETS.TEST", "('thr_own_val',)"])
    assert res["dataset"] == "thr_own_val" and res["num_images"] == 3
    # a malformed --thresholds is the tool's own one-line error, before anything is built
    for bad, msg in (("0.1:0.9", "start:stop:step"), ("a,b", "comma-separated"),
                     ("0.9:0.1:0.1", "start <= stop"), ("0.5,1.5", "in \\[0, 1\\], got 1.5")):
        with pytest.raises(ValueError, match=msg):
            tool.parse_thresholds(bad)
    with pytest.raises(SystemExit):
        tool.main(["--config-file", config, "--thresholds", "0.1:0.9"])


# ----------------------------------------------------------------------------------------
# label maps and the class-innermost logits layout (d2seg/modeling/postprocessing.py)
# ----------------------------------------------------------------------------------------
def test_class_labels_is_argmax_with_first_maximum_on_ties():
    from d2seg.modeling.postprocessing import class_labels

    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 19):
        x = torch.randint(0, 3, (k, 31, 17), generator=g).float()  # many ties
        assert torch.equal(class_labels(x), x.argmax(0))
        assert class_labels(x).dtype == torch.long
    x = torch.randn(4, 9, 8, generator=g)
    assert torch.equal(class_labels(x.permute(1, 2, 0).contiguous().permute(2, 0, 1)),
                       x.argmax(0))


def test_pixel_major_keeps_values_and_puts_classes_innermost():
    from d2seg.modeling.postprocessing import pixel_major

    x = torch.randn(3, 5, 7)
    y = pixel_major(x)
    assert torch.equal(y, x) and y.shape == x.shape and y.stride() == (1, 21, 3)
    assert pixel_major(y) is y  # already that way: no copy
    one = torch.randn(1, 5, 7)
    assert pixel_major(one) is one


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("hw,out_hw", [((13, 10), (13, 10)), ((13, 10), (26, 20)),
                                       ((16, 16), (16, 16))])
def test_segmentor_output_matches_detectron2_postprocess(num_classes, hw, out_hw):
    """d2seg's crop + resize gives detectron2's sem_seg_postprocess values, stored with the
    classes innermost on CPU (so argmax(0) is fast), for padded and resized outputs."""
    from detectron2.modeling import build_model
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    cfg = _tiny_unet_cfg(num_classes)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = {}
    model.sem_seg_head.register_forward_hook(lambda m, i, o: seen.update(logits=o[0]))
    with torch.no_grad():
        out = model([{"image": torch.rand(3, *hw) * 255, "height": out_hw[0],
                      "width": out_hw[1]}])[0]["sem_seg"]
        ref = sem_seg_postprocess(seen["logits"][0], hw, *out_hw)
    if num_classes == 1:
        ref = torch.cat([torch.zeros_like(ref), ref])
    assert out.shape == (max(num_classes, 2), *out_hw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.stride()[0] == 1  # classes innermost
    assert torch.equal(out.argmax(0), ref.argmax(0))


class _LogitsInImage(torch.nn.Module):
    """A 'model' whose binary logit is the image's first channel minus 128, post-processed
    as d2seg's models do: sliding windows and views see exactly the crop they are given."""

    def __init__(self, postprocessor):
        super().__init__()
        self.postprocessor = postprocessor
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs):
        from d2seg.modeling.postprocessing import semantic_output

        return [semantic_output(torch.stack([torch.zeros_like(x["image"][0]),
                                             x["image"][0].float() - 128]), self.postprocessor)
                for x in inputs]


@pytest.mark.parametrize("flip", [False, True])
def test_tta_and_windows_post_process_once_on_the_whole_image(flip):
    """KEEP_LARGEST over sliding windows keeps the image's largest component, not each
    window's; the wrapper returns the raw averaged logits beside the one-hot map."""
    from d2seg.inference import SemanticSegmentorWithTTA

    img = torch.zeros(3, 32, 64)
    img[0, 5:15, 5:15] = 255  # 100 px, alone in the left window
    img[0, 5:17, 40:55] = 255  # 180 px, alone in the right window
    post = SemSegPostProcessor(num_classes=1, keep_largest=True)
    model = _LogitsInImage(post).eval()
    assert int(model([{"image": img}])[0]["sem_seg"].argmax(0).sum()) == 180
    tta = SemanticSegmentorWithTTA(model, flip=flip, window=(32, 32), overlap=0.0).eval()
    out = tta([{"image": img, "height": 32, "width": 64}])[0]
    assert out["sem_seg"].shape == (2, 32, 64) and out["sem_seg_logits"].shape == (2, 32, 64)
    assert int(out["sem_seg"].argmax(0).sum()) == 180
    assert out["sem_seg_logits"][1].max() == pytest.approx(127.0)
    assert model.postprocessor is post  # restored after the wrapper's call


def test_sliding_window_sizes_are_checked():
    from d2seg.inference.sliding_window import semantic_logits, sliding_window_logits, window_starts

    model = _LogitsInImage(None).eval()
    img = torch.zeros(3, 16, 16)
    for bad in [(0, 8), (8, -1)]:
        with pytest.raises(ValueError, match="both sides > 0"):
            semantic_logits(model, img, bad)
    with pytest.raises(ValueError, match="both sides > 0"):
        sliding_window_logits(model, img, (0, 8))
    with pytest.raises(ValueError, match="must be > 0"):
        window_starts(10, 0, 0.2)
    assert semantic_logits(model, img, (0, 0)).shape == (2, 16, 16)


def test_search_threshold_ties_go_to_nearest_half():
    from d2seg.modeling.postprocessing import search_threshold

    p = [np.array([[0.0, 1.0]], np.float32)]
    g = [np.array([[0, 1]], np.uint8)]
    assert search_threshold(p, g, thresholds=[0.1, 0.3, 0.5, 0.7, 0.9])["threshold"] == 0.5
    assert search_threshold(p, g, thresholds=[0.9, 0.4, 0.2])["threshold"] == 0.4


def test_search_threshold_is_strictly_greater_like_the_postprocessor():
    from d2seg.modeling.postprocessing import search_threshold

    p = [np.array([[0.5, 0.75]], np.float32)]
    g = [np.array([[0, 1]], np.uint8)]
    scores = dict(search_threshold(p, g, thresholds=[0.5])["scores"])
    assert scores[0.5] == 1.0


def test_postprocess_mask_opens_before_closing():
    """postprocess_mask opens first, then closes (the orders differ on a random mask)."""
    m = np.random.default_rng(0).random((12, 12)) > 0.5
    expected = morphological_close(morphological_open(m, 3), 3)
    assert (expected != morphological_open(morphological_close(m, 3), 3)).any()
    np.testing.assert_array_equal(postprocess_mask(m, open_kernel=3, close_kernel=3), expected)


def test_post_processor_threshold_is_strict_and_two_class_probability_is_a_softmax():
    """P = threshold is background; two-class probability is softmax(logits)[1], not
    sigmoid(logit 1)."""
    assert SemSegPostProcessor(num_classes=1)(torch.zeros(1, 1, 2)).tolist() == [[0, 0]]
    two = torch.tensor([[[1.0]], [[2.0]]])
    assert foreground_probability(two).item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)))
    assert SemSegPostProcessor(num_classes=2, threshold=0.8)(two).tolist() == [[0]]


def test_post_processor_class_defaults_background_range_and_closing_takes_background_only():
    """Binary: only class 1 is processed by default (a background hole stays); BACKGROUND
    outside the classes raises; closing a class takes pixels from the background only."""
    holed = np.ones((12, 12), bool)
    holed[5, 5] = False
    lg = torch.from_numpy(np.where(holed, 5.0, -5.0)).float().unsqueeze(0)
    assert SemSegPostProcessor(num_classes=1, min_area=2)(lg)[5, 5].item() == 0
    with pytest.raises(ValueError, match=r"BACKGROUND \[3\] outside"):
        SemSegPostProcessor(num_classes=3, background=3)
    label = np.zeros((10, 10), int)
    label[2:8, 2:5] = 1
    label[2:8, 5] = 2  # a one-pixel column of class 2 between two class-1 blocks
    label[2:8, 6:9] = 1
    logits = torch.nn.functional.one_hot(torch.from_numpy(label), 3).permute(2, 0, 1).float()
    out = SemSegPostProcessor(num_classes=3, close_kernel=3, classes=[1])(logits).numpy()
    np.testing.assert_array_equal(out[2:8, 5], 2)


def test_search_threshold_scores_an_empty_set_one():
    """No foreground in targets and predictions at any threshold: Dice 1 (nothing to find)."""
    p = [np.zeros((2, 2), np.float32)]
    g = [np.zeros((2, 2), np.uint8)]
    assert search_threshold(p, g, thresholds=[0.5])["dice"] == 1.0


def test_windows_cap_each_side_at_its_own_image_side_and_overlap_one_is_refused():
    """A window wider than a wide image is capped at the image width (not its height), a
    side longer than the window alone starts sliding, and overlap 1 raises."""
    from d2seg.inference.sliding_window import semantic_logits, window_starts

    seen = []

    class Record(torch.nn.Module):
        def forward(self, inputs):
            seen.extend(tuple(x["image"].shape[-2:]) for x in inputs)
            return [{"sem_seg": x["image"][:2].float()} for x in inputs]

    img = torch.rand(3, 16, 32)
    out = semantic_logits(Record(), img, (8, 64), overlap=0.0)
    assert seen == [(8, 32), (8, 32)] and torch.allclose(out, img[:2])
    with pytest.raises(ValueError, match=r"OVERLAP \(--overlap\) must be in"):
        window_starts(10, 4, 1.0)


def test_tta_wrapper_takes_detectron2_flip_option():
    """TEST.AUG.FLIP turns on flip TTA like D2SEG.INFERENCE.FLIP."""
    from d2seg.inference.tta import SemanticSegmentorWithTTA

    cfg = _tiny_unet_cfg(2)
    cfg.TEST.AUG.FLIP = True
    assert SemanticSegmentorWithTTA.from_config(cfg, torch.nn.Linear(1, 1))["flip"] is True


def test_segmentor_pads_targets_with_the_ignore_value_and_normalises_uint8_images():
    """Training targets are padded with IGNORE_VALUE (not class 0); uint8 images are divided
    by PIXEL_STD too."""
    from detectron2.modeling import build_model

    cfg = _tiny_unet_cfg(2)
    cfg.MODEL.PIXEL_STD = [2.0, 4.0, 8.0]
    model = build_model(cfg).train()
    seen = {}

    def head(features, targets):
        seen["targets"] = targets
        return None, {"loss": features[next(iter(features))].sum() * 0}

    model.sem_seg_head.forward = head
    model([{"image": torch.zeros(3, 13, 10, dtype=torch.uint8),
            "sem_seg": torch.zeros(13, 10, dtype=torch.long)}])
    t = seen["targets"][0]
    assert t.shape[-2] > 13 and (t[13:] == cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE).all()
    assert (t[:13, :10] == 0).all()
    x = torch.full((3, 2, 2), 200, dtype=torch.uint8)
    expected = (x.float() - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    assert torch.allclose(model._normalize(x), expected)


def test_search_threshold_tool_refuses_a_multi_class_config_in_one_line():
    import os
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "search_threshold.py"),
                        "--config-file", os.path.join(REPO, "configs/Shapes-SemanticSegmentation/"
                                                            "unet_cpu.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES 5: the threshold search is for binary problems "
        "(NUM_CLASSES 1 or 2)")


def test_postprocess_config_applies_to_detectron2_semantic_segmentor():
    """MODEL.SEM_SEG_POSTPROCESS with detectron2's SemanticSegmentor (the Semantic FPN
    configs) was silently ignored, though search_threshold.py recommends it: the built model
    gets the post-processor, applied in eval mode like d2seg's segmentors, and lifted by
    without_postprocessor for windows and views."""
    import torch

    from d2seg.config import load_config
    from d2seg.engine import Trainer
    from d2seg.inference import build_inference_model
    from d2seg.inference.sliding_window import without_postprocessor

    from conftest import REPO

    cfg = load_config(os.path.join(REPO, "configs/Shapes-SemanticSegmentation/semantic_fpn_cpu.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True",
                       "MODEL.SEM_SEG_POSTPROCESS.MIN_AREA", "50"])
    torch.manual_seed(0)
    for model in (Trainer.build_model(cfg).eval(), build_inference_model(cfg)):
        x = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
        with torch.no_grad():
            out = model(x)[0]
            assert set(out) == {"sem_seg", "sem_seg_logits"}
            assert set(out["sem_seg"].unique().tolist()) <= {0.0, 1.0}  # one-hot
            with without_postprocessor(model):
                assert set(model(x)[0]) == {"sem_seg"}


def test_postprocess_hook_takes_one_channel_logits():
    """A SemanticSegmentor whose head returns one channel (NUM_CLASSES 1): the hook makes the
    two-class logits d2seg's segmentors return before post-processing (it failed on them)."""
    import torch

    from detectron2.modeling import SemanticSegmentor

    from d2seg.config import load_config
    from d2seg.modeling.postprocessing import _postprocess_outputs, SemSegPostProcessor

    cfg = load_config("", ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1",
                           "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True",
                           "MODEL.SEM_SEG_POSTPROCESS.MIN_AREA", "5"])
    model = SemanticSegmentor.__new__(SemanticSegmentor)
    torch.nn.Module.__init__(model)
    model.eval()
    model.postprocessor = SemSegPostProcessor(cfg)
    out = _postprocess_outputs(model, None, [{"sem_seg": torch.randn(1, 16, 16)}])[0]
    assert out["sem_seg"].shape == (2, 16, 16) and out["sem_seg_logits"].shape == (2, 16, 16)
