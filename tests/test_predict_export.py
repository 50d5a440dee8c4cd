"""Sliding-window / flip inference, tools/predict.py outputs, TorchScript + ONNX export checked
against PyTorch (d2seg/inference, d2seg/export.py)."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import d2seg  # noqa: F401
from detectron2.modeling import build_model

from d2seg.config import load_config
from d2seg.export import export_rcnn, export_semantic
from d2seg.inference import SegPredictor, is_semantic_model, semantic_logits, window_starts
from d2seg.inference.sliding_window import sliding_window_logits

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_model as export_tool  # noqa: E402
import predict as predict_tool  # noqa: E402

UNET = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")
TINY_UNET = ["MODEL.DEVICE", "cpu", "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3"]


class PixelModel(nn.Module):
    """A semantic model whose logits at a pixel depend on that pixel only (1x1 conv), following
    detectron2's SemanticSegmentor contract; ``calls`` records the input sizes."""

    def __init__(self, k=3, kernel=1):
        super().__init__()
        self.conv = nn.Conv2d(3, k, kernel, padding=kernel // 2)
        self.calls = []

    def forward(self, inputs):
        out = []
        for x in inputs:
            self.calls.append(tuple(x["image"].shape[-2:]))
            y = self.conv(x["image"][None].float() / 255)[0]
            out.append({"sem_seg": F.interpolate(y[None], (x["height"], x["width"]))[0]})
        return out


@pytest.mark.parametrize("length, window, overlap, expect", [
    (512, 256, 0.0, [0, 256]), (512, 256, 0.5, [0, 128, 256]), (500, 256, 0.25, [0, 192, 244]),
    (100, 256, 0.25, [0]), (256, 256, 0.25, [0]),
])
def test_window_starts(length, window, overlap, expect):
    assert window_starts(length, window, overlap) == expect


def test_sliding_window_matches_whole_image_for_a_per_pixel_model():
    torch.manual_seed(0)
    model = PixelModel().eval()
    image = torch.rand(3, 150, 230) * 255
    full = model([{"image": image, "height": 150, "width": 230}])[0]["sem_seg"]
    model.calls.clear()
    slid = sliding_window_logits(model, image, (64, 96), overlap=0.3, batch_size=3)
    assert slid.shape == full.shape
    assert torch.allclose(slid, full, atol=1e-5)
    assert set(model.calls) == {(64, 96)}  # every window has the window size
    assert len(model.calls) == len(window_starts(150, 64, 0.3)) * len(window_starts(230, 96, 0.3))


class WindowMeanModel(nn.Module):
    """Logits that depend on the whole window: every pixel gets the window's mean (per
    channel), so overlapping windows disagree and their average is checkable by hand."""

    def forward(self, inputs):
        return [{"sem_seg": x["image"].float().mean((1, 2))[:, None, None].expand(
            -1, x["height"], x["width"]).clone()} for x in inputs]


def test_sliding_window_averages_overlapping_windows():
    torch.manual_seed(0)
    image = torch.rand(3, 70, 90) * 255
    win = (32, 40)
    got = sliding_window_logits(WindowMeanModel(), image, win, overlap=0.4, batch_size=2)
    total, count = torch.zeros(3, 70, 90), torch.zeros(1, 70, 90)
    for y in window_starts(70, win[0], 0.4):
        for x in window_starts(90, win[1], 0.4):
            crop = image[:, y:y + win[0], x:x + win[1]]
            total[:, y:y + win[0], x:x + win[1]] += crop.mean((1, 2))[:, None, None]
            count[:, y:y + win[0], x:x + win[1]] += 1
    assert count.min() >= 1 and count.max() >= 4  # windows do overlap
    assert torch.allclose(got, total / count, atol=1e-4)


def test_flip_tta_averages_with_flipped_prediction():
    torch.manual_seed(0)
    model = PixelModel(kernel=3).eval()  # 3x3 kernel: not flip-symmetric
    image = torch.rand(3, 40, 50) * 255
    f = lambda x: model([{"image": x, "height": 40, "width": 50}])[0]["sem_seg"]  # noqa: E731
    expect = (f(image) + f(image.flip(-1)).flip(-1)) / 2
    got = semantic_logits(model, image, flip=True)
    assert torch.allclose(got, expect, atol=1e-6)
    assert not torch.allclose(got, f(image), atol=1e-4)
    assert got.stride()[0] == 1  # CPU: classes innermost, so argmax(0) reads contiguously
    windows = semantic_logits(model, image, (16, 16))
    assert windows.stride()[0] == 1 and windows.shape == got.shape


def test_predictor_sliding_window_on_a_unet():
    cfg = load_config(UNET, TINY_UNET + ["INPUT.MIN_SIZE_TEST", "0",
                                         "D2SEG.INFERENCE.SLIDING_WINDOW.SIZE", "(64, 96)",
                                         "D2SEG.INFERENCE.FLIP", "True"])
    pred = SegPredictor(cfg)
    assert pred.semantic and is_semantic_model(pred.model)
    out = pred(np.random.RandomState(0).randint(0, 255, (130, 200, 3), dtype=np.uint8))
    assert out["sem_seg"].shape == (5, 130, 200) and torch.isfinite(out["sem_seg"]).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a CPU-only machine")
def test_predictor_of_a_cuda_config_runs_on_a_cpu_only_machine(caplog):
    """The configs keep detectron2's MODEL.DEVICE "cuda"; on a machine without CUDA the
    predictor builds on the CPU and says so (as train_net.py and predict.py do)."""
    opts = [o for pair in zip(TINY_UNET[::2], TINY_UNET[1::2]) if pair[0] != "MODEL.DEVICE"
            for o in pair]
    cfg = load_config(UNET, opts + ["MODEL.DEVICE", "cuda"])
    cfg.freeze()
    with caplog.at_level("WARNING"):
        pred = SegPredictor(cfg)
    assert "CUDA is not available: predicting on CPU" in caplog.text
    assert pred.cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.DEVICE == "cuda"  # the caller's cfg
    assert next(pred.model.parameters()).device.type == "cpu"
    out = pred(np.random.RandomState(0).randint(0, 255, (64, 80, 3), dtype=np.uint8))
    assert out["sem_seg"].shape[1:] == (64, 80)


def test_predict_tool_semantic_folder_and_glob(tmp_path):
    imgs = tmp_path / "in"
    imgs.mkdir()
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (90, 120, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rs.randint(0, 255, (70, 64, 3), dtype=np.uint8)).save(imgs / "b.jpg")
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    written = predict_tool.main([
        "--config-file", UNET, "--input", str(imgs / "*.png"), str(imgs), "--output", str(out),
        "--sliding-window", "64", "64", "--flip", *TINY_UNET, "INPUT.MIN_SIZE_TEST", "0"])
    assert set(written) == {"sem_seg"}
    for stem, (h, w) in (("a", (90, 120)), ("b", (70, 64))):
        lab = np.asarray(Image.open(out / "sem_seg" / f"{stem}.png"))
        assert lab.shape == (h, w) and lab.max() < 5
        assert Image.open(out / "overlays" / f"{stem}.png").size == (w, h)
    assert len(json.load(open(out / "image_ids.json"))) == 2  # a.png listed once
    assert json.load(open(out / "outputs.json")) == {str(imgs / "a.png"): "a",
                                                     str(imgs / "b.jpg"): "b"}
    with pytest.raises(FileNotFoundError, match="matches no image"):
        predict_tool.main(["--config-file", UNET, "--input", str(tmp_path / "none*.png"),
                           "--output", str(out), *TINY_UNET])


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, caplog):
    """A 16-bit or float grey image reads as its 8-bit version (scaled by its own range), in
    d2seg's reader and in the one detectron2's DatasetMapper calls; masks ("L") are not
    scaled; SegPredictor takes such arrays and (H, W) grey ones too."""
    from detectron2.data import detection_utils

    from d2seg.data import image_io

    rs = np.random.RandomState(0)
    g8 = rs.randint(0, 256, (40, 50)).astype(np.uint8)
    g8[0, 0], g8[0, 1] = 0, 255
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray((g8.astype(np.float32) / 255) * 3 - 1).save(tmp_path / "gf.tif")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert Image.open(tmp_path / "gf.tif").mode == "F"
    ref = detection_utils.convert_PIL_to_numpy(Image.open(tmp_path / "g8.png"), "BGR")
    assert detection_utils.read_image is image_io.read_image  # installed by `import d2seg`
    with caplog.at_level("WARNING", logger="d2seg.data.image_io"):
        for name in ("g16.png", "gf.tif"):
            for fmt in ("BGR", "RGB"):
                got = detection_utils.read_image(str(tmp_path / name), format=fmt)
                assert got.dtype == np.uint8 and np.array_equal(got, ref), (name, fmt)
    # detectron2's own reader clips the 16-bit image to almost white
    assert image_io._detectron2_read_image(str(tmp_path / "g16.png"), "BGR").mean() > 250
    # a 16-bit label map with class ids is read as the ids, never scaled
    lab = (rs.randint(0, 3, (20, 30))).astype(np.uint16)
    Image.fromarray(lab).save(tmp_path / "lab16.png")
    assert np.array_equal(detection_utils.read_image(str(tmp_path / "lab16.png"), "L")[..., 0],
                          lab)
    assert image_io.to_uint8(np.full((3, 3), 7, np.uint16)).max() == 0  # constant image
    with pytest.raises(ValueError, match="NaN"):
        image_io.to_uint8(np.array([[0.0, np.nan]], np.float32), "x.tif")

    cfg = load_config(UNET, TINY_UNET + ["INPUT.MIN_SIZE_TEST", "0"])
    pred = SegPredictor(cfg)
    want = pred(np.repeat(g8[:, :, None], 3, axis=2))["sem_seg"]
    for arr in (g8, g8[:, :, None], g8.astype(np.uint16) * 257, g8.astype(np.int64),
                np.repeat(g8.astype(np.float32)[:, :, None], 3, axis=2)):
        assert torch.equal(pred(arr)["sem_seg"], want)
    # 0-255 floats are taken as they are, not stretched to the array's range
    dim = (g8 // 2).astype(np.float32)
    assert torch.equal(pred(dim)["sem_seg"], pred((g8 // 2).astype(np.uint8))["sem_seg"])
    # a bool mask is black and white (0/255), as d2seg reads bool images, not 0/1
    mask = g8 > 128
    assert torch.equal(pred(mask)["sem_seg"], pred(mask.astype(np.uint8) * 255)["sem_seg"])
    assert not torch.equal(pred(mask)["sem_seg"], pred(mask.astype(np.uint8))["sem_seg"])
    # a grey model (INPUT.FORMAT "L"): its mapper scales a 16-bit image as well (a mask, read
    # as "L" too, is not), and the predictor hands it the image's grey
    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper

    grey = load_config(UNET, TINY_UNET + ["INPUT.FORMAT", "L", "MODEL.PIXEL_MEAN", "[128.0]",
                                          "MODEL.PIXEL_STD", "[50.0]", "INPUT.MIN_SIZE_TEST", "0"])
    mapper = SemSegDatasetMapper(grey, is_train=False)
    for name in ("g8.png", "g16.png"):
        got = mapper({"file_name": str(tmp_path / name), "height": 40, "width": 50})["image"]
        assert got.shape == (1, 40, 50) and torch.equal(got[0], torch.from_numpy(g8).to(got.dtype))
    gpred = SegPredictor(grey)
    assert gpred(g8)["sem_seg"].shape == (5, 40, 50)
    assert torch.equal(gpred(g8)["sem_seg"], gpred(g8.astype(np.uint16) * 257)["sem_seg"])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) BGR image"):
        pred(np.zeros((4, 5, 4), np.uint8))


def test_predict_tool_skips_unreadable_files_and_writes_the_rest(tmp_path):
    imgs = tmp_path / "in"
    imgs.mkdir()
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(imgs / "a.png")
    (imgs / "broken.png").write_text("not an image")
    Image.fromarray(rs.randint(0, 255, (30, 20, 3), dtype=np.uint8)).save(imgs / "c.png")
    out = tmp_path / "out"
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # predict.py's "d2seg" logger does not propagate
    logging.getLogger("d2seg.inference.run").addHandler(handler)
    try:
        predict_tool.main(["--config-file", UNET, "--input", str(imgs), "--output", str(out),
                           *TINY_UNET, "INPUT.MIN_SIZE_TEST", "0"])
    finally:
        logging.getLogger("d2seg.inference.run").removeHandler(handler)
    log = "\n".join(r.getMessage() for r in records)
    assert sorted(os.listdir(out / "sem_seg")) == ["a.png", "c.png"]
    assert set(json.load(open(out / "image_ids.json"))) == {str(imgs / "a.png"),
                                                            str(imgs / "c.png")}
    assert f"{imgs / 'broken.png'}: not a readable image" in log
    assert "1 of 3 inputs skipped" in log
    with pytest.raises(ValueError, match="none of the 1 inputs is a readable image"):
        predict_tool.main(["--config-file", UNET, "--input", str(imgs / "broken.png"),
                           "--output", str(tmp_path / "o2"), *TINY_UNET])


def test_predict_tool_panoptic(tmp_path):
    """Panoptic FPN (random weights): panoptic PNG + json with dataset category ids."""
    img = tmp_path / "x.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (96, 128, 3), dtype=np.uint8)
                    ).save(img)
    out = tmp_path / "out"
    written = predict_tool.main([
        "--config-file", os.path.join(REPO, "configs/Shapes-PanopticSegmentation/"
                                      "panoptic_fpn_R_18_cpu.yaml"),
        "--input", str(img), "--output", str(out), "--score-threshold", "0.0", "--no-overlays",
        "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "96"])
    assert set(written) == {"panoptic"}
    pan = json.load(open(out / "panoptic.json"))
    (ann,) = pan["annotations"]
    png = np.asarray(Image.open(out / "panoptic" / "x.png")).astype(np.int64)
    assert png.shape == (96, 128, 3)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    cat_ids = {c["id"] for c in pan["categories"]}
    assert ann["segments_info"]
    for s in ann["segments_info"]:
        assert s["category_id"] in cat_ids and s["area"] == int((ids == s["id"]).sum())


@pytest.mark.parametrize("config, opts", [
    (UNET, TINY_UNET),
    # a grey model takes (1, H, W) images (the export built 3-channel ones and failed)
    (UNET, TINY_UNET + ["INPUT.FORMAT", "L", "MODEL.PIXEL_MEAN", "[128.0]",
                        "MODEL.PIXEL_STD", "[64.0]"]),
    (os.path.join(REPO, "configs/Shapes-SemanticSegmentation/deeplabv3plus_cpu.yaml"),
     ["MODEL.DEVICE", "cpu"]),
])
def test_export_semantic_dynamic_size(config, opts, tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config(config, opts))
    results = export_semantic(model, str(tmp_path), 64, 64, check_sizes=((64, 96), (96, 64)))
    assert [r["format"] for r in results] == ["torchscript", "onnx"]
    for r in results:
        assert r["dynamic"] and os.path.isfile(r["path"]) and not r["error"], r
        assert r["checked_shapes"] == [[64, 96], [96, 64]]
        assert r["max_abs_diff"] < 1e-3, r
    channels = len(model.pixel_mean.flatten())
    ts = torch.jit.load(results[0]["path"])
    assert ts(torch.rand(channels, 32, 48) * 255)[0].shape[-2:] == (32, 48)


def test_exportable_adaptive_pool_equals_torch():
    from d2seg.export import exportable_adaptive_avg_pool2d

    x = torch.randn(2, 3, 23, 37)
    for size in (1, 2, 3, 6, (4, 5), (None, 3)):
        ref = F.adaptive_avg_pool2d(x, size)
        assert torch.allclose(exportable_adaptive_avg_pool2d(x, size), ref, atol=1e-6), size


def test_export_pspnet_dynamic_size(tmp_path):
    """PSPNet's pyramid pooling (adaptive pooling to 2x2, 3x3, 6x6) exports with dynamic size."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs/Shapes-SemanticSegmentation/pspnet_cpu.yaml"),
                      ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    ts, onnx_ = export_semantic(model, str(tmp_path), 64, 64, check_sizes=((80, 136),))
    for r in (ts, onnx_):
        assert r["dynamic"] and r["checked_shapes"] == [[80, 136]]
        assert r["max_abs_diff"] < 1e-3, r
    assert F.adaptive_avg_pool2d is torch.nn.functional.adaptive_avg_pool2d
    assert F.adaptive_avg_pool2d.__module__ != "d2seg.export"  # restored after export


def test_export_mask_rcnn_tracing(tmp_path):
    """detectron2's tracing export of the GN Mask R-CNN (from-scratch CPU config), checked on
    images with different numbers of detections."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                   "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["MODEL.DEVICE", "cpu", "D2SEG.DATASETS.REGISTER", "[]",
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                       "TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
                       "MODEL.RPN.POST_NMS_TOPK_TEST", "60"])
    results = export_rcnn(build_model(cfg), str(tmp_path), 128, 160)
    for r in results:
        assert r["error"] == "", r
        assert min(r["detections"]) > 0 and len(set(r["detections"])) > 1, r
        # random weights give ~500 detections with near-equal scores: a float-level difference
        # can flip an NMS decision, so the detections are compared as sets
        assert r["match_rate"] >= 0.95 and r["max_abs_diff"] < 1e-2, r
    assert results[0]["match_rate"] == 1.0  # TorchScript runs the same kernels


def test_export_mask_rcnn_onnx_without_detections(tmp_path):
    """GN heads on an empty batch: torch's ONNX GroupNorm (reshape to (0, G, -1)) fails in ONNX
    Runtime; d2seg swaps in TraceableGroupNorm before exporting."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs/FruitsNuts-InstanceSegmentation/"
                                   "mask_rcnn_R_18_FPN_cpu.yaml"),
                      ["MODEL.DEVICE", "cpu", "D2SEG.DATASETS.REGISTER", "[]",
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.99",
                       "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "60"])
    (r,) = export_rcnn(build_model(cfg), str(tmp_path), 128, 160, formats=("onnx",))
    assert r["error"] == "" and r["detections"] == [0, 0] and r["match_rate"] == 1.0, r


def test_traceable_group_norm_equals_group_norm():
    from d2seg.export import TraceableGroupNorm

    gn = nn.GroupNorm(8, 32)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(3, 32, 7, 5) * 3 + 1
    assert torch.allclose(TraceableGroupNorm(gn)(x), gn(x), atol=1e-5)
    assert TraceableGroupNorm(gn)(x[:0]).shape == (0, 32, 7, 5)


def test_export_tool_writes_report(tmp_path):
    export_tool.main(["--config-file", UNET, "--output", str(tmp_path), "--format", "onnx",
                      "--height", "64", "--width", "96", *TINY_UNET])
    (rep,) = json.load(open(tmp_path / "export_report.json"))
    assert rep["format"] == "onnx" and rep["error"] == "" and rep["max_abs_diff"] < 1e-3
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"))
    (out,) = sess.run(None, {"image": np.random.rand(3, 80, 112).astype(np.float32) * 255})
    assert out.shape == (5, 80, 112)



def test_export_tool_fails_on_a_wrong_semantic_export_and_reports_errors(tmp_path, monkeypatch,
                                                                          capsys):
    """Exit 1 when the exported logits differ from PyTorch's beyond MAX_LOGIT_DIFF, and a
    format that fails is reported in export_report.json (not a traceback), as for R-CNN."""
    import d2seg.export as export_mod

    assert export_tool.MAX_LOGIT_DIFF == 1e-2
    monkeypatch.setattr(export_mod, "compare_outputs", lambda *a, **k: 0.5)
    with pytest.raises(SystemExit) as e:
        export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "a"), "--format",
                          "torchscript", "--height", "64", "--width", "96", *TINY_UNET])
    assert e.value.code == 1
    assert "max |diff| 0.5 (above 0.01: the exported model computes otherwise)" in \
        capsys.readouterr().out

    def broken(*a, **k):
        raise RuntimeError("tracing failed here")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with pytest.raises(SystemExit) as e:
        export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "b"), "--format",
                          "torchscript", "--height", "64", "--width", "96", *TINY_UNET])
    assert e.value.code == 1
    (rep,) = json.load(open(tmp_path / "b" / "export_report.json"))
    assert rep["error"] == "RuntimeError: tracing failed here"

def test_exported_semantic_model_with_its_input_spec_predicts_as_the_predictor(tmp_path):
    """The test resize is outside the graph: the exported model, with the resize written to
    input_spec.json done before and after it, gives SegPredictor's logits."""
    from detectron2.data.transforms import ResizeShortestEdge
    from detectron2.modeling import build_model

    opts = TINY_UNET + ["D2SEG.SPEED.INFERENCE_AMP", "off", "INPUT.MIN_SIZE_TEST", "96"]
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(UNET, opts)).state_dict()},
               tmp_path / "w.pth")
    opts += ["MODEL.WEIGHTS", str(tmp_path / "w.pth")]
    export_tool.main(["--config-file", UNET, "--format", "torchscript", "--output",
                      str(tmp_path / "x"), *opts])
    spec = json.load(open(tmp_path / "x" / "input_spec.json"))
    assert (spec["min_size_test"], spec["channel_order"]) == (96, "BGR")
    assert spec["intensity"]["scaling"] == "minmax" and not spec["not_exported"]
    # what predict.py does outside the graph is in the spec: the intensity window, scales
    from importlib import import_module

    other = import_module("export_model").input_spec(load_config(UNET, opts + [
        "INPUT.INTENSITY.SCALING", "window", "INPUT.INTENSITY.WINDOW", "(-160, 240)",
        "D2SEG.INFERENCE.SCALES", "(0.75, 1.0)"]))
    assert other["intensity"]["window"] == [-160.0, 240.0]
    assert "scales (0.75, 1.0)" in other["not_exported"]
    image = np.random.RandomState(0).randint(0, 256, (83, 111, 3), dtype=np.uint8)
    want = SegPredictor(load_config(UNET, opts))(image)["sem_seg"]
    resized = ResizeShortestEdge([spec["min_size_test"]] * 2, spec["max_size_test"]) \
        .get_transform(image).apply_image(image)
    assert min(resized.shape[:2]) == 96
    ts = torch.jit.load(str(tmp_path / "x" / "model.ts"))
    out = ts(torch.as_tensor(resized.transpose(2, 0, 1).astype(np.float32)))
    out = out[0] if isinstance(out, (tuple, list)) else out
    got = F.interpolate(out[None].float(), (83, 111), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got, want, atol=1e-3)


