#!/usr/bin/env python
"""Predict on images with a trained d2seg / detectron2 model.

    python tools/predict.py --config-file CFG --input IMG|FOLDER|"GLOB" [...] --output OUT \\
        [--score-threshold 0.5] [--scales S ...] [--sliding-window H W [--overlap 0.25]] [--flip] [--rot90] \\
        [--dataset NAME] [--coco-json JSON] [--no-overlays] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

Writes OUT/overlays/*.png and, by model type, OUT/coco_instances_results.json (instances),
OUT/sem_seg/*.png label maps (semantic) or OUT/panoptic/*.png + OUT/panoptic.json (panoptic);
see d2seg/inference/writer.py. Class names and COCO category ids come from --dataset (default:
the config's first DATASETS.TEST, else TRAIN); image ids of the COCO results from --coco-json
(matched by file name; default: the dataset's json_file, or for a split made by val_fraction
the unsplit json), else the input's index (an image missing from a given json gets an id above
its largest, with a warning).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _overlap(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _window_side(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {text}")
    return v


def _scale(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number (KEY VALUE overrides go last, after an option other "
            f"than --scales, which takes every word up to the next option)") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a factor > 0, got {text}")
    return v


# (argparse names the type in "invalid <type> value" errors)
_overlap.__name__, _window_side.__name__, _scale.__name__ = "overlap", "window side", "scale"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders or glob patterns (quote globs)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="minimum score of instances drawn and written")
    p.add_argument("--sliding-window", type=_window_side, nargs=2, metavar=("H", "W"), default=None,
                   help="semantic models: window size in pixels (D2SEG.INFERENCE.SLIDING_WINDOW)")
    p.add_argument("--overlap", type=_overlap, default=None,
                   help="sliding-window overlap share, in [0, 1) (default: the config's, 0.25)")
    p.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--scales", type=_scale, nargs="+", default=None, metavar="S",
                   help="semantic models: multi-scale test, e.g. 0.75 1 1.25 "
                        "(D2SEG.INFERENCE.SCALES; it takes every word up to the next option)")
    p.add_argument("--rot90", action="store_true",
                   help="semantic models: also average the 90/180/270-degree rotations")
    p.add_argument("--dataset", default="", help="registered dataset giving classes and ids")
    p.add_argument("--coco-json", default="", help="COCO json giving image ids by file name")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    import d2seg  # noqa: F401  (registers datasets and models)
    from d2seg.config import load_config_or_exit
    from d2seg.inference.run import predict_from_args

    from d2seg.utils.files import writable_dir_problem

    # a bad config: one line; a dataset entry whose files are not on this machine is fine
    # (its class names are all prediction needs)
    load_config_or_exit(args.config_file, args.opts, "predict.py", data_optional=True)
    problem = writable_dir_problem(args.output)  # before the model is built and loaded
    if problem:
        sys.exit(f"predict.py: error: --output: {problem}")
    return predict_from_args(args)


if __name__ == "__main__":
    from d2seg.config import ConfigError
    from d2seg.data.errors import DatasetLoadError

    try:
        main()
    except (ConfigError, DatasetLoadError, FileNotFoundError) as e:  # named file, key, value
        sys.exit(f"predict.py: error: {e}")
