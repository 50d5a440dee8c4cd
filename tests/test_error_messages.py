"""Bad config values fail with the key and the value (and, through train_net, the file)."""
import os

import pytest
from torch import nn

import d2seg  # noqa: F401
from d2seg.checkpoint import freeze_parameters
from d2seg.config import ConfigError, get_cfg, naming_config_file
from d2seg.engine import Trainer
from d2seg.inference import window_starts
from d2seg.modeling.layers.blocks import norm_layer

from conftest import REPO


def test_naming_config_file_adds_the_file_to_key_first_value_errors():
    with pytest.raises(ConfigError, match=r"^a\.yaml \(or a file in its _BASE_\): MODEL\.UNET\."
                                          r"DEPTH must be >= 1, got -1$"):
        with naming_config_file("a.yaml"):
            raise ValueError("MODEL.UNET.DEPTH must be >= 1, got -1")
    # a key the message names was given on the command line: it says so
    with pytest.raises(ConfigError, match=r"^command line override: MODEL\.UNET\.DEPTH must"):
        with naming_config_file("a.yaml", ["SOLVER.MAX_ITER", "5", "MODEL.UNET.DEPTH", "-1"]):
            raise ValueError("MODEL.UNET.DEPTH must be >= 1, got -1")
    # other keys on the command line: either place
    with pytest.raises(ConfigError, match=r"^a\.yaml \(or the command line\): MODEL\.UNET"):
        with naming_config_file("a.yaml", ["SOLVER.MAX_ITER", "5"]):
            raise ValueError("MODEL.UNET.DEPTH must be >= 1, got -1")
    # other messages, ValueError subclasses and other exceptions pass unchanged
    for err in (ValueError("no key here"), KeyError("MODEL.X"), ConfigError("MODEL.X bad")):
        with pytest.raises(type(err)) as e:
            with naming_config_file("a.yaml"):
                raise err
        assert e.value is err


def test_unknown_norm_names_the_keys_and_the_value():
    with pytest.raises(ValueError, match=r"MODEL\.UNET\.NORM.*'BatchNorm' is not one of"):
        norm_layer("BatchNorm", 8)
    with pytest.raises(ValueError, match=r"'bn' is not one of .* \(did you mean 'BN'\?\)"):
        norm_layer("bn", 8)


def test_bad_freeze_regex_names_the_key():
    with pytest.raises(ValueError, match=r"D2SEG\.FINETUNE\.FREEZE pattern 'backbone\\\\\.\(' is "
                                         "not a regular expression"):
        freeze_parameters(nn.Linear(2, 2), ["backbone\\.("])


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 1.5)])
def test_bad_adam_betas_name_the_key(betas):
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "ADAM"
    cfg.SOLVER.BETAS = betas
    with pytest.raises(ValueError, match=r"SOLVER\.BETAS must be two numbers in \[0, 1\)"):
        Trainer.build_optimizer(cfg, nn.Linear(2, 2))


def test_sliding_window_overlap_names_the_key():
    with pytest.raises(ValueError, match=r"D2SEG\.INFERENCE\.SLIDING_WINDOW\.OVERLAP"):
        window_starts(100, 10, 1.0)


@pytest.mark.parametrize("make, key", [
    (lambda: d2seg.modeling.heads.PSPHead(
        {"res5": _shape(8, 8)}, in_feature="res5", num_classes=2, dropout=1.5), "MODEL.PSP.DROPOUT"),
    (lambda: d2seg.modeling.heads.SegFormerHead(
        {"res2": _shape(8, 4)}, num_classes=2, dropout=-0.5), "MODEL.SEGFORMER.DROPOUT"),
    (lambda: d2seg.modeling.heads.ASPPHead(
        {"res5": _shape(8, 8)}, num_classes=2, aspp_dropout=2.0),
     "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT"),
    (lambda: d2seg.modeling.backbone.MixVisionTransformer(drop_path_rate=1.0),
     "MODEL.MIT.DROP_PATH_RATE"),
])
def test_out_of_range_rates_name_the_key(make, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make()


def _shape(channels: int, stride: int):
    from detectron2.layers import ShapeSpec

    return ShapeSpec(channels=channels, stride=stride)


@pytest.mark.parametrize("key, value, what", [
    ("D2SEG.NONFINITE.MAX_SKIPS", "-3", ">= 0"),
    ("TEST.NUM_VIS", "-1", ">= 0"),
    ("D2SEG.SHAPES.NUM_TRAIN", "-5", ">= 1"),
    ("MODEL.SEM_SEG_LOSS.TVERSKY_ALPHA", "-1.0", ">= 0"),
    ("MODEL.SEM_SEG_LOSS.WEIGHTS", "[1.0, -0.5]", "weights >= 0"),
    ("MODEL.SEM_SEG_LOSS.SMOOTH", "-1.0", ">= 0"),
    ("MODEL.SEM_SEG_LOSS.FOCAL_ALPHA", "[1.5]", r"values in \[0, 1\]"),
    ("MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", "-1.0", ">= 0"),
    ("D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP", "1.0", r"in \[0, 1\)"),
    ("D2SEG.EVAL.COCO_BACKEND", "foo", "one of 'auto'"),
])
def test_values_no_run_can_use_fail_at_load(key, value, what):
    from d2seg.config import load_config

    with pytest.raises(ConfigError, match=rf"^command line override: {key.replace('.', '[.]')} "
                                          rf"must be {what}"):
        load_config("", [key, value])
    cfg = load_config(os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml"))
    # (the defaults pass)
    assert cfg.TEST.NUM_VIS >= 0