def test_rot90_and_flip_tta_average_the_eight_views():
    torch.manual_seed(0)
    model = PixelModel(kernel=3).eval()
    image = torch.rand(3, 36, 36) * 255
    f = lambda x: model([{"image": x, "height": x.shape[-2], "width": x.shape[-1]}])[0]["sem_seg"]  # noqa: E731
    views = []
    for k in range(4):
        r = torch.rot90(image, k, (1, 2))
        views.append(torch.rot90(f(r), -k, (1, 2)))
        views.append(torch.rot90(f(r.flip(-1)).flip(-1), -k, (1, 2)))
    got = semantic_logits(model, image, flip=True, rot90=True)
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-5)
    rot_only = semantic_logits(model, image, rot90=True)
    assert torch.allclose(rot_only, torch.stack(views[::2]).mean(0), atol=1e-5)
    # non-square images: rotated views are (W, H) and map back to (H, W)
    assert semantic_logits(model, torch.rand(3, 20, 30) * 255, rot90=True).shape == (3, 20, 30)
    # a per-pixel (1x1) model is rotation-equivariant: TTA changes nothing
    pix = PixelModel().eval()
    assert torch.allclose(semantic_logits(pix, image, flip=True, rot90=True),
                          semantic_logits(pix, image), atol=1e-5)


