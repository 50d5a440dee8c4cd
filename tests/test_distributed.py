"""Two-process training on CPU (gloo) through detectron2's ``launch``, as ``--num-gpus 2``
does on a machine without GPUs."""
import os

import pytest
import torch

from conftest import REPO

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


def test_two_processes_on_gloo(tmp_path):
    from detectron2.engine import launch
    from detectron2.engine.launch import _find_free_port

    opts = ["D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", str(NUM_VAL),
            "D2SEG.SHAPES.IMAGE_SIZE", "96", "INPUT.MIN_SIZE_TRAIN", "(96,)",
            "INPUT.MIN_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
            "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0",
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
