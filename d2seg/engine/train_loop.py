"""What ``tools/train_net.py`` runs: ``setup(args)`` and ``main(args)``, importable for tests.

Usage is detectron2's::

    python tools/train_net.py --config-file configs/... [--eval-only] [--resume]
        [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import CfgNode, ConfigError, load_config, naming_config_file
from ..data.catalogs import register_shapes_from_cfg
from ..data.checks import DatasetCheckError, run_pre_training_checks
from ..data.errors import DatasetLoadError
from ..data.image_io import IntensityScaling, set_intensity_scaling
from ..data.register import register_datasets_from_cfg
from . import fast_paths
from .trainer import Trainer

logger = logging.getLogger("d2seg")

__all__ = ["setup", "main", "default_argument_parser", "launch", "run", "USER_ERRORS"]


def _recorded_config(cfg: CfgNode, resume: bool, eval_only: bool) -> Dict[str, Any]:
    """``OUTPUT_DIR/config.yaml`` as the run being resumed (or evaluated in its training
    folder) recorded it, before this run's ``default_setup`` rewrites it; {} otherwise."""
    prev = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not (resume or eval_only) or not os.path.isfile(prev):
        return {}
    import yaml

    try:
        with open(prev) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _recorded_cpu_amp(cfg: CfgNode, recorded: Dict[str, Any]) -> Optional[bool]:
    """Whether the recorded CPU run trained in bf16 (True / False), or None where there is
    nothing to follow: no record, another device, another AMP request, or a pinned choice."""
    if not recorded or os.environ.get(fast_paths.CPU_BF16_SPEEDUP_ENV):
        return None
    if str(cfg.D2SEG.SPEED.AMP_DTYPE).strip().lower() != "auto" or \
            cfg.D2SEG.get("DETERMINISTIC", False):  # deterministic: fp32, as a new decision
        return None
    try:
        if recorded["MODEL"]["DEVICE"] != "cpu":
            return None
        enabled = bool(recorded["SOLVER"]["AMP"]["ENABLED"])
        dtype = str(recorded["D2SEG"]["SPEED"]["AMP_DTYPE"]).lower()
    except (KeyError, TypeError):
        return None
    return enabled and dtype == "bfloat16"


def adapt_to_hardware(cfg: CfgNode, recorded: Optional[Dict[str, Any]] = None
                      ) -> List[Tuple[int, str]]:
    """Run where we are: CPU when CUDA is absent; AMP on CPU only as bf16 autocast, where
    ``D2SEG.SPEED.AMP_DTYPE`` asks for it or ("auto") it measured faster than fp32 on this CPU
    (:func:`d2seg.engine.fast_paths.cpu_bf16_speedup`). A resumed CPU run (``recorded``: the
    config it wrote; also ``--eval-only`` in its folder) keeps the precision it trained in
    instead of measuring again.

    Returns what it changed and why, as ``(logging level, message)`` pairs, for the caller to
    log (``setup`` logs them once the log file exists)."""
    said: List[Tuple[int, str]] = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        said.append((logging.WARNING, f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not "
                                      "available: running on CPU"))
        cfg.MODEL.DEVICE = "cpu"
    keep = _recorded_cpu_amp(cfg, recorded or {}) if cfg.MODEL.DEVICE == "cpu" else None
    if comm.get_world_size() > 1:  # rank 0's reading (another rank may read after rank 0
        keep = comm.all_gather(keep)[0]  # rewrote config.yaml): one path for all
    if cfg.SOLVER.AMP.ENABLED and keep is not None:
        # a new measurement could switch precision in the middle of a run (the bf16 probe's
        # ratio moves with the CPU's other load)
        said.append((logging.INFO, f"SOLVER.AMP.ENABLED {keep} on CPU"
                     f"{' (bf16 autocast)' if keep else ''}: the precision recorded in "
                     f"{os.path.join(cfg.OUTPUT_DIR, 'config.yaml')} by the run in this folder"))
        cfg.SOLVER.AMP.ENABLED = keep
        if keep:
            cfg.D2SEG.SPEED.AMP_DTYPE = "bfloat16"
    elif cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        # the outcome is written into the config, so config.yaml records the precision the
        # run trained in (and --resume / --eval-only of that file do not measure again)
        dtype, notes = fast_paths.resolve_amp(cfg)
        if comm.get_world_size() > 1:  # one precision for every process: rank 0's measurement
            rank0_bf16 = comm.all_gather(dtype is not None)[0]
            if rank0_bf16 != (dtype is not None):
                notes.append(f"rank 0 chose {'bf16' if rank0_bf16 else 'fp32'}; all ranks follow")
                dtype = torch.bfloat16 if rank0_bf16 else None
        if dtype is None:  # a warning where a dtype CPUs cannot run was asked for
            asked_fp16 = str(cfg.D2SEG.SPEED.AMP_DTYPE).strip().lower() in ("float16", "fp16")
            said.append((logging.WARNING if asked_fp16 else logging.INFO,
                         "SOLVER.AMP.ENABLED turned off: " + "; ".join(notes)))
            cfg.SOLVER.AMP.ENABLED = False
        else:
            said.append((logging.INFO, "SOLVER.AMP.ENABLED on CPU: "
                         + ("; ".join(notes) or "D2SEG.SPEED.AMP_DTYPE bfloat16")))
            cfg.D2SEG.SPEED.AMP_DTYPE = "bfloat16"
    return said