def test_semantic_tta_wrapper_resizes_to_height_width():
    from d2seg.inference import SemanticSegmentorWithTTA

    model = PixelModel(kernel=3).eval()
    tta = SemanticSegmentorWithTTA(model, flip=True, rot90=True).eval()
    out = tta([{"image": torch.rand(3, 24, 32) * 255, "height": 48, "width": 64},
               {"image": torch.rand(3, 10, 12) * 255}])
    assert out[0]["sem_seg"].shape == (3, 48, 64) and out[1]["sem_seg"].shape == (3, 10, 12)
    cfg = load_config(UNET, TINY_UNET + ["TEST.AUG.FLIP", "False", "D2SEG.INFERENCE.ROT90", "True",
                                         "D2SEG.INFERENCE.SLIDING_WINDOW.SIZE", "(32, 32)"])
    w = SemanticSegmentorWithTTA(cfg, model)
    assert (w.flip, w.rot90, w.window) == (False, True, (32, 32))
    with pytest.raises(RuntimeError, match="eval"):
        w.train()([{"image": torch.rand(3, 8, 8)}])


def test_writer_image_ids_never_reuse_another_images_id(tmp_path, caplog):
    """An input missing from the COCO json of ids gets an id above the json's largest (with a
    warning), not its input index, which may be another image's id."""
    import logging

    from detectron2.data import MetadataCatalog

    from d2seg.inference.writer import PredictionWriter

    w = PredictionWriter(str(tmp_path), MetadataCatalog.get("__unused"), image_ids={
        "a.jpg": 0, "b.jpg": 7}, overlays=False)
    black = np.zeros((4, 4, 3), np.uint8)
    sem = {"sem_seg": torch.zeros(2, 4, 4)}
    for i, name in enumerate(["/x/b.jpg", "/x/new.jpg", "/x/a.jpg"]):
        w.add(name, i, black, sem)
    with caplog.at_level(logging.WARNING, logger="d2seg.inference.writer"):
        w.finish()
    ids = json.load(open(tmp_path / "image_ids.json"))
    assert ids == {"/x/b.jpg": 7, "/x/new.jpg": 9, "/x/a.jpg": 0}
    assert "1 input image(s) are not in the COCO json" in caplog.text and "new.jpg" in caplog.text
    # without any json: the input index, as before
    w = PredictionWriter(str(tmp_path / "n"), MetadataCatalog.get("__unused"), overlays=False)
    w.add("/x/new.jpg", 3, black, sem)
    w.finish()
    assert json.load(open(tmp_path / "n" / "image_ids.json")) == {"/x/new.jpg": 3}


