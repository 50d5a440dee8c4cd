"""A training killed with SIGKILL and resumed ends exactly where an uninterrupted one does, and
two runs with a fixed seed are identical (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO

CFG = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
OPTS = ["D2SEG.SHAPES.NUM_TRAIN", "16", "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "3", "SOLVER.STEPS", "(6,)",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "2", "SEED", "7",
        "D2SEG.DETERMINISTIC", "True", "TEST.NUM_VIS", "0", "DATASETS.TEST", "()"]


def _cmd(out, *flags):
    return [sys.executable, os.path.join(REPO, "tools/train_net.py"), "--config-file", CFG,
            *flags, "OUTPUT_DIR", str(out), *OPTS]


def _final(out):
    ck = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    return ck["iteration"], ck["model"], ck["trainer"]


def _losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["iteration"], r["total_loss"], r["lr"]) for r in rows if "total_loss" in r]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True, timeout=600)
    it_a, w_a, _ = _final(ref)
    assert it_a == 9 and _losses(ref)
    # (a second fresh run is not needed: the resumed run below must equal this one bit for
    # bit, which two runs differing from each other could not)

    # kill -9 once a few checkpoints exist (the kill may land in the middle of a write)
    p = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "model_0000005.pth").exists():
        assert p.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "model_final.pth").exists()
    last = (killed / "last_checkpoint").read_text().strip()
    done = torch.load(killed / last, weights_only=False)["iteration"]
    assert 3 <= done < 9  # the kill may land between a checkpoint and its last_checkpoint tag

    r = subprocess.run(_cmd(killed, "--resume"), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (killed / "log.txt").read_text()
    assert f"Starting training from iteration {done + 1}" in log
    it_c, w_c, state_c = _final(killed)
    assert it_c == 9
    # same weights as the uninterrupted run: same data order, LR schedule and optimizer state
    assert all(torch.equal(w_a[k], w_c[k]) for k in w_a), "resumed run diverged"
    assert state_c["hooks"]["LRScheduler"] == _final(ref)[2]["hooks"]["LRScheduler"]


def test_evaluating_does_not_change_training(tmp_path):
    """Evaluation at checkpoint iterations starts data loaders (their worker seeds come from
    torch's generator) and samples: the trainer undoes what the hooks draw, so a run that
    evaluates every 4 iterations trains exactly as one that does not, and a checkpoint's RNG
    states are the ones the next step starts from (what --resume restores)."""
    from d2seg.engine import default_argument_parser, main

    opts = [o for o in OPTS]
    i = opts.index("DATASETS.TEST")
    opts[i + 1] = "('shapes_instance_val',)"
    opts[opts.index("DATALOADER.NUM_WORKERS") + 1] = "0"
    weights = {}
    for period in (0, 4):
        out = tmp_path / f"eval{period}"
        args = default_argument_parser().parse_args(
            ["--config-file", CFG, "OUTPUT_DIR", str(out), *opts, "TEST.EVAL_PERIOD", str(period),
             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
        main(args)
        log = (out / "log.txt").read_text()
        assert log.count("Evaluation results for shapes_instance_val") == (3 if period else 1)
        weights[period] = _final(out)[1]
    assert all(torch.equal(weights[0][k], weights[4][k]) for k in weights[0])
