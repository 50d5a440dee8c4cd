#!/usr/bin/env python
"""Export a trained model to TorchScript and/or ONNX, checked against PyTorch.

    python tools/export_model.py --config-file CFG --output OUT [--format torchscript onnx] \\
        [--height 256 --width 256] MODEL.WEIGHTS output/model_final.pth [KEY VALUE ...]

Semantic models (UNet, DeepLabV3(Plus), PSPNet, SegFormer, HRNet, SemanticSegmentor):
OUT/model.ts, OUT/model.onnx taking a (C, H, W) float image (0-255, INPUT.FORMAT channel order; C = 1 for L)
and returning (K, H, W) logits; H, W dynamic (PSPNet's pooling included: it is exported as
matrix products). The config's test resize (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) is not part
of the exported graph: OUT/input_spec.json says what to do before and after, as
tools/predict.py does. R-CNN (Mask R-CNN): detectron2's tracing export, outputs boxes, classes,
28x28 mask probabilities, scores (at the input resolution) and image_size; loading model.ts
needs `import torchvision` first (its nms op). The comparison with PyTorch on random images is
written to OUT/export_report.json (for semantic models at two sizes, one not a multiple of 32);
the command exits 1 when an export fails, when a semantic model's exported logits differ from
PyTorch's by more than MAX_LOGIT_DIFF, or when an R-CNN reproduces under MIN_MATCH_RATE of
PyTorch's detections. An ONNX file that could only be exported for a fixed size says so. Without
MODEL.WEIGHTS the model has random weights (a warning says so). See d2seg/export.py and
docs/own_data.md.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIN_MATCH_RATE = 0.9  # R-CNN: share of PyTorch's detections the exported model must reproduce
# semantic models: largest |exported - PyTorch| logit allowed on the check images (fp32 traces
# and ONNX Runtime agree to about 1e-5 .. 1e-4 on them)
MAX_LOGIT_DIFF = 1e-2


def _format(text: str) -> str:
    if text not in ("torchscript", "onnx"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not torchscript or onnx (KEY VALUE overrides go last, after an option "
            f"other than --format, which takes every word up to the next option)")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be an integer >= 32 (a traceable image), got {value}")
    return value


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--format", nargs="+", default=["torchscript", "onnx"], type=_format,
                   metavar="{torchscript,onnx}")
    p.add_argument("--height", type=_positive, default=256,
                   help="example input height for tracing (>= 32)")
    p.add_argument("--width", type=_positive, default=256,
                   help="example input width for tracing (>= 32)")
    p.add_argument("--check-images", nargs="+", default=[], metavar="IMG",
                   help="compare on these images (read as predict.py reads them, "
                        "test-resized): R-CNN instead of random ones, semantic models besides "
                        "them")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p


def input_spec(cfg) -> dict:
    """What the exported model expects of its input, which ``tools/predict.py`` does before
    and after the model (written to OUT/input_spec.json)."""
    lo, hi = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    resize = (f"resize the image (bilinear) so that its shorter side is {lo} px and its longer "
              f"at most {hi} px (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), run the model, then "
              f"resize its output to the original size (semantic logits: bilinear; R-CNN: "
              f"scale the boxes)" if lo > 0 else
              "the image at its own size (INPUT.MIN_SIZE_TEST 0: no test resize)")
    inf = cfg.D2SEG.INFERENCE
    tta = [name for name, on in (("sliding windows " + str(tuple(inf.SLIDING_WINDOW.SIZE)),
                                  min(inf.SLIDING_WINDOW.SIZE) > 0),
                                 ("horizontal flip", inf.FLIP), ("90-degree rotations", inf.ROT90),
                                 ("scales " + str(tuple(inf.SCALES)),
                                  tuple(inf.SCALES) != (1.0,)),
                                 ("MODEL.SEM_SEG_POSTPROCESS (threshold, morphology, regions)",
                                  cfg.MODEL.SEM_SEG_POSTPROCESS.ENABLED))
           if on]
    from d2seg.data.image_io import IntensityScaling

    scaling = IntensityScaling.from_cfg(cfg)
    intensity = {"scaling": scaling.mode,
                 "how": f"images with more than 8 bits (16-bit / float) become 0-255 by "
                        f"{scaling.describe()}, values outside clipped; 8-bit images as they are"}
    if scaling.mode != "minmax":
        intensity["window" if scaling.mode == "window" else "percentiles"] = \
            [scaling.low, scaling.high]
    return {"channel_order": cfg.INPUT.FORMAT, "value_range": [0, 255],
            "layout": f"({len(cfg.MODEL.PIXEL_MEAN)}, H, W)", "intensity": intensity,
            "min_size_test": lo, "max_size_test": hi, "resize": resize,
            "not_exported": (", ".join(tta) + ": predict.py does these around the model "
                             "(averages its logits over the views; post-processes the "
                             "average), the exported model is one pass returning logits")
            if tta else "",
            "classes": _classes(cfg)}


def _class_key(cfg) -> str:
    """The metadata list naming the model's outputs: R-CNN detects things, the semantic
    models label stuff."""
    return "thing_classes" if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" \
        else "stuff_classes"


def _classes(cfg) -> list:
    """The class names of the model's outputs, from its first test (else train) dataset."""
    from detectron2.data import MetadataCatalog

    from d2seg.data.register import register_datasets_from_cfg

    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        return []
    try:  # D2SEG.DATASETS.REGISTER entries (the builtin ones are registered on import)
        register_datasets_from_cfg(cfg, data_optional=True)
    except Exception:  # noqa: BLE001 - the export does not need the data; no names then
        return []
    return list(getattr(MetadataCatalog.get(names[0]), _class_key(cfg), None) or [])