def test_writer_never_gives_a_json_id_to_a_look_alike_file(tmp_path, caplog):
    """Same-named inputs in different folders: matched by path, ambiguous ones get free ids
    with a warning, and their outputs do not overwrite each other."""
    import logging

    from detectron2.data import MetadataCatalog

    from d2seg.inference.writer import PredictionWriter

    black = np.zeros((4, 4, 3), np.uint8)
    sem = {"sem_seg": torch.zeros(2, 4, 4)}

    def run(out, image_ids, paths, image_root=""):
        meta = MetadataCatalog.get("d2seg_test_look_alike")
        if not hasattr(meta, "stuff_classes"):
            meta.set(stuff_classes=["bg", "fg"], stuff_colors=[(0, 0, 0), (255, 0, 0)])
        w = PredictionWriter(str(tmp_path / out), meta, image_ids=image_ids,
                             image_root=image_root)
        for i, p in enumerate(paths):
            w.add(p, i, black, sem)
        with caplog.at_level(logging.WARNING, logger="d2seg.inference.writer"):
            w.finish()
        return json.load(open(tmp_path / out / "image_ids.json"))

    # a json naming "0.jpg": two inputs called 0.jpg are ambiguous, neither takes id 0
    ids = run("amb", {"0.jpg": 0, "1.jpg": 1}, ["/d/a/0.jpg", "/d/b/0.jpg", "/d/a/1.jpg"])
    assert ids == {"/d/a/0.jpg": 2, "/d/b/0.jpg": 3, "/d/a/1.jpg": 1}
    assert "match the same COCO json entry" in caplog.text
    assert sorted(os.listdir(tmp_path / "amb" / "sem_seg")) == ["0.png", "0_1.png", "1.png"]
    assert sorted(os.listdir(tmp_path / "amb" / "overlays")) == ["0.png", "0_1.png", "1.png"]
    # a json whose file names tell them apart: the longest trailing match
    ids = run("sub", {"a/0.jpg": 5, "b/0.jpg": 6}, ["/d/a/0.jpg", "/d/b/0.jpg"])
    assert ids == {"/d/a/0.jpg": 5, "/d/b/0.jpg": 6}
    # both "0.jpg" and "a/0.jpg" trail /d/a/0.jpg: the longer one wins, in either json order
    for image_ids in ({"0.jpg": 1, "a/0.jpg": 5}, {"a/0.jpg": 5, "0.jpg": 1}):
        ids = run("longest", image_ids, ["/d/a/0.jpg", "/d/b/0.jpg"])
        assert ids == {"/d/a/0.jpg": 5, "/d/b/0.jpg": 1}
    # the dataset's image root: only the file there is that image
    root = tmp_path / "root"
    root.mkdir()
    caplog.clear()
    ids = run("root", {"0.jpg": 0}, [str(root / "0.jpg"), "/elsewhere/0.jpg"], str(root))
    assert ids == {str(root / "0.jpg"): 0, "/elsewhere/0.jpg": 2}
    assert "under its image root" in caplog.text and "/elsewhere/0.jpg" in caplog.text


