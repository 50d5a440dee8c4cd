#!/usr/bin/env python
"""Measure d2seg models against reference implementations of the same networks, side by
side in one process (same batch, size, precision): train step alone, train_net loop with real
data loading, inference latency / throughput, peak memory; optional scaling table.

    python tools/benchmark.py --preset gpu-semantic          # issue 7 targets, one GPU
    python tools/benchmark.py --preset gpu-maskrcnn
    python tools/benchmark.py --preset gpu-panoptic
    python tools/benchmark.py --preset cpu-smoke             # a quick check without GPU
    python tools/benchmark.py --config-file configs/Shapes-SemanticSegmentation/unet.yaml \\
        --batch 2 --size 256 --refs plain_unet,smp_unet_r34 --json out.json
    python tools/benchmark.py --preset gpu-semantic D2SEG.SPEED.COMPILE off  # opts: config
    python tools/benchmark.py --config-file CFG --scaling --scaling-only --mem-cap-gb 8
    python tools/benchmark.py --preset cpu-record --compare OLD.json  # did a change regress?
    python tools/benchmark.py --compare OLD.json --against NEW.json  # two earlier runs

Writes a JSON (machine, versions, date, every setting, raw timings, ratios, targets) and
prints a markdown table. Trailing KEY VALUE pairs override config keys of every case, e.g. to
switch a fast path (D2SEG.SPEED.*) on or off; the references read the same config (plain
detectron2 is that config, plain_unet takes its width and depth, the reference losses its loss
names), so network-changing keys change both sides. See docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401  (registers datasets and models)
from d2seg.benchmark.compare import compare_results, format_comparison  # noqa: E402
from d2seg.benchmark.harness import Case, Settings, format_report, run_benchmark  # noqa: E402
from d2seg.benchmark.presets import PRESETS, get_preset  # noqa: E402
from d2seg.benchmark.references import reference_names  # noqa: E402
from d2seg.config import ConfigError, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _size(text: str):
    parts = [int(x) for x in text.lower().replace("x", " ").split()]
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"size '{text}': use S, HxW or 'H W'")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _names(text: str):
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str):
    try:
        return [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': comma-separated integers expected")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named run (docs/benchmarks.md)")
    ap.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    ap.add_argument("--config-file", default="", help="a d2seg config (one case)")
    ap.add_argument("--name", default="", help="the case's name (default: the config's)")
    ap.add_argument("--refs", type=_names, default=None, metavar="A,B",
                    help=f"references, comma-separated: 'auto' (by meta-architecture), 'none', "
                         f"or names of {', '.join(reference_names())}")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    ap.add_argument("--batch", type=_positive, default=None)
    ap.add_argument("--size", type=_size, default=None, help="S or HxW of the synthetic batch")
    ap.add_argument("--iters", type=_positive, default=None, help="train steps per timed round")
    ap.add_argument("--warmup", type=int, default=None, help="untimed train steps first")
    ap.add_argument("--repeats", type=_positive, default=None, help="timed rounds (interleaved)")
    ap.add_argument("--infer-batch", type=int, default=None, help="inference throughput batch")
    ap.add_argument("--infer-iters", type=_positive, default=None)
    ap.add_argument("--latency-iters", type=_positive, default=None)
    ap.add_argument("--loop-iters", type=int, default=None,
                    help="timed train_net loop iterations (0: no loop)")
    ap.add_argument("--loop-warmup", type=int, default=None)
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--lr", type=float, default=None, help="SOLVER.BASE_LR of every subject")
    ap.add_argument("--instances-per-image", type=int, default=None,
                    help="objects per synthetic image (instance / panoptic)")
    ap.add_argument("--statistic", choices=("median", "min"), default=None,
                    help="img/s from the median or the best (min) timed round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (0: default)")
    ap.add_argument("--ref-backend", choices=("plain", "same"), default=None,
                    help="references' cuDNN benchmark / TF32: 'plain' (PyTorch defaults, TF32 "
                         "as d2seg's) or 'same' (all of d2seg's switches)")
    ap.add_argument("--profile-steps", type=int, default=None, metavar="N",
                    help="profile N train steps of every subject (GPU busy fraction, top ops)")
    ap.add_argument("--verbose", action="store_true", help="keep detectron2's INFO logging")
    ap.add_argument("--scaling", action="store_true", help="also run the scaling table")
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling table")
    ap.add_argument("--scaling-sizes", type=_ints, default=None, metavar="S,S",
                    help="square sides of the scaling table, comma-separated")
    ap.add_argument("--scaling-batches", type=_ints, default=None, metavar="N,N")
    ap.add_argument("--scaling-refs", type=_names, default=None, metavar="A,B",
                    help="references also measured in the scaling table")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="CPU: memory cap for the largest batch (peak RSS increase)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch tried")
    ap.add_argument("--compare", default="", metavar="OLD.json",
                    help="compare this run with an earlier one: the ratios of each run "
                         "always, absolute numbers on the same machine (docs/benchmarks.md)")
    ap.add_argument("--against", default="", metavar="NEW.json",
                    help="with --compare: compare two earlier runs, measuring nothing")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="--compare: relative change counted as a regression (default 0.05)")
    ap.add_argument("--fail-on-regression", action="store_true",
                    help="--compare: exit with status 3 when a number regressed, a "
                         "reference of the baseline did not run, or the settings differ")
    ap.add_argument("--json", default="", help="JSON file to write (default: "
                    "output/benchmark/<preset or config>_<device>_<time>.json)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                    help="KEY VALUE config overrides of every case (the references built "
                         "from the config follow them)")
    return ap


def plan(args):
    """(cases, settings, targets, scaling kwargs or None, label) from the arguments."""
    if args.preset:
        p = get_preset(args.preset)
        cases, settings, targets, scaling = p.cases, p.settings, p.targets, p.scaling
        label = args.preset
        if args.config_file:
            raise SystemExit("benchmark.py: error: give --preset or --config-file, not both")
    elif args.config_file:
        name = args.name or os.path.splitext(os.path.basename(args.config_file))[0]
        cases, settings, targets, label = [Case(name, args.config_file)], Settings(), [], name
        scaling = {"config_file": args.config_file}
    else:
        raise SystemExit("benchmark.py: error: give --preset NAME or --config-file FILE "
                         "(--list-presets lists the presets)")
    if args.refs is not None:
        refs = None if args.refs == ["auto"] else ([] if args.refs == ["none"] else args.refs)
        from d2seg.benchmark.references import REFERENCES

        unknown = [r for r in refs or [] if r not in REFERENCES and r != "plain_d2"]
        if unknown:
            raise SystemExit(f"benchmark.py: error: --refs {','.join(unknown)}: not a reference "
                             f"(choose from auto, none, plain_d2, {', '.join(REFERENCES)})")
        for c in cases:
            c.references = refs
    over = {"device": args.device, "precision": args.precision, "batch": args.batch,
            "size": args.size, "iters": args.iters, "warmup": args.warmup,
            "repeats": args.repeats, "infer_batch": args.infer_batch,
            "infer_iters": args.infer_iters, "latency_iters": args.latency_iters,
            "loop_iters": args.loop_iters, "loop_warmup": args.loop_warmup, "lr": args.lr,
            "statistic": args.statistic, "threads": args.threads,
            "ref_backend": args.ref_backend, "instances_per_image": args.instances_per_image,
            "profile_steps": args.profile_steps}
    for k, v in over.items():
        if v is not None:
            setattr(settings, k, v)
    if args.no_inference:
        settings.inference = False
    if args.verbose:
        settings.quiet = False
    if settings.device == "cuda" and args.device is None:
        import torch

        if not torch.cuda.is_available():
            print("[benchmark] this preset is for CUDA but no GPU is visible: running on CPU "
                  "(the numbers are not the targets')", flush=True)
            settings.device = "cpu"
            if settings.precision == "fp16" and args.precision is None:
                # CPU fp16 autocast is unusably slow or unsupported (sparse ROIAlign gradient)
                print("[benchmark] fp16 on CPU: running bf16 instead (--precision to choose)",
                      flush=True)
                settings.precision = "bf16"
    settings.opts = list(args.opts)
    if args.scaling or args.scaling_only:
        scaling = dict(scaling or {"config_file": cases[0].config_file,
                                   "opts": cases[0].opts})
        for key, val in (("sizes", args.scaling_sizes), ("batches", args.scaling_batches),
                         ("references", args.scaling_refs), ("max_batch", args.max_batch)):
            if val is not None:
                scaling[key] = val
        if args.mem_cap_gb is not None:
            scaling["mem_cap_mb"] = args.mem_cap_gb * 1024
        elif settings.device.startswith("cpu") or settings.device == "auto":
            scaling.setdefault("mem_cap_mb", 4096.0)
    else:
        scaling = None
    return cases, settings, targets, scaling, label


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, p in PRESETS.items():
            print(f"{name}: {p.description}")
        return {}
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    baseline = _load_compare(args)
    if args.against:  # two earlier runs: nothing to measure
        return _report_comparison(baseline, _read_json(args.against, "--against"), args)
    cases, settings, targets, scaling, label = plan(args)
    try:  # a device this machine lacks: one line, before anything is built
        from d2seg.benchmark.harness import resolve_device

        resolve_device(settings.device)
    except RuntimeError as e:
        msg = str(e) if str(e).startswith("--device") else f"--device {settings.device}: {e}"
        raise SystemExit(f"benchmark.py: error: {msg}")
    try:  # fail fast, in one line, on a bad config or override
        for c in cases:
            cfg_file = c.config_file if os.path.isfile(c.config_file) else \
                os.path.join(REPO, c.config_file)
            load_config(cfg_file, list(c.opts) + list(settings.opts))
    except ConfigError as e:
        raise SystemExit(f"benchmark.py: error: {e}")
    if args.scaling_only:
        cases = []
    result = run_benchmark(cases, settings, targets if cases else [], preset=label,
                           scaling=scaling)
    result["command"] = " ".join([os.path.basename(sys.argv[0] or "benchmark.py")]
                                 + list(argv if argv is not None else sys.argv[1:]))
    path = args.json or os.path.join(
        REPO, "output", "benchmark",
        f"{label}_{result['settings']['device'].replace(':', '')}_"
        f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    if baseline is not None:
        result["comparison"] = compare_results(baseline, json.loads(json.dumps(result,
                                               default=str)), args.tolerance)
        result["comparison"]["old"]["file"] = args.compare
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print()
    print(format_report(result))
    if baseline is not None:
        print()
        print(format_comparison(result["comparison"]))
    print(f"JSON: {path}")
    if baseline is not None and args.fail_on_regression:
        _fail_on_regression(result["comparison"])
    failed = failed_parts(result)
    if failed:  # recorded in the JSON, the other cases measured; the run did not succeed
        print(f"benchmark.py: {len(failed)} part(s) failed: {', '.join(failed)} (their errors "
              f"are in {path})", file=sys.stderr)
        raise SystemExit(4)
    return result


def failed_parts(result: dict) -> list:
    """What failed in a run: a case, or d2seg's train_net loop or inference in a case (the
    targets that need them say "not measured"; the run did not succeed)."""
    out = []
    for c in result["cases"]:
        if "error" in c:
            out.append(c["name"])
            continue
        if isinstance(c.get("loop"), dict) and "error" in c["loop"]:
            out.append(f"{c['name']} (train_net loop)")
        if "inference_error" in (c.get("d2seg") or {}):
            out.append(f"{c['name']} (d2seg inference)")
    return out


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"benchmark.py: error: {flag} {path}: {e}")
    if not isinstance(data, dict) or "cases" not in data or "settings" not in data:
        raise SystemExit(f"benchmark.py: error: {flag} {path}: not a tools/benchmark.py JSON "
                         f"(no 'cases' / 'settings')")
    return data


def _load_compare(args):
    """The baseline of --compare (None without it), read before minutes of measuring."""
    if not args.compare:
        if args.against:
            raise SystemExit("benchmark.py: error: --against NEW.json needs --compare OLD.json")
        return None
    if args.tolerance < 0:
        raise SystemExit(f"benchmark.py: error: --tolerance {args.tolerance}: must be >= 0")
    return _read_json(args.compare, "--compare")


def _report_comparison(old: dict, new: dict, args) -> dict:
    cmp = compare_results(old, new, args.tolerance)
    cmp["old"]["file"], cmp["new"]["file"] = args.compare, args.against
    print(format_comparison(cmp))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(cmp, f, indent=1, default=str)
        print(f"JSON: {args.json}")
    if args.fail_on_regression:
        _fail_on_regression(cmp)
    return cmp


def _fail_on_regression(cmp: dict) -> None:
    """``--fail-on-regression``: exit 3 on a regression, and also when the run could not be
    checked against the baseline: a reference of the baseline that did not run (its ratios and
    targets went unchecked), or other settings (no row compared like for like)."""
    why = []
    if cmp["regressions"]:
        why.append(f"{cmp['regressions']} regression(s)")
    if cmp["missing_references"]:
        why.append(f"{cmp['missing_references']} reference(s) of the baseline did not run")
    if cmp["settings_differ"]:
        why.append("the settings differ from the baseline's: " + ", ".join(cmp["settings_differ"]))
    if why:
        print(f"benchmark.py: --fail-on-regression: {'; '.join(why)}", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