def _check_images(cfg, paths) -> list:
    """--check-images as the model takes them: read as predict.py reads (INPUT.FORMAT,
    INPUT.INTENSITY), test-resized; a path that is no file stops with one line (a KEY VALUE
    override placed right after the option is taken as an image)."""
    import numpy as np
    import torch
    from detectron2.data import transforms as T

    from d2seg.data.image_io import IntensityScaling, read_image

    missing = [p for p in paths or [] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"export_model.py: error: --check-images: no such file {missing[0]!r} "
                         f"(KEY VALUE overrides go last, after an option other than "
                         f"--check-images)")
    images = []
    lo = int(cfg.INPUT.MIN_SIZE_TEST)
    aug = T.ResizeShortestEdge([lo, lo], cfg.INPUT.MAX_SIZE_TEST) if lo > 0 else None
    scaling = IntensityScaling.from_cfg(cfg)
    for path in paths or []:
        try:
            img = read_image(path, format=cfg.INPUT.FORMAT, scale=True, scaling=scaling)
        except Exception as e:  # noqa: BLE001 - a truncated or non-image file: named
            raise SystemExit(f"export_model.py: error: --check-images: {path} cannot be read "
                             f"({type(e).__name__}: {e})") from e
        img = aug.get_transform(img).apply_image(img) if aug else img
        if img.ndim == 2:
            img = img[:, :, None]
        images.append(torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))))
    return images


def main(argv=None) -> list:
    args = get_parser().parse_args(argv)
    import d2seg  # noqa: F401  (registers models)
    from detectron2.modeling import GeneralizedRCNN, build_model
    from detectron2.modeling.meta_arch.panoptic_fpn import PanopticFPN
    from detectron2.utils.logger import setup_logger

    from d2seg.checkpoint import load_weights
    from d2seg.config import load_config_or_exit
    from d2seg.export import export_rcnn, export_semantic
    from d2seg.inference import cpu_fallback, is_semantic_model

    setup_logger(name="d2seg")
    setup_logger(name="fvcore")
    from d2seg.utils.files import writable_dir_problem

    cfg = load_config_or_exit(args.config_file, args.opts, "export_model.py", data_optional=True)
    problem = writable_dir_problem(args.output)  # before the model is built and traced
    if problem:
        raise SystemExit(f"export_model.py: error: --output: {problem}")
    cfg = cpu_fallback(cfg, "exporting")
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS, complete=True, context="MODEL.WEIGHTS")
    else:
        print("export_model.py: warning: MODEL.WEIGHTS is empty: exporting random weights",
              file=sys.stderr)
    images = _check_images(cfg, args.check_images)
    if is_semantic_model(model):
        results = export_semantic(model, args.output, args.height, args.width, args.format,
                                  check_images=images)
    elif isinstance(model, GeneralizedRCNN) and not isinstance(model, PanopticFPN):
        results = export_rcnn(model, args.output, args.height, args.width, args.format,
                              check_images=images)
    else:
        raise SystemExit(f"export of {type(model).__name__} is not supported (semantic models "
                         "and GeneralizedRCNN only)")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "export_report.json"), "w") as f:
        json.dump(results, f, indent=1)
    spec = input_spec(cfg)
    with open(os.path.join(args.output, "input_spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    if not spec["classes"]:
        print("export_model.py: warning: input_spec.json names no classes (the config's "
              "dataset is not registered here or has no class names)", file=sys.stderr)
    print(f"input: {spec['resize']}")
    failed = False
    for r in results:
        status = f"ERROR {r['error']}" if r["error"] else f"max |diff| {r['max_abs_diff']:.3g}"
        if "match_rate" in r and not r["error"]:
            status += f", detections matched {100 * r['match_rate']:.1f}% {r['detections']}"
            if r["match_rate"] < MIN_MATCH_RATE:
                status += f" (below {100 * MIN_MATCH_RATE:.0f}%)"
                failed = True
        if "match_rate" in r and not r["error"] and not any(r["detections"]):
            status += " (no detection on the check images: only the empty output was compared)"
        if "match_rate" not in r and not r["error"]:  # semantic logits: compared directly
            if not r["max_abs_diff"] <= MAX_LOGIT_DIFF:  # NaN / inf fail too
                status += f" (above {MAX_LOGIT_DIFF:g}: the exported model computes otherwise)"
                failed = True
            if not r["dynamic"]:
                status += f" (fixed {args.height}x{args.width} input: resize images to it)"
        failed = failed or bool(r["error"])
        print(f"{r['format']:12s} {r['path']}  {status}")
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    from d2seg.config import ConfigError

    try:
        main()
    except ConfigError as e:  # e.g. MODEL.WEIGHTS of another model: file, key and value
        sys.exit(f"export_model.py: error: {e}")