def test_panoptic_ground_truth_is_drawn_from_its_segments_alone():
    """train_net's vis/: a panoptic dict's ground truth once (its panoptic segments), not also
    its instance annotations and the separated stuff map (whose class 0 reads "things")."""
    from d2seg.utils.visualize import _ground_truth_to_draw

    pan = {"file_name": "a.png", "annotations": [{}], "sem_seg_file_name": "s.png",
           "pan_seg_file_name": "p.png", "segments_info": [{"id": 1}]}
    assert set(_ground_truth_to_draw(pan)) == {"file_name", "pan_seg_file_name", "segments_info"}
    sem = {"file_name": "a.png", "sem_seg_file_name": "s.png"}
    inst = {"file_name": "a.png", "annotations": [{}]}
    assert _ground_truth_to_draw(sem) is sem and _ground_truth_to_draw(inst) is inst


def test_writer_maps_contiguous_to_dataset_ids(tmp_path):
    from detectron2.data.catalog import Metadata
    from detectron2.structures import Boxes, Instances

    from d2seg.inference.writer import PredictionWriter

    meta = Metadata(name="audit_w").set(thing_classes=["x", "y"], stuff_classes=["things", "s"],
                                        thing_dataset_id_to_contiguous_id={11: 0, 12: 1},
                                        stuff_dataset_id_to_contiguous_id={0: 0, 20: 1})
    w = PredictionWriter(str(tmp_path), meta, overlays=False)
    inst = Instances((8, 8), pred_boxes=Boxes(torch.tensor([[0., 0, 4, 4], [1, 1, 5, 5]])),
                     scores=torch.tensor([0.9, 0.8]), pred_classes=torch.tensor([0, 1]))
    w.add("a.png", 0, np.zeros((8, 8, 3), np.uint8), {"instances": inst})
    assert [r["category_id"] for r in w.coco_results] == [11, 12]
    seg = torch.zeros(8, 8, dtype=torch.int32)
    seg[:4], seg[4:] = 1, 2
    w.add("b.png", 1, np.zeros((8, 8, 3), np.uint8), {"panoptic_seg": (seg, [
        {"id": 1, "category_id": 1, "isthing": True},
        {"id": 2, "category_id": 1, "isthing": False}])})
    segs = w.panoptic_annotations[0]["segments_info"]
    assert [s["category_id"] for s in segs] == [12, 20]


def test_to_uint8_uses_the_images_range_not_the_dtype_max():
    from d2seg.data.image_io import to_uint8

    a = np.array([[100, 4000, 2050]], np.uint16)  # a 12-bit image in a 16-bit file
    assert to_uint8(a).tolist() == [[0, 255, 128]]


