"""Few-iteration train + eval through train_net's own code path (d2seg.engine.main)."""
import json
import math
import os

import pytest

import d2seg  # noqa: F401
from d2seg.engine import default_argument_parser, main

from conftest import REPO

TINY = [
    "D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", "3", "D2SEG.SHAPES.IMAGE_SIZE", "128",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2",
    "TEST.NUM_VIS", "2",
]


def run(config, out, *extra, flags=()):
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, config), *flags, "OUTPUT_DIR", str(out), *TINY, *extra]
    )
    return main(args)


def test_mask_rcnn_train_eval(tmp_path):
    # (score threshold 0: a 3-iteration model's detections reach the results file)
    res = run("configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml", tmp_path,
              "SOLVER.MAX_ITER", "3", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
              "TEST.DETECTIONS_PER_IMAGE", "20")
    assert set(res) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(res[task])
        for v in res[task].values():
            assert math.isnan(v) or 0 <= v <= 100
    assert os.path.isfile(tmp_path / "model_final.pth")
    assert len(os.listdir(tmp_path / "vis")) == 2
    # the COCO results the evaluator wrote load in pycocotools
    from pycocotools.coco import COCO
    from detectron2.data import MetadataCatalog

    preds = json.load(open(tmp_path / "inference" / "shapes_instance_val" / "coco_instances_results.json"))
    assert preds and {"bbox", "segmentation", "score", "category_id"} <= set(preds[0])
    COCO(MetadataCatalog.get("shapes_instance_val").json_file).loadRes(preds)


def test_panoptic_fpn_train_eval(tmp_path):
    res = run("configs/Shapes-PanopticSegmentation/panoptic_fpn_R_18_cpu.yaml", tmp_path,
              "SOLVER.MAX_ITER", "3")
    assert {"panoptic_seg", "sem_seg", "bbox", "segm"} <= set(res)
    pq = res["panoptic_seg"]
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert 0 <= pq[k] <= 100, (k, pq[k])
    assert 0 <= res["sem_seg"]["mIoU"] <= 100


def test_resume_continues_from_last_checkpoint(tmp_path):
    cfg = "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml"
    common = ["SOLVER.CHECKPOINT_PERIOD", "2", "TEST.NUM_VIS", "0", "DATASETS.TEST", "()"]
    run(cfg, tmp_path, "SOLVER.MAX_ITER", "4", *common)
    with open(tmp_path / "last_checkpoint") as f:
        assert f.read().strip() == "model_final.pth"
    import torch

    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 3
    run(cfg, tmp_path, "SOLVER.MAX_ITER", "6", *common, flags=["--resume"])
    log = open(tmp_path / "log.txt").read()
    assert "Starting training from iteration 4" in log
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 5
    # optimizer state and LR schedule are saved (and so resumed) with the weights
    assert "optimizer" in ckpt["trainer"]["_trainer"]
    assert "LRScheduler" in ckpt["trainer"]["hooks"]
    assert "Loading scheduler from state_dict" in log


@pytest.mark.parametrize("name, cls", [("SGD", "SGD"), ("ADAM", "Adam"), ("ADAMW", "AdamW")])
def test_optimizer_choice(name, cls):
    from d2seg.config import load_config
    from d2seg.engine import Trainer
    from torch import nn

    cfg = load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                      ["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", "0.001"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = Trainer.build_optimizer(cfg, model)
    assert type(opt).__name__ == cls and opt.param_groups[0]["lr"] == 0.001
    if name != "SGD":
        assert tuple(opt.param_groups[0]["betas"]) == (0.9, 0.999)
        cfg.defrost()
        cfg.SOLVER.BETAS = (0.8, 0.95)
        assert tuple(Trainer.build_optimizer(cfg, model).param_groups[0]["betas"]) == (0.8, 0.95)


def test_poly_lr_scheduler():
    """SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR": lr = base * (1 - it / MAX_ITER) ** power."""
    import torch

    from d2seg.config import get_cfg
    from d2seg.engine.trainer import Trainer

    cfg = get_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.POLY_LR_POWER = 100, 0, 0.9
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = Trainer.build_lr_scheduler(cfg, opt)
    for it in range(1, 91):
        opt.step()
        sched.step()
        if it in (25, 60, 90):
            assert opt.param_groups[0]["lr"] == pytest.approx((1 - it / 100) ** 0.9, abs=1e-6)


def test_eval_with_tta_semantic(tmp_path):
    """TEST.AUG.ENABLED: train_net evaluates again with flips + rotations, keyed "sem_seg_TTA"."""
    res = run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, "SOLVER.MAX_ITER", "2",
              "MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3", "TEST.NUM_VIS", "0",
              "TEST.AUG.ENABLED", "True", "D2SEG.INFERENCE.ROT90", "True")
    assert "sem_seg" in res and "sem_seg_TTA" in res
    assert 0 <= res["sem_seg_TTA"]["mIoU"] <= 100
    assert os.path.isdir(tmp_path / "inference_TTA")
    assert "Evaluating with test-time augmentation (SemanticSegmentorWithTTA)" in open(
        tmp_path / "log.txt").read()


