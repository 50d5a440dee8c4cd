"""d2seg's training hooks (d2seg/engine/hooks.py) in isolation; the same hooks inside a real
training run are checked in test_real_data.py."""
import json
import logging
import operator
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

import d2seg  # noqa: F401
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks as d2hooks
from detectron2.utils.events import EventStorage

from d2seg.config import get_cfg
from d2seg.engine.hooks import (
    BestCheckpointer,
    PlotCurves,
    ValidationLoss,
    extend_hooks,
    plot_metrics_json,
)


class ToyModel(nn.Module):
    """Returns {"loss_a": mean(bn(x)^2), "loss_b": 2} in training; BN and dropout inside."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = self.drop(self.bn(x)) * self.w
        assert self.training
        return {"loss_a": (y ** 2).mean(), "loss_b": torch.tensor(2.0)}


def _trainer(model, it=9, max_iter=20):
    return SimpleNamespace(model=model, storage=EventStorage(it), iter=it, max_iter=max_iter)


def test_validation_loss_uses_eval_norm_and_restores_mode():
    torch.manual_seed(0)
    model = ToyModel().train()
    model.bn.running_mean.fill_(0.5)
    data = [[{"x": torch.randn(3)} for _ in range(2)] for _ in range(3)]
    hook = ValidationLoss(10, lambda: data)
    hook.trainer = _trainer(model)
    with hook.trainer.storage:
        hook.after_step()  # iteration 9 -> 10th: computed
        latest = hook.trainer.storage.latest()
    assert model.training and model.bn.training and model.drop.training
    assert torch.all(model.bn.running_mean == 0.5)  # statistics not updated
    with torch.no_grad():
        model.eval()
        xs = torch.stack([b["x"] for batch in data for b in batch])
        expect = (model.bn(xs) ** 2).mean().item()
    assert latest["val_loss_a"][0] == pytest.approx(expect, rel=1e-5)
    assert latest["val_loss_b"][0] == pytest.approx(2.0)
    assert latest["val_total_loss"][0] == pytest.approx(expect + 2.0, rel=1e-5)
    hook2 = ValidationLoss(10, lambda: data)
    hook2.trainer = _trainer(model, it=4)
    with hook2.trainer.storage:
        hook2.after_step()  # not a multiple of the period
        assert "val_total_loss" not in hook2.trainer.storage.latest()


def test_validation_loss_runs_once_at_the_last_iteration():
    """At the last iteration (a multiple of the period) the loss is computed once, by
    after_train, not also by after_step; an interrupted run (iter < max_iter - 1) computes none."""
    calls = []
    data = [[{"x": torch.randn(3)} for _ in range(2)]]
    hook = ValidationLoss(10, lambda: calls.append(1) or data)
    hook._compute = lambda: calls.append("c") or {}
    hook.trainer = _trainer(ToyModel().train(), it=19, max_iter=20)
    hook.after_step()
    hook.after_train()
    assert calls == ["c"]
    hook.trainer = _trainer(ToyModel().train(), it=12, max_iter=20)
    hook.after_train()
    assert calls == ["c"]


def test_best_checkpointer_keeps_last_checkpoint(tmp_path, caplog):
    model = nn.Linear(2, 2)
    ck = DetectionCheckpointer(model, str(tmp_path))
    ck.save("model_0000009")
    hook = BestCheckpointer(10, ck, "val_total_loss", "min")
    hook.trainer = _trainer(model)
    with hook.trainer.storage as st:
        st.put_scalars(val_total_loss=3.0, smoothing_hint=False)
        hook._best_checking()
        assert os.path.isfile(tmp_path / "model_best.pth")
        assert open(tmp_path / "last_checkpoint").read() == "model_0000009.pth"
        with torch.no_grad():
            model.weight.fill_(7)
        st.put_scalars(val_total_loss=5.0, smoothing_hint=False)  # worse: not saved
        hook._best_checking()
        best = torch.load(tmp_path / "model_best.pth", weights_only=False)
        assert not torch.all(best["model"]["weight"] == 7) and best["iteration"] == 9
        st.put_scalars(val_total_loss=1.0, smoothing_hint=False)  # better: saved
        hook._best_checking()
        assert torch.all(torch.load(tmp_path / "model_best.pth",
                                    weights_only=False)["model"]["weight"] == 7)
        assert open(tmp_path / "last_checkpoint").read() == "model_0000009.pth"
    # without any previous checkpoint, model_best is not what --resume would pick up
    other = tmp_path / "fresh"
    other.mkdir()
    ck2 = DetectionCheckpointer(model, str(other))
    hook = BestCheckpointer(10, ck2, "segm/AP", "max")
    hook.trainer = _trainer(model)
    with hook.trainer.storage as st:
        st.put_scalars(**{"segm/AP": 12.0}, smoothing_hint=False)
        hook._best_checking()
    assert os.path.isfile(other / "model_best.pth") and not ck2.has_checkpoint()


def _best_checking_log(tmp_path, metric: str, scalars):
    """(hook, what it logged) after one ``_best_checking`` with ``scalars`` in the storage."""
    model = nn.Linear(2, 2)
    hook = BestCheckpointer(10, DetectionCheckpointer(model, str(tmp_path)), metric, "max")
    hook.trainer = _trainer(model)
    records = []
    h = logging.Handler()
    h.emit = records.append
    hook._logger.addHandler(h)
    try:
        with hook.trainer.storage as st:
            st.put_scalars(**scalars, smoothing_hint=False)
            hook._best_checking()
    finally:
        hook._logger.removeHandler(h)
    return hook, " ".join(r.getMessage() for r in records)


def test_best_checkpointer_names_available_metrics(tmp_path):
    _, msg = _best_checking_log(tmp_path, "segm/APP", {"segm/AP": 1.0, "bbox/AP": 2.0})
    assert "'segm/APP' was not computed" in msg and "'segm/AP'" in msg
    assert not os.path.exists(tmp_path / "model_best.pth")


def test_best_checkpointer_says_why_a_nan_metric_saves_nothing(tmp_path):
    """segm/AP is NaN while a young model detects nothing: detectron2 skips it silently."""
    hook, msg = _best_checking_log(tmp_path, "segm/AP", {"segm/AP": float("nan")})
    assert "'segm/AP' is nan" in msg and "no model_best.pth" in msg
    assert not os.path.exists(tmp_path / "model_best.pth") and hook.best_metric is None


def test_extend_hooks_order_writer_last(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.DATASETS.TEST = ("isbi2012_membrane_val",)
    cfg.D2SEG.VAL_LOSS_PERIOD = 5
    cfg.D2SEG.BEST_CHECKPOINT.METRIC = "sem_seg/mIoU"
    trainer = SimpleNamespace(cfg=cfg, checkpointer=DetectionCheckpointer(nn.Linear(1, 1)))
    base = [d2hooks.IterationTimer(), d2hooks.EvalHook(0, lambda: {}),
            d2hooks.PeriodicWriter([])]
    out = extend_hooks(trainer, base)
    kinds = [type(h) for h in out]
    assert kinds == [d2hooks.IterationTimer, d2hooks.EvalHook, ValidationLoss, BestCheckpointer,
                     PlotCurves, d2hooks.PeriodicWriter]
    cfg.TEST.EVAL_PERIOD = 7

    def best(metric, mode="auto"):
        cfg.D2SEG.BEST_CHECKPOINT.METRIC, cfg.D2SEG.BEST_CHECKPOINT.MODE = metric, mode
        h = [h for h in extend_hooks(trainer, base) if isinstance(h, BestCheckpointer)]
        return ({operator.gt: "max", operator.lt: "min"}[h[0]._compare], h[0]._period,
                h[0]._val_metric)

    # a score every evaluation, a loss every validation-loss period, the larger / smaller kept
    assert best("sem_seg/mIoU") == ("max", 7, "sem_seg/mIoU")
    assert best("val_total_loss") == ("min", 5, "val_total_loss")
    assert best("val_total_loss", "max") == ("max", 5, "val_total_loss")  # as asked, warned
    assert best("segm/AP", "min") == ("min", 7, "segm/AP")
    cfg.D2SEG.VAL_LOSS_PERIOD = 0
    cfg.D2SEG.BEST_CHECKPOINT.METRIC = ""
    cfg.D2SEG.PLOT_CURVES = False
    assert extend_hooks(trainer, base) == base


def test_plot_metrics_json(tmp_path):
    lines = []
    for it in range(0, 100, 10):
        lines.append({"iteration": it, "total_loss": 3.0 / (it + 1), "loss_cls": 1.0 / (it + 1),
                      "lr": 0.01 * min(1, it / 20)})
    lines.append({"iteration": 49, "val_total_loss": 0.5, "sem_seg/mIoU": 40.0,
                  "sem_seg/IoU-cell": 60.0})
    lines.append({"iteration": 99, "val_total_loss": 0.3, "sem_seg/mIoU": 55.0})
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = plot_metrics_json(str(path), str(tmp_path / "curves.png"))
    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] > 3 * im.size[1] // 2  # three panels side by side


def test_a_mistyped_best_checkpoint_metric_is_reported_at_start(caplog):
    """Not only at the first evaluation (iteration 200 of the fruits config): when the hooks
    are built, with the close matches; the metrics of the configs' own settings pass."""
    import logging

    from d2seg.engine.hooks import _check_best_metric, evaluation_metric_names

    cfg = get_cfg()
    cfg.DATASETS.TEST = ("fruits_nuts_val",)
    cfg.MODEL.MASK_ON = True
    names, prefixes = evaluation_metric_names(cfg)
    assert "segm/AP" in names and "bbox/AP50" in names and "segm/AP-" in prefixes
    with caplog.at_level(logging.WARNING, logger="d2seg.engine.hooks"):
        for ok in ("segm/AP", "bbox/APl", "segm/AP-date", "val_total_loss"):
            _check_best_metric(cfg, ok)
        assert not caplog.records
        _check_best_metric(cfg, "segm/APx")
    assert "'segm/APx' is not among the metrics" in caplog.text and "'segm/AP'" in caplog.text
    cfg.DATASETS.TEST = ("isbi2012_membrane_val", "fruits_nuts_val")
    names, _ = evaluation_metric_names(cfg)
    assert "isbi2012_membrane_val/sem_seg/mIoU" in names
    assert "isbi2012_membrane_val/sem_seg_metrics/mDice" in names
    assert "fruits_nuts_val/segm/AP" in names
    # per-image Dice always, the surface distances with D2SEG.EVAL.SURFACE_DISTANCE
    cfg.DATASETS.TEST = ("isbi2012_membrane_val",)
    names, prefixes = evaluation_metric_names(cfg)
    assert "sem_seg_metrics/mDiceImg" in names and "sem_seg_metrics/DiceImg-" in prefixes
    assert "sem_seg_metrics/mHD95" not in names
    cfg.D2SEG.EVAL.SURFACE_DISTANCE = True
    names, prefixes = evaluation_metric_names(cfg)
    assert "sem_seg_metrics/mHD95" in names and "sem_seg_metrics/ASSD-" in prefixes