def test_predict_config_applies_overlap_zero_and_rot90():
    """predict_config: --overlap 0 is a value (not "unset"), --rot90 turns on rotation TTA."""
    from d2seg.inference.run import predict_config

    cfg = predict_config(os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml"),
                         [], overlap=0.0, rot90=True)
    assert cfg.D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP == 0.0 and cfg.D2SEG.INFERENCE.ROT90


def test_predict_with_an_unregistered_dataset_names_the_closest(tmp_path):
    from d2seg.config import ConfigError, load_config
    from d2seg.inference.run import predict_files

    cfg = load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"))
    with pytest.raises(ConfigError, match=r"--dataset .*: dataset 'isbi2012_membrane_tset' is "
                                          r"not registered; did you mean 'isbi2012_membrane_"):
        predict_files(cfg, [], str(tmp_path), "isbi2012_membrane_tset")


def test_an_export_computing_nan_is_the_worst_difference(tmp_path):
    """max() would drop a NaN and report the export as exact: a NaN / inf where PyTorch is
    finite counts as an infinite difference, which the tool's check fails."""
    import d2seg.export as export_mod

    class Adapter(nn.Module):
        def forward(self, x):
            return x * 2

    ref = Adapter()
    bad = {"n": 0}

    def run(fmt, path, inputs):
        bad["n"] += 1
        out = (inputs[0] * 2).numpy()
        out.flat[0] = np.nan
        return [out]

    orig = export_mod._run_exported
    export_mod._run_exported = run
    try:
        diff = export_mod.compare_outputs("onnx", "x.onnx", ref, [(torch.ones(3, 4, 4),)])
    finally:
        export_mod._run_exported = orig
    assert diff == float("inf") and bad["n"] == 1
    assert not diff <= export_tool.MAX_LOGIT_DIFF


@pytest.mark.parametrize("argv, words", [
    (["--overlap", "1.0"], "argument --overlap: must be in [0, 1), got 1.0"),
    (["--overlap", "-0.1"], "argument --overlap: must be in [0, 1), got -0.1"),
    (["--sliding-window", "0", "64"], "argument --sliding-window: must be a positive number"),
    (["--scales", "1", "0"], "argument --scales: must be a factor > 0, got 0"),
])
def test_predict_tool_checks_window_options_before_loading_anything(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        predict_tool.main(["--config-file", "missing.yaml", "--input", "x", "--output", "y",
                           *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_image_ids_of_a_dataset_of_symlinked_files(tmp_path):
    """A registered dataset whose image folder holds links into a data store: each input still
    gets its json id (resolving the link itself led out of image_root: made-up ids, scoring
    nothing); a file of the same name elsewhere still gets none."""
    from d2seg.inference.writer import _IdMatcher

    store, root, other = tmp_path / "store", tmp_path / "links", tmp_path / "other"
    for d in (store, root, other):
        d.mkdir()
    for name in ("0.jpg", "3.jpg"):
        (store / name).write_bytes(b"x")
        os.symlink(store / name, root / name)
    (other / "3.jpg").write_bytes(b"x")
    os.symlink(root, tmp_path / "alias")  # a linked folder leading to the image root
    m = _IdMatcher({"0.jpg": 5, "3.jpg": 11}, str(root))
    assert m.match(str(root / "3.jpg")) == 11 and m.match(str(root / "0.jpg")) == 5
    assert m.match(str(tmp_path / "alias" / "3.jpg")) == 11
    assert m.match(str(other / "3.jpg")) is None
    assert m.match(str(store / "3.jpg")) is None


def test_intensity_window_and_percentile_scaling(tmp_path):
    """INPUT.INTENSITY: "window" maps one raw value to one 8-bit value in every image (CT
    Hounsfield units; "minmax" gave the same raw value different inputs by the image's other
    pixels), "percentile" clips a few extreme pixels; the semantic mapper, SegPredictor and
    predict_config (the process default, for detectron2's mapper) all follow the config."""
    from d2seg.config import ConfigError
    from d2seg.data import image_io
    from d2seg.data.image_io import IntensityScaling, to_uint8
    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper
    from d2seg.inference.run import predict_config

    # percentiles that meet (a sparse bright structure on a flat background): its own range,
    # not a black image
    sparse = np.zeros((100, 100), np.uint16)
    sparse[:3, :10] = 4000
    assert to_uint8(sparse, scaling=IntensityScaling("percentile", 0.5, 99.5)).max() == 255
    ct = np.array([[-1000.0, -160.0, 0.0, 240.0, 1000.0]])
    assert to_uint8(ct, scaling=IntensityScaling("window", -160, 240)).tolist() == \
        [[0, 0, 102, 255, 255]]
    hot = np.arange(100.0).reshape(10, 10)
    hot[0, 0] = 1e6
    p = to_uint8(hot, scaling=IntensityScaling("percentile", 0, 98))
    assert p[0, 0] == 255 and p[9, 8] == 255 and 120 < p[5, 0] < 135  # minmax: 0
    assert to_uint8(hot)[5, 0] == 0
    # the same raw value in two images of other ranges: one input with a window only
    a = np.float32([[0, 1000, 2000]])
    b = np.float32([[0, 1000, 4000]])
    Image.fromarray(a).save(tmp_path / "a.tif")
    Image.fromarray(b).save(tmp_path / "b.tif")
    opts = TINY_UNET + ["INPUT.MIN_SIZE_TEST", "0"]
    win = opts + ["INPUT.INTENSITY.SCALING", "window", "INPUT.INTENSITY.WINDOW", "(0, 4000)"]
    for extra, same in (([], False), (win[len(opts):], True)):
        mapper = SemSegDatasetMapper(load_config(UNET, opts + extra), is_train=False)
        px = [mapper({"file_name": str(tmp_path / f), "height": 1, "width": 3})["image"][0, 0, 1]
              for f in ("a.tif", "b.tif")]
        assert (px[0] == px[1]) == same, (extra, px)
    wpred = SegPredictor(load_config(UNET, win))
    assert wpred.intensity == IntensityScaling("window", 0, 4000)
    # under a window every array that is not uint8 is windowed, also one within 0-255 (a
    # float crop in Hounsfield units); uint8 is taken as it is
    crop = np.full((8, 8), 200.0, np.float32)
    assert torch.equal(wpred(crop)["sem_seg"], wpred(np.full((8, 8), 13, np.uint8))["sem_seg"])
    try:
        predict_config(UNET, win)
        assert image_io.intensity_scaling() == IntensityScaling("window", 0, 4000)
        from detectron2.data import detection_utils  # detectron2's mapper reads with it

        assert detection_utils.read_image(str(tmp_path / "a.tif"), "BGR")[0, :, 0].tolist() == \
            [0, 64, 128]
    finally:
        image_io.set_intensity_scaling(IntensityScaling())
    # bad settings: one line at load time, naming the key and the value
    for bad, words in ((["INPUT.INTENSITY.SCALING", "hu"], "SCALING must be one of"),
                       (["INPUT.INTENSITY.SCALING", "window"], r"WINDOW must be \(low, high\) "
                                                               r"with high > low.*\(0, 0\)"),
                       (["INPUT.INTENSITY.SCALING", "percentile",
                         "INPUT.INTENSITY.PERCENTILES", "(5, 120)"], r"PERCENTILES .* \(5, 120\)")):
        with pytest.raises(ConfigError, match=r"^command line override \(INPUT.INTENSITY.*" + words):
            load_config(UNET, bad)


def test_multi_scale_tta_averages_the_resized_views():
    """D2SEG.INFERENCE.SCALES: the image resized by each factor (bilinear), its logits resized
    back to the image and averaged, with flips at every scale; 1.0 alone is plain inference."""
    from d2seg.inference import SemanticSegmentorWithTTA

    torch.manual_seed(0)
    model = PixelModel(kernel=3).eval()
    image = torch.rand(3, 40, 52) * 255
    f = lambda x: model([{"image": x, "height": x.shape[-2], "width": x.shape[-1]}])[0]["sem_seg"]  # noqa: E731

    def back(y):
        return F.interpolate(y[None], size=(40, 52), mode="bilinear", align_corners=False)[0]

    views = []
    for size in ((20, 26), (40, 52), (60, 78)):
        x = image if size == (40, 52) else F.interpolate(image[None], size=size, mode="bilinear",
                                                         align_corners=False)[0]
        views += [back(f(x)), back(f(x.flip(-1)).flip(-1))]
    got = semantic_logits(model, image, flip=True, scales=(0.5, 1.0, 1.5))
    assert got.shape == (3, 40, 52)
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-5)
    assert torch.equal(semantic_logits(model, image, scales=(1.0,)), semantic_logits(model, image))
    with pytest.raises(ValueError, match="scales must be > 0"):
        semantic_logits(model, image, scales=(0.0,))
    # the wrapper (train_net's TEST.AUG.ENABLED, SegPredictor) takes them from the config
    cfg = load_config(UNET, TINY_UNET + ["D2SEG.INFERENCE.SCALES", "(0.5, 1.0)"])
    tta = SemanticSegmentorWithTTA(cfg, model)
    assert tta.scales == (0.5, 1.0)
    assert SegPredictor(cfg).semantic_model.scales == (0.5, 1.0)
    from d2seg.config import ConfigError

    with pytest.raises(ConfigError, match=r"D2SEG.INFERENCE.SCALES must be one or more factors "
                                          r"> 0, got \(0.5, -1.0\)"):
        load_config(UNET, ["D2SEG.INFERENCE.SCALES", "(0.5, -1.0)"])
    from d2seg.inference.run import predict_config

    try:
        assert predict_config(UNET, [], scales=[0.75, 1.25]).D2SEG.INFERENCE.SCALES == (0.75, 1.25)
    finally:
        from d2seg.data import image_io

        image_io.set_intensity_scaling(image_io.IntensityScaling())


def test_export_leaves_the_postprocessor_out_and_checks_given_images(tmp_path):
    """A config with MODEL.SEM_SEG_POSTPROCESS (e.g. search_threshold.py's "apply with" line)
    exports the logits (the trace froze the numpy post-processing into a constant and the
    check failed on a shape); --check-images are compared for semantic models too; the spec
    names the post-processing and the classes."""
    img = np.random.RandomState(0).randint(0, 256, (70, 90, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="--check-images: no such file 'MODEL.WEIGHTS'"):
        export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "x"),
                          "--check-images", str(tmp_path / "a.png"), "MODEL.WEIGHTS", "w.pth"])
    export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "x"), "--check-images",
                      str(tmp_path / "a.png"), "--format", "torchscript", "--height", "64",
                      "--width", "64", *TINY_UNET,
                      "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True",
                      "MODEL.SEM_SEG_POSTPROCESS.MIN_AREA", "20"])
    (rep,) = json.load(open(tmp_path / "x" / "export_report.json"))
    assert rep["error"] == "" and rep["max_abs_diff"] < 1e-3
    assert [256, 329] in rep["checked_shapes"]  # a.png, test-resized (shorter side 256)
    spec = json.load(open(tmp_path / "x" / "input_spec.json"))
    assert "MODEL.SEM_SEG_POSTPROCESS" in spec["not_exported"]
    assert len(spec["classes"]) == 5


