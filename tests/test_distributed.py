"""Two-process training on CPU (gloo) through detectron2's ``launch``, as ``--num-gpus 2``
does on a machine without GPUs."""
import os

import pytest
import torch

from conftest import REPO, toy_nan_model

CFG = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
NUM_VAL = 4


def _worker(out: str, opts):
    import d2seg  # noqa: F401
    from d2seg.engine import Trainer, default_argument_parser, setup
    from detectron2.utils import comm

    args = default_argument_parser().parse_args(["--config-file", CFG, "OUTPUT_DIR", out, *opts])
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with the distributed evaluation on shapes_instance_val
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               os.path.join(out, f"weights_rank{comm.get_rank()}.pth"))
    torch.save({"world_size": comm.get_world_size(), "ddp": hasattr(trainer.model, "module")},
               os.path.join(out, f"info_rank{comm.get_rank()}.pth"))


@pytest.mark.parametrize("check", ["step", "lagged"])
def test_two_processes_on_gloo(tmp_path, check):
    """``check``: D2SEG.NONFINITE.CHECK ("lagged" is the CUDA default: the non-finite flag is
    all-reduced without waiting and read one step later, on every rank alike). The "step" run
    reads its data through a loader worker per rank (packed samples, "file_system" sharing:
    the defaults with workers)."""
    workers = "1" if check == "step" else "0"
    from detectron2.engine import launch
    from detectron2.engine.launch import _find_free_port

    opts = ["D2SEG.NONFINITE.CHECK", check, "D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", str(NUM_VAL),
            "D2SEG.SHAPES.IMAGE_SIZE", "96", "INPUT.MIN_SIZE_TRAIN", "(96,)",
            "INPUT.MIN_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
            "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", workers, "TEST.NUM_VIS", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    launch(_worker, 2, num_machines=1, machine_rank=0,
           dist_url=f"tcp://127.0.0.1:{_find_free_port()}", args=(str(tmp_path), opts))
    infos = [torch.load(tmp_path / f"info_rank{r}.pth") for r in (0, 1)]
    assert all(i["world_size"] == 2 and i["ddp"] for i in infos)
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pth") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:  # DDP kept every parameter and buffer identical across ranks
        assert torch.equal(w0[k], w1[k]), k
    # evaluation gathered the predictions of both ranks (2 images each) on rank 0
    preds = torch.load(tmp_path / "inference" / "shapes_instance_val" / "instances_predictions.pth",
                       weights_only=False)
    assert sorted(p["image_id"] for p in preds) == list(range(NUM_VAL))


def _nan_worker(out: str, opts):
    import d2seg  # noqa: F401
    from d2seg.engine import Trainer, default_argument_parser, setup
    from d2seg.engine.train_step import NonFiniteLossError
    from detectron2.utils import comm

    args = default_argument_parser().parse_args(
        ["--config-file", CFG, "OUTPUT_DIR", out, "MODEL.META_ARCHITECTURE", "ToyNaNOnRank1",
         *opts])
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
        msg = "no error"
    except NonFiniteLossError as e:
        msg = str(e)
    with open(os.path.join(out, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(msg)
    comm.synchronize()  # both files written before either process tears down
    torch.distributed.destroy_process_group()


def _rank1_second_call(calls: int) -> bool:
    from detectron2.utils import comm

    return comm.get_rank() == 1 and calls == 1


# the spawned workers import this module too, which registers the model there
toy_nan_model("ToyNaNOnRank1", _rank1_second_call)


def _launch_nan_run(out: str, opts) -> None:
    from detectron2.engine import launch
    from detectron2.engine.launch import _find_free_port

    launch(_nan_worker, 2, num_machines=1, machine_rank=0,
           dist_url=f"tcp://127.0.0.1:{_find_free_port()}", args=(out, opts))


@pytest.mark.parametrize("check", ["step", "lagged"])
def test_a_nan_on_one_rank_stops_every_rank(tmp_path, check):
    """The non-finite flag is all-reduced: a NaN loss on rank 1 alone stops both ranks at the
    same iteration (a rank that went on would hang in the next collective)."""
    import multiprocessing as mp

    opts = ["D2SEG.NONFINITE.CHECK", check, "D2SEG.SHAPES.NUM_TRAIN", "8",
            "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "64",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "6",
            "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0", "DATASETS.TEST", "()"]
    proc = mp.get_context("spawn").Process(target=_launch_nan_run, args=(str(tmp_path), opts))
    proc.start()
    proc.join(timeout=240)
    if proc.is_alive():  # a rank went on and waits in a collective
        proc.terminate()
        proc.join()
        pytest.fail("a rank did not stop on the other rank's NaN loss (hung)")
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert "iteration 1" in msgs[1] and "loss_toy=nan" in msgs[1], msgs
    assert "iteration 1" in msgs[0] and "a loss on another rank" in msgs[0], msgs
    if check == "lagged":
        assert all("'lagged'" in m for m in msgs)


SEM_CFG = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")


def _compiled_worker(out: str, opts):
    import d2seg  # noqa: F401
    from d2seg.engine import Trainer, default_argument_parser, fast_paths, setup
    from detectron2.utils import comm

    from d2seg.engine import hooks as d2seg_hooks

    args = default_argument_parser().parse_args(["--config-file", SEM_CFG, "OUTPUT_DIR", out,
                                                 *opts])
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    init = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # each rank's BatchNorm statistics right before SyncAcrossRanks averages them
    before_sync = {}
    average = d2seg_hooks.average_norm_statistics

    def spy(m):
        before_sync.update({k: v.detach().clone() for k, v in m.state_dict().items()
                            if k.endswith("running_mean")})
        return average(m)

    d2seg_hooks.average_norm_statistics = spy
    trainer.train()
    compiled = fast_paths.compiled_modules(model)
    torch.save({"weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "init": init, "params": [n for n, _ in model.named_parameters()], "ddp": hasattr(trainer.model, "module"),
                "compiled": len(compiled), "failed": [c["failed"] for c in compiled if c["failed"]],
                "before_sync": before_sync, "rng_states": trainer.rank_rng_states},
               os.path.join(out, f"rank{comm.get_rank()}.pth"))


def test_two_processes_with_compiled_modules(tmp_path):
    """``--num-gpus 2`` with ``D2SEG.SPEED.COMPILE`` on: the compiled sub-modules (backbone,
    head) sit inside DDP, whose gradient hooks must still fire after the compiled backward.
    Each rank trains on its own images; identical weights after the run mean the gradients
    were all-reduced. The weights also match an eager two-process run ("aot_eager": dynamo
    and AOTAutograd's graphs, no C++ compilation)."""
    from detectron2.engine import launch
    from detectron2.engine.launch import _find_free_port

    base = ["SEED", "3", "D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.IMAGE_SIZE", "64",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(64, 64)",
            "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3", "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
            "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "TEST.NUM_VIS", "0",
            "D2SEG.PLOT_CURVES", "False", "D2SEG.DETERMINISTIC", "True"]
    runs = {}
    for name, extra in (("compiled", ["D2SEG.SPEED.COMPILE", "on",
                                      "D2SEG.SPEED.COMPILE_BACKEND", "aot_eager"]),
                        ("eager", ["D2SEG.SPEED.COMPILE", "off"])):
        out = tmp_path / name
        launch(_compiled_worker, 2, num_machines=1, machine_rank=0,
               dist_url=f"tcp://127.0.0.1:{_find_free_port()}", args=(str(out), base + extra))
        runs[name] = [torch.load(out / f"rank{r}.pth") for r in (0, 1)]
    c0, c1 = runs["compiled"]
    assert c0["ddp"] and c0["compiled"] == 2 and not c0["failed"] and not c1["failed"]
    assert runs["eager"][0]["compiled"] == 0
    w0, w1, we = c0["weights"], c1["weights"], runs["eager"][0]["weights"]
    for k in c0["params"]:
        assert torch.equal(w0[k], w1[k]), k  # all-reduced gradients: the ranks agree
    # the ranks saw different images (their BatchNorm statistics differed before the last
    # step's sync), so equal weights are the all-reduce's doing; after the sync both ranks
    # hold the mean statistics, which model_final.pth saved
    b0, b1 = c0["before_sync"], c1["before_sync"]
    assert b0 and any(not torch.equal(b0[k], b1[k]) for k in b0)
    final = torch.load(tmp_path / "compiled" / "model_final.pth", weights_only=False)
    for k in b0:
        assert torch.allclose(w0[k], (b0[k] + b1[k]) / 2, atol=1e-6) and torch.equal(w0[k], w1[k])
        assert torch.equal(final["model"][k], w0[k])
    # every rank's RNG states are in the checkpoint, for --resume to give each its own
    it, states = c0["rng_states"]
    assert it == 2 and len(states) == 2 and len(final["trainer"]["rng_per_rank"]) == 2
    assert not torch.equal(final["trainer"]["rng_per_rank"][0]["torch"], final["trainer"]["rng_per_rank"][1]["torch"])
    assert torch.equal(final["trainer"]["rng_per_rank"][1]["torch"], c1["rng_states"][1][1]["torch"])
    for k in w0:
        assert torch.allclose(w0[k].float(), we[k].float(), rtol=1e-4, atol=1e-5), k
    init = c0["init"]
    assert all(torch.equal(init[k], runs["eager"][0]["init"][k]) for k in init)  # same start
    assert sum(not torch.equal(w0[k], init[k]) for k in w0) > len(w0) // 2  # it trained


def test_an_error_in_a_launched_worker_is_one_line(tmp_path):
    """``--num-gpus 2`` with MODEL.WEIGHTS that fit nothing: the ConfigError is raised inside
    the workers (at loading), yet the terminal gets it in one line, not torch's
    ProcessRaisedException with the worker's traceback as text."""
    import subprocess
    import sys

    from detectron2.engine.launch import _find_free_port

    from d2seg.engine.train_loop import USER_ERROR_EXIT

    bad = tmp_path / "other.pth"
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, bad)
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools/train_net.py"), "--num-gpus", "2",
         # a free port: detectron2's default one is fixed per user (another run holds it)
         "--dist-url", f"tcp://127.0.0.1:{_find_free_port()}", "--config-file", CFG, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", str(bad),
         "D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", "4", "D2SEG.SHAPES.IMAGE_SIZE",
         "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == USER_ERROR_EXIT, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("train_net.py: error")]
    assert errors and all(f"of 2): {bad}: none of its 1 tensors fits the model" in ln
                          for ln in errors), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "ProcessRaisedException" not in r.stderr