def test_best_checkpointer_remembers_its_best_across_a_resume(tmp_path):
    """The best value is part of the trainer's checkpoint: a resumed run keeps model_best.pth
    unless it beats it."""
    ck = DetectionCheckpointer(nn.Linear(1, 1), str(tmp_path))
    hook = BestCheckpointer(10, ck, "sem_seg/mIoU", "max")
    assert hook.state_dict() == {}
    hook.best_metric, hook.best_iter = 15.42, 9
    again = BestCheckpointer(10, ck, "sem_seg/mIoU", "max")
    again.load_state_dict(hook.state_dict())
    assert (again.best_metric, again.best_iter) == (15.42, 9)
    assert not again._compare(15.29, again.best_metric) and again._compare(15.5, again.best_metric)


def test_best_checkpointer_record_beats_an_older_checkpoint_state(tmp_path):
    """The periodic checkpoint of an iteration is saved before that iteration's evaluation, so
    its best value can be older than model_best.pth's: model_best.json, written with every new
    best, wins where better; a fresh run (start_iter 0) ignores it."""
    model = nn.Linear(2, 2)
    ck = DetectionCheckpointer(model, str(tmp_path))
    hook = BestCheckpointer(10, ck, "segm/AP", "max")
    hook.trainer = _trainer(model)
    with hook.trainer.storage as st:
        st.put_scalars(**{"segm/AP": 20.0}, smoothing_hint=False)
        hook._best_checking()
    rec = json.load(open(tmp_path / "model_best.json"))
    assert rec == {"metric": "segm/AP", "mode": "max", "best_metric": 20.0, "best_iter": 9}
    for start_iter, state, expect in ((10, {"best_metric": 15.0, "best_iter": 4}, 20.0),
                                      (10, {"best_metric": 25.0, "best_iter": 4}, 25.0),
                                      (10, {}, 20.0), (0, {}, None)):
        resumed = BestCheckpointer(10, ck, "segm/AP", "max")
        resumed.trainer = SimpleNamespace(start_iter=start_iter)
        resumed.load_state_dict(state)
        resumed.before_train()
        assert resumed.best_metric == expect, (start_iter, state)
    other = BestCheckpointer(10, ck, "segm/AP", "min")  # another mode: not its record
    other.trainer = SimpleNamespace(start_iter=10)
    other.before_train()
    assert other.best_metric is None