def test_grey_16_bit_images_through_detectron2_dataset_mapper_are_scaled(tmp_path):
    """detectron2's DatasetMapper reads a grey model's image and its label map both as "L":
    d2seg's build_mapper marks the image, so a 16-bit image is scaled (it was clipped to
    almost white) while a 16-bit label map keeps its ids; pickling (spawned workers) works."""
    import pickle

    from d2seg.data.build import build_mapper

    img = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 2)  # 0..3998
    Image.fromarray(img).save(tmp_path / "g16.png")
    lab = (np.arange(40 * 50).reshape(40, 50) % 3).astype(np.uint16)
    Image.fromarray(lab).save(tmp_path / "lab16.png")
    cfg = load_config(UNET, TINY_UNET + ["INPUT.DATASET_MAPPER_NAME", "", "INPUT.FORMAT", "L",
                                         "MODEL.PIXEL_MEAN", "[128.0]", "MODEL.PIXEL_STD", "[50.0]",
                                         "INPUT.MIN_SIZE_TEST", "0"])
    mapper = build_mapper(cfg, False)
    mapper = pickle.loads(pickle.dumps(mapper))
    out = mapper({"file_name": str(tmp_path / "g16.png"), "height": 40, "width": 50,
                  "sem_seg_file_name": str(tmp_path / "lab16.png")})
    assert out["image"].shape == (1, 40, 50)
    assert out["image"].max() == 255 and out["image"].min() == 0
    assert (out["image"] == 255).float().mean() < 0.01  # scaled, not clipped
    assert torch.equal(out["sem_seg"], torch.from_numpy(lab.astype(np.int64)))


def test_a_folder_of_case_sub_folders_gets_a_glob_hint(tmp_path):
    from d2seg.inference.writer import list_inputs

    (tmp_path / "case01").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "case01" / "0.png")
    with pytest.raises(FileNotFoundError, match=r"sub-folders hold images: pass a quoted glob "
                                                r"such as .*\*\*/\*\.png"):
        list_inputs([str(tmp_path)])
    assert list_inputs([str(tmp_path / "**" / "*.png")]) == [str(tmp_path / "case01" / "0.png")]


