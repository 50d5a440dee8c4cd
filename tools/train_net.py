#!/usr/bin/env python
"""Train or evaluate any d2seg / detectron2 model; detectron2's usual command line.

    python tools/train_net.py --config-file configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue from last_checkpoint
    python tools/train_net.py --config-file CFG --num-gpus 8      # DDP on one machine
    python tools/train_net.py --config-file CFG --num-gpus 8 --num-machines 2 --machine-rank 0 \\
        --dist-url tcp://<host-of-rank-0>:29500

Trailing ``KEY VALUE`` pairs override config keys. Without a GPU it runs on the CPU.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2seg  # noqa: E402,F401  (registers datasets and models)
from d2seg.config import load_config_or_exit  # noqa: E402
from d2seg.engine import default_argument_parser, run  # noqa: E402
from d2seg.engine.train_loop import USER_ERRORS  # noqa: E402

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # fail fast, in one line, before any process is launched
    cfg = load_config_or_exit(args.config_file, args.opts, "train_net.py",
                              ("DATASETS.TEST",) if args.eval_only else
                              ("DATASETS.TRAIN", "DATASETS.TEST"))
    world = args.num_gpus * args.num_machines
    batch, ref = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE
    # with REFERENCE_WORLD_SIZE, detectron2 scales the batch to world / ref times itself
    share, by = (ref, f"SOLVER.REFERENCE_WORLD_SIZE {ref}") if ref else \
        (world, f"the {world} processes (--num-gpus {args.num_gpus} x --num-machines "
                f"{args.num_machines}), each of which takes an equal share")
    if not args.eval_only and (ref or world > 1) and batch % share:
        sys.exit(f"train_net.py: error: SOLVER.IMS_PER_BATCH {batch} is not divisible by {by}")
    try:
        run(args)
    # a bad value found while building the model, loader, optimizer or loading MODEL.WEIGHTS,
    # or data the pre-training checks refuse: the message names file, key and value (a
    # launched worker prints its own and exits; run() then exits with its status)
    except USER_ERRORS as e:
        sys.exit(f"train_net.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: where --resume would continue, not a traceback
        if args.eval_only:
            sys.exit("\ntrain_net.py: interrupted")
        last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        name = open(last).read().strip() if os.path.isfile(last) else ""
        print("\ntrain_net.py: interrupted; " + (
            f"--resume continues from {os.path.join(cfg.OUTPUT_DIR, name)}" if name else
            f"no checkpoint was written yet (SOLVER.CHECKPOINT_PERIOD "
            f"{cfg.SOLVER.CHECKPOINT_PERIOD}): --resume would start over"), file=sys.stderr)
        sys.exit(130)