def test_resumed_processes_get_their_own_rng_states(monkeypatch, caplog):
    """A checkpoint with every process's RNG states gives each process its own; one from
    another world size (or older, with rank 0's only) gives rank 0's to all; hooks that run on
    rank 0 only (BestCheckpointer) are not looked for on the others."""
    from detectron2.utils import comm

    from d2seg.engine.trainer import Trainer

    class Inner:
        def load_state_dict(self, sd):
            pass

    def fresh():
        t = Trainer.__new__(Trainer)
        t._hooks, t._trainer = [], Inner()
        return t

    state = {"iteration": 9, "_trainer": {}, "rng": "rank0", "rng_per_rank": ["r0", "r1"],
             "hooks": {"BestCheckpointer": {"best_metric": 1.0, "best_iter": 3}}}
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    t = fresh()
    with caplog.at_level(logging.WARNING):
        t.load_state_dict(state)
    assert "Cannot find the hook" not in caplog.text
    assert t._loaded_rng_state == "r1" and t.iter == 9
    monkeypatch.setattr(comm, "get_world_size", lambda: 4)
    t = fresh()
    t.load_state_dict(state)
    assert t._loaded_rng_state == "rank0"


def test_validation_loss_is_pooled_over_processes(monkeypatch):
    """Each process computes its shard; the means are over every image of all of them (an
    uneven split weighs each image once, not each process)."""
    from detectron2.utils import comm

    model = ToyModel().train()
    data = [[{"x": torch.ones(3)} for _ in range(2)]]  # this rank: 2 images, loss_b = 2
    other = ({"loss_a": 30.0, "loss_b": 2.0 * 4}, 4)  # another rank: 4 images, sum of loss_a 30
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda mine: [mine, other])
    hook = ValidationLoss(10, lambda: data)
    hook.trainer = _trainer(model)
    with torch.no_grad():
        model.eval()
        mine_a = (model.bn(torch.ones(2, 3)) ** 2).mean().item() * 2
        model.train()
    with hook.trainer.storage:
        hook.after_step()
        latest = hook.trainer.storage.latest()
    assert latest["val_loss_a"][0] == pytest.approx((mine_a + 30.0) / 6, rel=1e-5)
    assert latest["val_loss_b"][0] == pytest.approx(2.0)


