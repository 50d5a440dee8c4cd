"""Crash-safe checkpoints, non-finite losses and malformed configs (train_net's code path)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import d2seg  # noqa: F401
from d2seg.config import ConfigError, load_config
from d2seg.engine import default_argument_parser, main
from d2seg.engine.checkpoint import D2SegCheckpointer
from d2seg.engine.train_step import NonFiniteLossError

from conftest import REPO, toy_nan_model

CPU_CFG = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_18_FPN_cpu.yaml")
TINY = ["D2SEG.SHAPES.NUM_TRAIN", "8", "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "64",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0", "DATASETS.TEST", "()"]

BAD_CALLS = set()  # forward calls (0-based) of ToyNaN that return a NaN loss


# A one-conv model whose loss is NaN on the forward calls listed in BAD_CALLS (0-based).
toy_nan_model("ToyNaN", lambda calls: calls in BAD_CALLS)


def _args(out, *opts):
    return default_argument_parser().parse_args(
        ["--config-file", CPU_CFG, "OUTPUT_DIR", str(out), *TINY,
         "MODEL.META_ARCHITECTURE", "ToyNaN", *opts])


def test_non_finite_loss_names_loss_iteration_and_images(tmp_path):
    BAD_CALLS.clear()
    BAD_CALLS.add(2)
    with pytest.raises(NonFiniteLossError) as e:
        main(_args(tmp_path, "SOLVER.MAX_ITER", "5"))
    msg = str(e.value)
    assert "iteration 2" in msg and "loss_toy=nan" in msg
    assert msg.count(".jpg") == 2  # both images of the batch, by path
    # the bad step never reached the weights
    model_file = tmp_path / "model_final.pth"
    assert not model_file.exists()


def test_non_finite_steps_skipped_up_to_the_limit(tmp_path):
    BAD_CALLS.clear()
    BAD_CALLS.update({1, 3})
    main(_args(tmp_path, "SOLVER.MAX_ITER", "5", "D2SEG.NONFINITE.MAX_SKIPS", "2"))
    sd = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in sd.values())
    BAD_CALLS.clear()
    BAD_CALLS.update({0, 1, 2})
    with pytest.raises(NonFiniteLossError, match="MAX_SKIPS=2"):
        main(_args(tmp_path / "b", "SOLVER.MAX_ITER", "5", "D2SEG.NONFINITE.MAX_SKIPS", "2"))
    BAD_CALLS.clear()


def test_lagged_check_raises_one_step_later_and_keeps_checkpoints_clean(tmp_path):
    """D2SEG.NONFINITE.CHECK 'lagged' (what 'auto' picks on CUDA): a NaN is found while the
    next step is queued; checkpoint iterations are still checked before their update."""
    BAD_CALLS.clear()
    BAD_CALLS.add(2)
    with pytest.raises(NonFiniteLossError, match="iteration 2: loss_toy=nan.*'lagged'") as e:
        main(_args(tmp_path, "SOLVER.MAX_ITER", "10", "D2SEG.NONFINITE.CHECK", "lagged"))
    assert str(e.value).count(".jpg") == 2  # the images of iteration 2's batch
    # a NaN on a checkpoint iteration (5th step, CHECKPOINT_PERIOD 5) is caught before the save
    BAD_CALLS.clear()
    BAD_CALLS.add(4)
    with pytest.raises(NonFiniteLossError, match="iteration 4: ") as e:
        main(_args(tmp_path / "b", "SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "5",
                   "D2SEG.NONFINITE.CHECK", "lagged"))
    assert "'lagged'" not in str(e.value)  # checked before the update
    assert not (tmp_path / "b" / "model_0000004.pth").exists()
    BAD_CALLS.clear()


def _train_losses(out, *opts):
    from d2seg.engine.train_loop import setup
    from d2seg.engine.trainer import Trainer

    cfg = setup(_args(out, "SOLVER.MAX_ITER", "7", "SEED", "3", *opts))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hist = trainer.storage.history("total_loss").values()
    return [(it, v) for v, it in hist], trainer


def test_lagged_check_writes_the_same_metrics_at_the_same_iterations(tmp_path):
    BAD_CALLS.clear()
    step, t1 = _train_losses(tmp_path / "a", "D2SEG.NONFINITE.CHECK", "step")
    lagged, t2 = _train_losses(tmp_path / "b", "D2SEG.NONFINITE.CHECK", "lagged")
    assert [it for it, _ in step] == list(range(7))
    assert lagged == step
    assert t2._trainer.lagged and not t1._trainer.lagged
    assert t2._trainer._pending is None  # the last iteration is checked before its update


@pytest.mark.parametrize("opts, match", [
    (["D2SEG.NONFINITE.CHECK", "sometimes"], "D2SEG.NONFINITE.CHECK must be 'auto', 'step' or "
                                             "'lagged', got 'sometimes'"),
    (["D2SEG.NONFINITE.CHECK", "lagged", "D2SEG.NONFINITE.MAX_SKIPS", "2"],
     "'lagged' cannot skip steps"),
])
def test_nonfinite_check_errors_name_the_key(tmp_path, opts, match):
    with pytest.raises(ValueError, match=match):
        main(_args(tmp_path, "SOLVER.MAX_ITER", "2", *opts))


def test_nonfinite_check_auto_is_step_on_cpu():
    from d2seg.engine import fast_paths

    cfg = load_config(CPU_CFG, ["MODEL.DEVICE", "cpu"])
    assert fast_paths.resolve(cfg).nonfinite_check == "step"
    assert "nonfinite_check=step" in fast_paths.describe(cfg)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    ck = D2SegCheckpointer(model, str(tmp_path))
    old_umask = os.umask(0o022)
    try:
        ck.save("model_0000001")
    finally:
        os.umask(old_umask)
    good = (tmp_path / "model_0000001.pth").read_bytes()
    # readable by others as detectron2's own writes are (mkstemp alone gives 0600)
    for name in ("model_0000001.pth", "last_checkpoint"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model.weight.add_(1)
    for name in ("model_0000001", "model_0000002"):
        with pytest.raises(KeyboardInterrupt):
            ck.save(name)
    monkeypatch.setattr(torch, "save", real_save)
    # the old checkpoint is intact, no new or temporary file appeared, last_checkpoint unchanged
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert ck.get_checkpoint_file().endswith("model_0000001.pth")


@pytest.mark.parametrize(
    "opts, expect",
    [
        (["SOLVER.MAX_ITR", "3"], "unknown config key 'SOLVER.MAX_ITR'; did you mean SOLVER.MAX_ITER"),
        (["SOLVER.MAX_ITER", "three"], "for config key: SOLVER.MAX_ITER"),
        (["SOLVER.MAX_ITER"], "KEY VALUE pairs"),
        # registry and loss names: at load time, not after the dataset checks
        (["MODEL.META_ARCHITECTURE", "GeneralizedRCN"], "command line override: "
         "MODEL.META_ARCHITECTURE='GeneralizedRCN' is not registered in detectron2's META_ARCH "
         "registry (import the module that registers it before loading the config); did you "
         "mean GeneralizedRCNN"),
        (["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsample"], "did you mean "
         "MaskRCNNConvUpsampleHead"),
        (["MODEL.SEM_SEG_LOSS.NAMES", "['CE','Dise']"], "MODEL.SEM_SEG_LOSS.NAMES='Dise' is "
         "not a d2seg loss (case-insensitive); did you mean Dice"),
        # fast-path values: at load time, not when the trainer is built
        (["D2SEG.SPEED.COMPILE", "maybe"], "command line override: D2SEG.SPEED.COMPILE must be "
         "'auto', 'on' or 'off', got 'maybe'"),
        (["D2SEG.SPEED.AMP_DTYPE", "half"], "D2SEG.SPEED.AMP_DTYPE must be 'auto', 'float16' "
         "or 'bfloat16', got 'half'"),
    ],
)
def test_bad_overrides_name_the_key(opts, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config(CPU_CFG, opts)


@pytest.mark.parametrize(
    "text, expect",
    [
        ("MODEL:\n  ROI_HEADZ:\n    NUM_CLASSES: 3\n", "unknown config key 'MODEL.ROI_HEADZ'"),
        ("SOLVER:\n  BASE_LR: fast\n", "SOLVER.BASE_LR"),
        ("MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: [1\n", "line 3"),
        ('_BASE_: "zoo://nope/none.yaml"\n', "nope/none.yaml"),
        ("MODEL:\n  BACKBONE:\n    NAME: build_resnet_fpn_backbon\n",
         "(or a file in its _BASE_): MODEL.BACKBONE.NAME='build_resnet_fpn_backbon' is not "
         "registered"),
        # YAML 1.1 reads an unquoted off as False
        ("D2SEG:\n  SPEED:\n    CHANNELS_LAST: off\n", 'quote the value (e.g. "off")'),
        ('D2SEG:\n  SPEED:\n    COMPILE_MODE: "fastest"\n', "D2SEG.SPEED.COMPILE_MODE must be "
         "one of"),
        ("D2SEG:\n  BEST_CHECKPOINT:\n    MODE: maximum\n",
         "D2SEG.BEST_CHECKPOINT.MODE='maximum' is not a best-checkpoint mode; did you mean max"),
    ],
)
def test_bad_config_files_name_file_and_key(tmp_path, text, expect):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and expect in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["SOLVER.MAX_ITR", "3"], "SOLVER.MAX_ITR"),
    # before any process is launched
    (["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"], "SOLVER.IMS_PER_BATCH 3 is not divisible "
                                                       "by the 2 processes"),
])
def test_train_net_reports_config_error_in_one_line(tmp_path, args, words):
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools/train_net.py"), "--config-file", CPU_CFG,
         *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error:") and words in last
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("spec, expect", [
    ("name=own,type=sem_seg,image_root=img,sem_seg_dir=lab,classes=[a,b]",
     "entry 'own' (type sem_seg): unknown keys ['sem_seg_dir'] (did you mean 'sem_seg_dir' -> "
     "'sem_seg_root'?)"),
    ("name=own,type=coco,json_file=no/such.json,image_root=.",
     "json_file 'no/such.json' does not exist"),
])
def test_tools_report_bad_register_entries_in_one_line(tmp_path, spec, expect):
    # predict.py takes an entry whose files are missing (it needs only its class names:
    # tests/test_predict_export.py); a malformed entry stops it too
    tools = ("train_net.py", "search_threshold.py", "check_dataset.py") + \
        (() if "does not exist" in expect else ("predict.py",))
    for tool in tools:
        extra = ["--input", "x.png", "--output", str(tmp_path)] if tool == "predict.py" else []
        r = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", tool), "--config-file", CPU_CFG, *extra,
             "D2SEG.DATASETS.REGISTER", str((spec,))],
            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert r.returncode != 0, tool
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{tool}: error: {CPU_CFG}") and expect in last, (tool, last)
        assert "Traceback" not in r.stderr, tool
        if "does not exist" in expect:  # a relative path: the directory it resolved against
            assert f"working directory {tmp_path}" in last


def test_guard_raises_on_an_infinite_loss_and_refuses_lagged_skips():
    """The guard stops on +inf (not only NaN) before the update; configure_guard refuses
    skipping steps with the lagged check."""
    from detectron2.utils.events import EventStorage

    from d2seg.engine.train_step import GuardedSimpleTrainer

    class Inf(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return {"loss_a": self.w.sum() * float("inf")}

    model = Inf()
    trainer = GuardedSimpleTrainer(model, [[{"file_name": "a.png"}]] * 2,
                                   torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.configure_guard(max_skips=0)
    trainer.iter = 0
    with EventStorage(0), pytest.raises(NonFiniteLossError, match=r"loss_a=inf.*a\.png"):
        trainer.run_step()
    assert model.w.item() == 1.0
    with pytest.raises(ValueError, match="'lagged' cannot skip steps"):
        trainer.configure_guard(max_skips=1, lagged=True)


def test_a_list_key_given_one_string_says_how_to_write_a_list():
    from d2seg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"D2SEG.FINETUNE.FREEZE; the key takes a list: .*"
                                          r"as a tuple"):
        load_config("", ["D2SEG.FINETUNE.FREEZE", "backbone\\."])
    # the example is the value given, as a one-item tuple
    with pytest.raises(ConfigError, match=r"MODEL.SEM_SEG_LOSS.NAMES; the key takes a list: on "
                                          r"the command line write it as a tuple, e\.g\. "
                                          r"\"\('Dice',\)\" \(one item\)"):
        load_config("", ["MODEL.SEM_SEG_LOSS.NAMES", "Dice"])


def test_skip_policy_does_not_skip_a_mapper_that_cannot_work_with_the_dataset(tmp_path):
    """D2SEG.BAD_INPUT.POLICY skip is for bad files: a semantic mapper given a dataset without
    label maps fails on every input alike, so it raises at once instead of skipping 100."""
    import numpy as np
    from PIL import Image

    from d2seg.data.errors import MapperSetupError
    from d2seg.data.safe_mapper import SafeMapper
    from d2seg.data.sem_seg_mapper import SemSegDatasetMapper

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    mapper = SafeMapper(SemSegDatasetMapper(is_train=True, augmentations=[], image_format="RGB"),
                        policy="skip")
    d = {"file_name": str(tmp_path / "a.png"), "height": 8, "width": 8}
    with pytest.raises(MapperSetupError, match="no 'sem_seg_file_name' in the dataset dict"):
        mapper(d)
    assert mapper.skipped == 0
    # a broken file is still skipped
    (tmp_path / "b.png").write_bytes(b"not a png")
    assert mapper({**d, "file_name": str(tmp_path / "b.png"),
                   "sem_seg_file_name": str(tmp_path / "b.png")}) is None
    assert mapper.skipped == 1


def test_skip_policy_stops_after_max_skips(tmp_path):
    import numpy as np
    from PIL import Image

    from d2seg.data.errors import BadInputError
    from d2seg.data.safe_mapper import SafeMapper

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    for name in ("bad1.png", "bad2.png"):
        (tmp_path / name).write_bytes(b"not a png")
    mapper = SafeMapper(lambda d: Image.open(d["file_name"]).size, policy="skip", max_skips=1)
    assert mapper({"file_name": str(tmp_path / "bad1.png")}) is None
    assert mapper({"file_name": str(tmp_path / "good.png")}) == (8, 8)
    with pytest.raises(BadInputError, match=r"bad2\.png: UnidentifiedImageError.*more than "
                                            r"D2SEG.BAD_INPUT.MAX_SKIPS bad inputs"):
        mapper({"file_name": str(tmp_path / "bad2.png")})
    assert mapper.skipped == 1
    # a dataset of which every input fails: said, instead of detectron2's "Sample larger
    # than population" once its loader has no input left to fall back on
    mapper = SafeMapper(lambda d: Image.open(d["file_name"]).size, policy="skip", num_inputs=2)
    assert mapper({"file_name": str(tmp_path / "bad1.png")}) is None
    assert mapper({"file_name": str(tmp_path / "bad1.png")}) is None  # the same one again
    with pytest.raises(BadInputError, match=r"Every one of the 2 training inputs failed to load; "
                                            r"the last: .*bad2\.png"):
        mapper({"file_name": str(tmp_path / "bad2.png")})


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_training_past_an_unreadable_image(tmp_path, policy):
    """train_net with D2SEG.BAD_INPUT.POLICY skip trains on past a file that cannot be read
    (the dataset checks off, or the file broken after them), logging the file; "fail" stops
    there with the file's name."""
    import numpy as np
    from PIL import Image

    from d2seg.data.errors import BadInputError

    img, lab = tmp_path / "image", tmp_path / "label"
    img.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(img / f"{i}.png")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8)).save(lab / f"{i}.png")
    (img / "2.png").write_bytes(b"not a png")
    spec = f"name=skip_{policy},type=sem_seg,image_root={img},sem_seg_root={lab},classes=[a,b]"
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml"),
        "OUTPUT_DIR", str(tmp_path / "out"), "D2SEG.DATASETS.REGISTER", str((spec,)),
        "DATASETS.TRAIN", f"('skip_{policy}',)", "DATASETS.TEST", "()",
        "D2SEG.DATASETS.CHECK", "off", "D2SEG.BAD_INPUT.POLICY", policy,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2", "MODEL.UNET.BASE_CHANNELS", "4",
        "MODEL.UNET.DEPTH", "2", "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "32",
        "INPUT.CROP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0", "TEST.NUM_VIS", "0",
        "D2SEG.PLOT_CURVES", "False", "SEED", "1"])
    if policy == "fail":
        with pytest.raises(BadInputError, match=r"2\.png: UnidentifiedImageError.*set "
                                                r"D2SEG.BAD_INPUT.POLICY skip"):
            main(args)
        return
    main(args)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert re.search(r"Skipping bad input \(1/100\): \S+/image/2\.png", log)
    assert (tmp_path / "out" / "model_final.pth").exists()