def test_input_spec_names_the_classes_the_model_outputs():
    """R-CNN outputs thing classes, semantic models stuff classes (a panoptic-style dataset
    has both lists)."""
    from importlib import import_module

    spec = import_module("export_model").input_spec
    rcnn = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
    assert spec(load_config(rcnn))["classes"] == ["circle", "triangle", "rectangle"]
    assert len(spec(load_config(UNET))["classes"]) == 5


def test_semantic_overlay_blends_the_class_colours_and_leaves_ignored_pixels():
    """predict.py's semantic overlays: a vectorised blend (detectron2's Visualizer drew each
    class as matplotlib polygons: 95 against 14 ms for a 512x512 map, docs/benchmarks.md)."""
    from types import SimpleNamespace

    from d2seg.utils.visualize import draw_prediction, draw_sem_seg

    labels = np.zeros((64, 80), np.int64)
    labels[10:40, 10:50] = 1
    labels[:4] = 255  # ignored: not drawn
    meta = SimpleNamespace(stuff_classes=["bg", "fg"], stuff_colors=[[0, 0, 200], [200, 0, 0]])
    img = np.full((64, 80, 3), 100, np.uint8)
    out = draw_sem_seg(img, labels, meta, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[:4] == 100).all()
    # away from the outlines and the names
    assert tuple(out[6, 3]) == (50, 50, 150) and tuple(out[13, 45]) == (150, 50, 50)
    logits = torch.from_numpy(np.stack([labels == 0, labels == 1]).astype(np.float32))
    assert np.array_equal(draw_prediction(img, {"sem_seg": logits}, meta)[4:],
                          draw_sem_seg(img, np.where(labels == 255, 0, labels), meta)[4:])


def test_tools_refuse_an_output_path_they_cannot_write_before_any_work(tmp_path):
    """A file where the output folder goes was a FileExistsError traceback after the model was
    built and loaded (predict.py, export_model.py), or after every check (check_dataset.py)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import check_dataset as check_tool

    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit, match="predict.py: error: --output: '.*taken' is a file"):
        predict_tool.main(["--config-file", UNET, "--input", str(tmp_path), "--output",
                           str(tmp_path / "taken"), *TINY_UNET])
    with pytest.raises(SystemExit, match="export_model.py: error: --output: '.*taken/x' cannot "
                                         "be created"):
        export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "taken" / "x"),
                          *TINY_UNET])
    assert check_tool.main(["--config-file", UNET, "--json",
                            str(tmp_path / "taken" / "r.json"), *TINY_UNET]) == 2
    with pytest.raises(SystemExit):  # argparse: --height must be >= 32
        export_tool.main(["--config-file", UNET, "--output", str(tmp_path / "e"), "--height",
                          "0"])


def test_predict_and_export_with_a_run_config_whose_data_is_elsewhere(tmp_path):
    """The docs say to predict and export with the run's config.yaml; on another machine its
    D2SEG.DATASETS.REGISTER paths do not exist, and both tools refused to start. They now
    register the entry without data (its class names) and say so."""
    src = open(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu_folder.yaml")).read()
    cfg_file = tmp_path / "deploy.yaml"
    cfg_file.write_text(src.replace('_BASE_: "unet_cpu.yaml"', '_BASE_: "' + os.path.join(
        REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml") + '"').replace(
        "../shared/data", str(tmp_path / "elsewhere")))
    Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(
        tmp_path / "slice.png")
    small = ["MODEL.DEVICE", "cpu", "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # d2seg's loggers do not propagate to pytest's capture
    logging.getLogger("d2seg.data.register").addHandler(handler)
    try:
        written = predict_tool.main(["--config-file", str(cfg_file), "--input",
                                     str(tmp_path / "slice.png"), "--output",
                                     str(tmp_path / "p"), *small])
    finally:
        logging.getLogger("d2seg.data.register").removeHandler(handler)
    assert os.path.isfile(tmp_path / "p" / "sem_seg" / "slice.png") and "sem_seg" in written
    assert any("registered ['isbi_folder', 'isbi_folder_train', 'isbi_folder_val'] without "
               "data, with its class names ['cell', 'membrane']" in r.getMessage()
               for r in records)
    export_tool.main(["--config-file", str(cfg_file), "--output", str(tmp_path / "e"),
                      "--format", "torchscript", "--height", "64", "--width", "64", *small])
    spec = json.load(open(tmp_path / "e" / "input_spec.json"))
    assert spec["classes"] == ["cell", "membrane"]
    # training with it still stops at the missing folder, in one line
    from d2seg.config import load_config_or_exit

    with pytest.raises(SystemExit, match="image_root '.*elsewhere.*' does not exist"):
        load_config_or_exit(str(cfg_file), [], "train_net.py")


def test_predict_registers_the_runs_shapes_catalog():
    """predict.py with a shapes run's config used the default 100-image catalog's image ids
    (the run's D2SEG.SHAPES sizes were never registered)."""
    from detectron2.data import MetadataCatalog

    from d2seg.inference.run import predict_config

    try:
        predict_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                          "mask_rcnn_R_18_FPN_cpu.yaml"),
                       ["D2SEG.SHAPES.NUM_VAL", "4", "D2SEG.SHAPES.IMAGE_SIZE", "96"])
        assert "val_n4_s96" in MetadataCatalog.get("shapes_instance_val").json_file
    finally:  # the default catalog again for the other tests
        predict_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                          "mask_rcnn_R_18_FPN_cpu.yaml"), [])


def test_outputs_without_class_names_get_placeholders_for_the_overlays():
    """A COCO-panoptic entry registered without its json has no class names; detectron2's
    Visualizer indexed stuff_classes and predict.py stopped at the first overlay."""
    from detectron2.data.catalog import Metadata

    from d2seg.config import get_cfg
    from d2seg.inference.run import _with_class_names

    cfg = get_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3, 1
    empty = Metadata(name="no_names")
    named = _with_class_names(cfg, empty)
    assert named.thing_classes == ["class 0", "class 1", "class 2"]
    assert named.stuff_classes == ["class 0", "class 1"]  # binary: two labels
    assert not hasattr(empty, "stuff_classes")  # the catalog's entry stays as registered
    full = Metadata(name="names").set(thing_classes=["a"], stuff_classes=["b"])
    assert _with_class_names(cfg, full) is full