def test_sync_across_ranks_averages_at_checkpoint_iterations(monkeypatch):
    from detectron2.utils import comm

    from d2seg.engine import hooks

    calls = []
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda x: [x, x])
    monkeypatch.setattr(hooks, "average_norm_statistics", lambda m: calls.append(tr.iter + 1))
    tr = SimpleNamespace(iter=0, max_iter=10, model=torch.nn.Linear(1, 1))
    h = hooks.SyncAcrossRanks(4, [0])
    h.trainer = tr
    for i in range(10):
        tr.iter = i
        h.after_step()
    assert calls == [4, 8, 10]


def test_best_checkpoint_auto_mode_finds_loss_in_any_case():
    """MODE auto minimises a metric naming "loss" in any case ("val_Loss") and maximises others."""
    from d2seg.config import best_checkpoint_mode

    assert best_checkpoint_mode("val_Loss", "auto") == "min"
    assert best_checkpoint_mode("sem_seg/mIoU", "auto") == "max"
    # distances: lower is better
    assert best_checkpoint_mode("sem_seg_metrics/mHD95", "auto") == "min"
    assert best_checkpoint_mode("sem_seg_metrics/ASSD-fg", "auto") == "min"
    assert best_checkpoint_mode("sem_seg_metrics/mDiceImgSD", "auto") == "min"
    assert best_checkpoint_mode("sem_seg_metrics/mDiceImg", "auto") == "max"


