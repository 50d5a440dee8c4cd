#!/usr/bin/env python
"""Check datasets before training: the same checks train_net runs (D2SEG.DATASETS.CHECK).

    python tools/check_dataset.py --config-file CFG [--dataset NAME ...] [--json REPORT.json] \\
        [--fast] [KEY VALUE ...]

Checks DATASETS.TRAIN + DATASETS.TEST of the config (or the --dataset names; datasets of
D2SEG.DATASETS.REGISTER are registered first). Prints, per dataset, every problem with its file,
annotation id and value, the class frequencies and the NUM_CLASSES the data implies. Exit
status: 0 = no fatal problem, 1 = fatal problems (see d2seg/data/checks.py for which are fatal,
which annotations are skipped in training and which are warnings).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE")
    p.add_argument("--dataset", action="append", default=[],
                   help="registered dataset name (repeatable); default: the config's datasets")
    p.add_argument("--json", default="", help="also write the reports to this json file")
    p.add_argument("--fast", action="store_true", help="read image headers only (no decoding)")
    p.add_argument("--max-problems", type=int, default=50, help="problems printed per dataset")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import d2seg  # noqa: F401  (registers builtin datasets)

    from d2seg.config import load_config_or_exit
    from d2seg.data.checks import check_datasets_from_cfg
    from d2seg.data.errors import DatasetLoadError
    from d2seg.data.register import not_registered, register_datasets_from_cfg
    from detectron2.data import DatasetCatalog

    cfg = load_config_or_exit(args.config_file, args.opts, "check_dataset.py",
                              () if args.dataset else ("DATASETS.TRAIN", "DATASETS.TEST"))
    if args.json:  # before the checks, which can take minutes
        from d2seg.utils.files import writable_dir_problem

        problem = f"'{args.json}' is a folder, not a file" if os.path.isdir(args.json) else \
            writable_dir_problem(os.path.dirname(os.path.abspath(args.json)))
        if problem:
            print(f"check_dataset.py: error: --json: {problem}", file=sys.stderr)
            return 2
    cfg.freeze()
    from d2seg.data.catalogs import register_shapes_from_cfg

    register_shapes_from_cfg(cfg)  # the config's D2SEG.SHAPES sizes, not the defaults
    try:
        register_datasets_from_cfg(cfg)
    except DatasetLoadError as e:  # names the file and what to do
        print(f"check_dataset.py: error: {e}", file=sys.stderr)
        return 2
    known = DatasetCatalog.list()
    for n in args.dataset:
        if n not in known:
            hint = "" if args.config_file else \
                (" (datasets of D2SEG.DATASETS.REGISTER are registered from the --config-file "
                 "or a D2SEG.DATASETS.REGISTER override)")
            print(f"check_dataset.py: error: --dataset: {not_registered(n, known)}{hint}",
                  file=sys.stderr)
            return 2
    names = args.dataset or None
    # without a config there is no model to compare NUM_CLASSES and INPUT.MASK_FORMAT with
    reports = check_datasets_from_cfg(cfg, names, mode="warn", decode_images=not args.fast,
                                      log=False, compare_with_cfg=bool(args.config_file))
    if not reports:
        print("no dataset to check (give --dataset or a config with DATASETS.TRAIN/TEST)")
        return 1
    for r in reports:
        print(r.format(args.max_problems))
        print()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1, default=str)
    bad = [r.name for r in reports if not r.ok]
    print(f"{len(reports)} dataset(s) checked; fatal problems in: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