def set_deterministic(cfg: CfgNode) -> None:
    """Deterministic kernels (``D2SEG.DETERMINISTIC``); identical runs also need ``SEED >= 0``."""
    if cfg.SEED < 0:
        logger.warning("D2SEG.DETERMINISTIC is set but SEED < 0: runs will still differ")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _fix_seed(cfg: CfgNode, resume: bool, eval_only: bool = False,
              recorded: Optional[Dict[str, Any]] = None) -> None:
    """Replace ``SEED = -1`` (random) by a concrete seed that ends up in ``config.yaml``.

    The data order is a function of the seed, so a ``--resume``d run can only continue the
    same order if it knows the seed: it reuses the one recorded in ``OUTPUT_DIR/config.yaml``.
    ``--eval-only`` keeps the recorded seed too (its config goes to ``config_eval.yaml`` in
    a training folder, or to ``config.yaml`` in a folder no training wrote), so that no
    evaluation changes the data order of a later ``--resume``. All processes of a distributed
    run use rank 0's choice.
    ``recorded``: that file as :func:`_recorded_config` read it (read here when not given).
    """
    if cfg.SEED >= 0:
        return
    if recorded is None:
        recorded = _recorded_config(cfg, resume, eval_only)
    try:
        seed = int(recorded.get("SEED", -1))
    except (TypeError, ValueError):
        seed = -1
    if seed < 0:
        seed = int.from_bytes(os.urandom(4), "little") % (2**31 - 1)
    seed = comm.all_gather(seed)[0] if comm.get_world_size() > 1 else seed
    cfg.SEED = seed


def _check_resume_matches(cfg: CfgNode, recorded: Dict[str, Any]) -> None:
    """A ``--resume`` whose ``D2SEG.FINETUNE.FREEZE`` differs from the run it continues would
    fail in torch's optimizer loading (other parameter groups), after ``config.yaml`` was
    rewritten: stop first, in one line, naming both values."""
    if not recorded or not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    try:
        before = list(recorded["D2SEG"]["FINETUNE"]["FREEZE"] or [])
    except (KeyError, TypeError):
        return
    now = list(cfg.D2SEG.FINETUNE.FREEZE)
    if before != now:
        raise ConfigError(
            f"--resume: D2SEG.FINETUNE.FREEZE {now} differs from the run in {cfg.OUTPUT_DIR} "
            f"({before}, its config.yaml): the optimizer state holds other parameters; resume "
            f"with D2SEG.FINETUNE.FREEZE \"{tuple(before)}\" (or the run's config.yaml as "
            f"--config-file), or train anew in another OUTPUT_DIR")