@pytest.mark.parametrize("config", ["deeplabv3plus_cpu.yaml", "segformer_b0_cpu.yaml"])
def test_validation_loss_is_deterministic_with_dropout_and_stochastic_depth(config):
    """DeepLab's ASPP dropout and SegFormer's attention dropout and stochastic depth are off
    while the validation loss runs: the same weights and data give the same loss twice."""
    from detectron2.modeling import build_model

    from conftest import REPO
    from d2seg.config import load_config

    cfg = load_config(os.path.join(REPO, "configs/Shapes-SemanticSegmentation", config),
                      ["MODEL.DEVICE", "cpu", "MODEL.MIT.ATTN_DROP_RATE", "0.3",
                       "MODEL.MIT.DROP_PATH_RATE", "0.5", "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT",
                       "0.5"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    data = [[{"image": torch.rand(3, 64, 64) * 255,
              "sem_seg": torch.randint(0, 5, (64, 64))} for _ in range(2)]]
    hook = ValidationLoss(10, lambda: data)
    hook.trainer = _trainer(model)
    first, second = hook._compute(), hook._compute()
    assert first["val_total_loss"] == second["val_total_loss"]
    assert model.training and all(m.training for m in model.modules())


def test_validation_batches_do_not_log_into_the_training_iteration():
    """What the model logs itself during the validation forward (detectron2's R-CNN heads put
    accuracies and sample counts) stays out of the trainer's storage."""
    from detectron2.utils.events import get_event_storage

    class Logging(ToyModel):
        def forward(self, batch):
            get_event_storage().put_scalar("fast_rcnn/cls_accuracy", 0.123)
            return super().forward(batch)

    model = Logging().train()
    hook = ValidationLoss(10, lambda: [[{"x": torch.randn(3)} for _ in range(2)]])
    hook.trainer = _trainer(model)
    with hook.trainer.storage:
        hook.after_step()
        latest = hook.trainer.storage.latest()
    assert "val_total_loss" in latest and "fast_rcnn/cls_accuracy" not in latest


def test_validation_loss_runs_in_the_training_steps_precision():
    """With AMP the losses are computed under the step's autocast dtype (bf16 here), as the
    training losses they are compared with; without it in fp32."""
    from d2seg.engine.train_step import _AnyDeviceAMPTrainer

    seen = []

    class Recording(ToyModel):
        def forward(self, batch):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                        else None)
            return super().forward(batch)

    model = Recording().train()
    data = [[{"x": torch.randn(3)} for _ in range(2)]]
    for inner, want in ((SimpleNamespace(), None),
                        (_AnyDeviceAMPTrainer(model, data, torch.optim.SGD(model.parameters(),
                                                                         lr=0.1),
                                              precision=torch.bfloat16,
                                              grad_scaler=torch.amp.GradScaler("cpu",
                                                                               enabled=False)),
                         torch.bfloat16)):
        hook = ValidationLoss(10, lambda: data)
        hook.trainer = _trainer(model)
        hook.trainer._trainer = inner
        seen.clear()
        hook._compute()
        assert seen == [want]


def test_validation_loss_loader_reads_images_as_training_does():
    """detectron2's DatasetMapper in the validation-loss loader is marked as build_mapper
    marks it (a grey model's 16-bit images scaled, not clipped, as in training)."""
    from d2seg.config import load_config
    from d2seg.data.build import _ImageFileMapper
    from d2seg.engine.hooks import build_val_loss_loader

    from conftest import REPO

    cfg = load_config(os.path.join(
        REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml"),
        ["D2SEG.SHAPES.NUM_TRAIN", "4", "D2SEG.SHAPES.NUM_VAL", "2",
         "D2SEG.SHAPES.IMAGE_SIZE", "64", "DATALOADER.NUM_WORKERS", "0"])
    loader = build_val_loss_loader(cfg, ["shapes_instance_val"])
    # detectron2's MapDataset -> PicklableWrapper -> the mapper
    assert isinstance(loader.dataset._map_func._obj, _ImageFileMapper)