def test_eval_only_in_a_training_folder_keeps_its_config_yaml(tmp_path):
    """--eval-only with post-processing overrides in the training run's folder used to rewrite
    its config.yaml, the file predict.py and export_model.py are told to take: predictions
    then came out post-processed without anyone asking."""
    opts = ("MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3", "TEST.NUM_VIS", "0")
    run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, "SOLVER.MAX_ITER", "1",
        *opts)
    trained = (tmp_path / "config.yaml").read_text()
    run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, *opts,
        "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
        "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True", flags=("--eval-only",))
    assert (tmp_path / "config.yaml").read_text() == trained
    import yaml

    evaluated = yaml.safe_load((tmp_path / "config_eval.yaml").read_text())
    assert evaluated["MODEL"]["SEM_SEG_POSTPROCESS"]["ENABLED"] is True
    assert "its config.yaml is kept" in (tmp_path / "log.txt").read_text()
    # evaluated as trained (--resume: the last checkpoint): no stale config_eval.yaml stays
    run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, "SOLVER.MAX_ITER", "1",
        *opts, flags=("--eval-only", "--resume"))
    assert not (tmp_path / "config_eval.yaml").exists()
    assert (tmp_path / "config.yaml").read_text() == trained
    # a run killed before its first periodic checkpoint has no last_checkpoint: its metrics
    # and checkpoints still mark the folder as a training run's
    os.remove(tmp_path / "last_checkpoint")
    run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, *opts,
        "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
        "MODEL.SEM_SEG_POSTPROCESS.ENABLED", "True", flags=("--eval-only",))
    assert (tmp_path / "config.yaml").read_text() == trained


def test_eval_only_keeps_the_recorded_random_seed(tmp_path):
    """SEED -1 draws a seed recorded in OUTPUT_DIR/config.yaml for --resume; --eval-only in
    that folder rewrites the file and must keep it (else a later --resume reorders the data)."""
    from d2seg.config import get_cfg
    from d2seg.engine.train_loop import _fix_seed

    (tmp_path / "config.yaml").write_text("SEED: 123\n")

    def seed(**kw):
        cfg = get_cfg()
        cfg.OUTPUT_DIR, cfg.SEED = str(tmp_path), -1
        _fix_seed(cfg, **kw)
        return cfg.SEED

    assert seed(resume=True) == 123 and seed(resume=False, eval_only=True) == 123
    assert len({seed(resume=False) for _ in range(3)} | {123}) > 1  # a new training: new seed


def test_resume_with_another_freeze_stops_before_rewriting_config_yaml(tmp_path):
    """A --resume without the run's D2SEG.FINETUNE.FREEZE would fail in torch's optimizer
    loading after config.yaml was rewritten; it stops first, naming both values."""
    from d2seg.config import ConfigError, load_config
    from d2seg.engine.train_loop import _check_resume_matches

    cfg = load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                      ["OUTPUT_DIR", str(tmp_path)])
    recorded = {"D2SEG": {"FINETUNE": {"FREEZE": ["backbone\\."]}}}
    _check_resume_matches(cfg, recorded)  # no checkpoint in the folder: a fresh start
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")
    with pytest.raises(ConfigError, match=r"--resume: D2SEG.FINETUNE.FREEZE \[\] differs from "
                                          r"the run .*\['backbone"):
        _check_resume_matches(cfg, recorded)
    cfg.D2SEG.FINETUNE.FREEZE = ["backbone\\."]
    _check_resume_matches(cfg, recorded)


def test_a_fine_tuning_config_without_weights_is_warned_about(caplog):
    """The _frozenbn config is the zoo network made for loading a checkpoint: from random
    initialization its FrozenBN stays the identity and the stem never trains."""
    from d2seg.config import load_config
    from d2seg.engine.train_loop import _warn_frozen_from_scratch

    cfg = load_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                         "mask_rcnn_R_50_FPN_1x_frozenbn.yaml"))
    with caplog.at_level("WARNING", logger="d2seg"):
        _warn_frozen_from_scratch(cfg)
    assert "MODEL.WEIGHTS is empty) with MODEL.RESNETS.NORM FrozenBN (never updated) and " \
           "MODEL.BACKBONE.FREEZE_AT 2" in caplog.text
    caplog.clear()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = "x.pth"
    _warn_frozen_from_scratch(cfg)
    cfg = load_config(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/"
                                         "mask_rcnn_R_50_FPN_1x.yaml"))
    _warn_frozen_from_scratch(cfg)
    assert caplog.text == ""


def test_eval_only_without_weights_is_an_error(tmp_path):
    """--eval-only with an empty MODEL.WEIGHTS scored an untrained model and exited 0."""
    from d2seg.config import ConfigError

    opts = ("MODEL.UNET.BASE_CHANNELS", "8", "MODEL.UNET.DEPTH", "3", "TEST.NUM_VIS", "0")
    with pytest.raises(ConfigError, match="--eval-only: no weights to evaluate: MODEL.WEIGHTS "
                                          "is empty .*or --resume"):
        run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, *opts,
            flags=("--eval-only",))
    with pytest.raises(ConfigError, match=f"MODEL.WEIGHTS is empty and {tmp_path} has no "
                                          f"last_checkpoint"):
        run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path, *opts,
            flags=("--eval-only", "--resume"))


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    from d2seg.config import ConfigError

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="OUTPUT_DIR: '.*f' is a file, not a folder"):
        run("configs/Shapes-SemanticSegmentation/unet_cpu.yaml", tmp_path / "f")