def _read_training_config(cfg: CfgNode) -> Optional[str]:
    """The text of ``OUTPUT_DIR/config.yaml`` where a training run wrote it (its folder has a
    ``last_checkpoint``, a ``metrics.json`` or a checkpoint: a run killed before its first
    periodic checkpoint has the latter two), on the main process; else None."""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not (comm.is_main_process() and os.path.isfile(path)):
        return None
    trained = any(n in ("last_checkpoint", "metrics.json") or
                  (n.startswith("model_") and n.endswith(".pth"))
                  for n in os.listdir(cfg.OUTPUT_DIR))
    if not trained:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _restore_training_config(cfg: CfgNode, kept: Optional[str]) -> str:
    """After detectron2's ``default_setup`` wrote this ``--eval-only`` config over a training
    run's ``config.yaml`` (``kept``): move it to ``config_eval.yaml`` and put the training
    config back, so that the file the docs say to predict and export with keeps what was
    trained (an evaluation with ``MODEL.SEM_SEG_POSTPROCESS`` overrides changed it silently).
    Returns the path of ``config_eval.yaml``, or "" where nothing was moved."""
    if kept is None:
        return ""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    moved = os.path.join(cfg.OUTPUT_DIR, "config_eval.yaml")
    with open(path) as f:
        now = f.read()
    if now == kept:  # evaluated as trained: an older evaluation's file would mislead
        if os.path.isfile(moved):
            os.remove(moved)
        return ""
    with open(moved, "w") as f:
        f.write(now)
    with open(path, "w") as f:
        f.write(kept)
    return moved


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from ``args.config_file`` + ``args.opts``, adapted to the hardware, frozen.

    Also runs detectron2's ``default_setup`` (logging, output dir, config dump, seeding) and
    registers the shapes catalogs with ``cfg.D2SEG.SHAPES``.
    """
    cfg = load_config(args.config_file, args.opts)
    resume, eval_only = bool(getattr(args, "resume", False)), bool(getattr(args, "eval_only", False))
    recorded = _recorded_config(cfg, resume, eval_only)  # read once, before it is rewritten
    if resume and not eval_only:
        _check_resume_matches(cfg, recorded)  # before default_setup rewrites config.yaml
    adapted = adapt_to_hardware(cfg, recorded)
    _fix_seed(cfg, resume=resume, eval_only=eval_only, recorded=recorded)
    cfg.freeze()
    if eval_only and not cfg.MODEL.WEIGHTS and not (
            resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        # said before the dataset checks and the model build
        raise ConfigError(
            "--eval-only: no weights to evaluate: MODEL.WEIGHTS is empty" +
            (f" and {cfg.OUTPUT_DIR} has no last_checkpoint" if resume else
             " (give MODEL.WEIGHTS path/model_final.pth, or --resume to take OUTPUT_DIR's "
             "last checkpoint)") + "; an untrained model's metrics would mean nothing")
    if cfg.OUTPUT_DIR:  # on every rank: each writes its own log (the probe is per process)
        from ..utils.files import writable_dir_problem

        problem = writable_dir_problem(cfg.OUTPUT_DIR)
        if problem:  # detectron2's default_setup would fail with a bare PermissionError
            raise ConfigError(f"OUTPUT_DIR: {problem}")
    kept = _read_training_config(cfg) if eval_only else None
    default_setup(cfg, args)
    eval_config = _restore_training_config(cfg, kept)
    if cfg.D2SEG.DETERMINISTIC:
        set_deterministic(cfg)
    register_shapes_from_cfg(cfg)
    # d2seg's own log lines (dataset checks, fine-tuning, hooks) to the console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2seg",
                 abbrev_name="d2seg")
    for level, msg in adapted:  # said before the log file existed: into it now
        logger.log(level, msg)
    if eval_config:
        logger.info(f"--eval-only in a training run's folder: its config.yaml is kept (what "
                    f"predict.py and export_model.py take); this evaluation's config is "
                    f"{eval_config}")
    register_datasets_from_cfg(cfg)  # D2SEG.DATASETS.REGISTER (d2seg/data/register.py)
    # INPUT.INTENSITY for every reader of this process and its loader workers (detectron2's
    # DatasetMapper, the visualizer; d2seg's semantic mapper is also given it)
    set_intensity_scaling(IntensityScaling.from_cfg(cfg))
    return cfg


def _warn_frozen_from_scratch(cfg: CfgNode) -> None:
    """Training without MODEL.WEIGHTS a backbone that is made to be loaded (FrozenBN, frozen
    stages): its normalisation stays at the identity and the frozen stages at random values."""
    if cfg.MODEL.WEIGHTS or "resnet" not in cfg.MODEL.BACKBONE.NAME:
        return
    frozen = []
    if cfg.MODEL.RESNETS.NORM == "FrozenBN":
        frozen.append("MODEL.RESNETS.NORM FrozenBN (never updated)")
    if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
        frozen.append(f"MODEL.BACKBONE.FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT} (the stem and "
                      f"first stages never train)")
    if frozen:
        logger.warning(f"Training from random initialization (MODEL.WEIGHTS is empty) with "
                       f"{' and '.join(frozen)}: these settings are for fine-tuning a "
                       f"pre-trained checkpoint; set MODEL.WEIGHTS to a local one, or use a "
                       f"from-scratch config (configs/Base-Scratch.yaml: GN, FREEZE_AT 0)")


def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Train (or evaluate with ``--eval-only``); return the last evaluation results.

    In distributed runs, the results are returned on the main process (None elsewhere).
    """
    cfg = setup(args)
    if args.eval_only:
        with naming_config_file(args.config_file, args.opts):  # file or command line, key, value
            run_pre_training_checks(cfg, eval_only=True)  # DATASETS.TEST only
            model = Trainer.build_model(cfg)
        load_eval_weights(model, cfg, resume=args.resume)
        res = Trainer.test(cfg, model)
    else:
        _warn_frozen_from_scratch(cfg)
        if cfg.SOLVER.WARMUP_ITERS >= cfg.SOLVER.MAX_ITER and cfg.SOLVER.WARMUP_FACTOR < 1:
            logger.warning(f"SOLVER.WARMUP_ITERS {cfg.SOLVER.WARMUP_ITERS} >= SOLVER.MAX_ITER "
                           f"{cfg.SOLVER.MAX_ITER}: the whole run stays in the learning-rate "
                           f"warm-up (below SOLVER.BASE_LR {cfg.SOLVER.BASE_LR:g}); shorten it "
                           f"for a short run")
        with naming_config_file(args.config_file, args.opts):  # file or command line, key, value
            run_pre_training_checks(cfg)  # D2SEG.DATASETS.CHECK (d2seg/data/checks.py)
            trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        model = trainer.model
        res = getattr(trainer, "_last_eval_results", None)
    if cfg.TEST.AUG.ENABLED and len(cfg.DATASETS.TEST):
        res = dict(res or {})
        res.update(Trainer.test_with_TTA(cfg, model))
    if comm.is_main_process():
        if res and cfg.TEST.EXPECTED_RESULTS:
            verify_results(cfg, res)
        if cfg.TEST.NUM_VIS > 0 and len(cfg.DATASETS.TEST):
            from ..utils.visualize import visualize_predictions

            out = os.path.join(cfg.OUTPUT_DIR, "vis")
            model = model.module if hasattr(model, "module") else model
            paths = visualize_predictions(cfg, model, cfg.DATASETS.TEST[0], out, cfg.TEST.NUM_VIS)
            logger.info("Wrote %d visualizations (prediction | ground truth) to %s", len(paths), out)
    return res


def load_eval_weights(model: torch.nn.Module, cfg: CfgNode, resume: bool = False) -> None:
    """``--eval-only``'s weights: ``MODEL.WEIGHTS`` (or, with ``resume``, the last checkpoint of
    ``OUTPUT_DIR``) through :class:`d2seg.checkpoint.FinetuneCheckpointer` (also torchvision
    ResNets; one line for skipped tensors).

    Raises:
        ValueError: when tensors of the file have other shapes than the model's, or parameters
            of the model are not in it: the model would be evaluated with randomly
            initialised layers (usually another ``NUM_CLASSES`` or meta-architecture than the
            checkpoint was trained with); see :func:`d2seg.checkpoint.require_complete_weights`.
    """
    from ..checkpoint import FinetuneCheckpointer, require_complete_weights

    ck = FinetuneCheckpointer(model, save_dir=cfg.OUTPUT_DIR, for_inference=True)
    ck.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    if ck.last_summary:
        require_complete_weights(ck.last_summary, model, "--eval-only")


#: errors whose message names the file, the key and the value: ``tools/train_net.py`` prints
#: them in one line (no traceback), from the main process or from a launched worker
USER_ERRORS: Tuple[type, ...] = (ConfigError, DatasetCheckError, DatasetLoadError)
#: exit status of a launched worker that printed one of USER_ERRORS
USER_ERROR_EXIT = 3


def _end_process_group() -> None:
    """After a finished run of several processes: wait for every rank, then take the process
    group down before the interpreter exits (left to exit, gloo's teardown could abort a rank
    whose peer was already gone: "terminate called without an active exception", a SIGABRT
    that made a finished run exit 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


def _main_in_worker(args: argparse.Namespace, prog: str) -> Optional[Dict[str, Any]]:
    """``main`` in a process started by ``launch``: a user error is printed there in one line
    and the process exits with USER_ERROR_EXIT (torch would otherwise hand the parent the
    whole traceback as text, and the parent would print it)."""
    try:
        result = main(args)
        _end_process_group()
        return result
    except USER_ERRORS as e:
        world = comm.get_world_size()
        where = f" (process {comm.get_rank()} of {world})" if world > 1 else ""
        print(f"{prog}: error{where}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT)


def run(args: argparse.Namespace, prog: str = "train_net.py") -> Optional[Dict[str, Any]]:
    """``main`` through detectron2's ``launch`` (multi-GPU / multi-machine per ``args``).

    Raises:
        USER_ERRORS: in a single process, as ``main`` raises them.
        SystemExit: with USER_ERROR_EXIT, when a launched worker stopped on one of
            USER_ERRORS; the worker has printed it as ``<prog>: error (process r of n): ...``.
    """
    if args.num_gpus * args.num_machines <= 1:
        return launch(main, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    from torch.multiprocessing import ProcessExitedException

    try:
        return launch(_main_in_worker, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url,
                      args=(args, prog))
    except ProcessExitedException as e:
        if e.exit_code == USER_ERROR_EXIT:
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
