import glob
import os
import re

import pytest

import d2seg  # noqa: F401
from d2seg.config import add_d2seg_config, get_cfg

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_every_config_loads(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    assert cfg.MODEL.META_ARCHITECTURE
    if "Base-" not in os.path.basename(path):
        # nothing to download; trained from scratch (no frozen statistics) unless the name
        # says it is the model-zoo network for fine-tuning from a local checkpoint
        assert cfg.MODEL.WEIGHTS == ""
        if path.endswith("_frozenbn.yaml"):
            assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
        else:
            assert cfg.MODEL.RESNETS.NORM != "FrozenBN"
        assert len(cfg.DATASETS.TRAIN) and len(cfg.DATASETS.TEST)
        # mixed precision everywhere (bf16 on GPUs; on CPUs only where bf16 measures faster):
        # the semantic configs' accuracy in bf16 was checked on ISBI (docs/benchmarks.md)
        assert cfg.SOLVER.AMP.ENABLED


def test_zoo_base_is_inherited_not_copied():
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    # values that only the model zoo's Base-RCNN-FPN.yaml sets
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.MODEL.ROI_HEADS.IN_FEATURES == ["p2", "p3", "p4", "p5"]
    assert cfg.MODEL.MASK_ON
    # d2seg's overrides on top
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert cfg.MODEL.RESNETS.NORM == "GN"
    with open(os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")) as f:
        assert "zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml" in f.read()


def test_unknown_zoo_base_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text('_BASE_: "zoo://COCO-InstanceSegmentation/no_such_config.yaml"\n')
    with pytest.raises(FileNotFoundError, match="no_such_config.yaml"):
        get_cfg().merge_from_file(str(p))


def test_add_d2seg_config_is_idempotent_and_works_on_plain_detectron2_cfg():
    from detectron2.config import get_cfg as d2_get_cfg

    cfg = d2_get_cfg()
    add_d2seg_config(cfg)
    n = cfg.D2SEG.SHAPES.NUM_TRAIN
    cfg.D2SEG.SHAPES.NUM_TRAIN = n + 1
    add_d2seg_config(cfg)
    assert cfg.D2SEG.SHAPES.NUM_TRAIN == n + 1


def test_importing_d2seg_prints_no_deprecation_warning():
    """detectron2 and fvcore call torch.jit.script at import, which torch >= 2.10 reports as
    deprecated; importing d2seg (every tool does) must not show that to users."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W",
                        "error::DeprecationWarning:torch", "-c", "import d2seg"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "jit.script" not in r.stderr, r.stderr[-2000:]


def test_add_d2seg_config_keeps_values_another_plugin_set():
    """Panoptic-DeepLab's (and DeepLab's) keys keep their values; only missing keys are added."""
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

    cfg = d2_get_cfg()
    add_panoptic_deeplab_config(cfg)
    add_d2seg_config(cfg)
    assert cfg.SOLVER.OPTIMIZER == "ADAM" and cfg.MODEL.RESNETS.STEM_TYPE == "deeplab"
    assert cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE == "hard_pixel_mining"
    assert cfg.D2SEG.SPEED.COMPILE == "auto" and cfg.INPUT.DATASET_MAPPER_NAME == ""
    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [1, 2, 3]
    cfg.SOLVER.POLY_LR_POWER = 2.0
    add_d2seg_config(cfg)
    assert cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS == [1, 2, 3] and cfg.SOLVER.POLY_LR_POWER == 2.0
    # on detectron2's own defaults d2seg changes nothing
    plain, cfg = d2_get_cfg(), d2_get_cfg()
    add_d2seg_config(cfg)
    assert cfg.MODEL.RESNETS.STEM_TYPE == "basic" and cfg.SOLVER.OPTIMIZER == "SGD"
    for key in ("MODEL", "INPUT", "SOLVER", "TEST", "DATALOADER"):
        for k, v in plain[key].items():
            if not isinstance(v, dict):
                assert cfg[key][k] == v, f"{key}.{k}"


def test_command_line_tools_stop_in_one_line_on_a_missing_weights_file(tmp_path):
    from d2seg.config import load_config_or_exit

    cfg_file = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")
    with pytest.raises(SystemExit, match=r"predict.py: error: .*unet_cpu.yaml \(or the command "
                                         r"line\): MODEL.WEIGHTS 'nope/model_final.pth' does not "
                                         r"exist"):
        load_config_or_exit(cfg_file, ["MODEL.WEIGHTS", "nope/model_final.pth"], "predict.py")
    (tmp_path / "w.pth").write_bytes(b"")
    cfg = load_config_or_exit(cfg_file, ["MODEL.WEIGHTS", str(tmp_path / "w.pth")], "predict.py")
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "w.pth")


@pytest.mark.parametrize("opts, expect", [
    (["D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP", "1.0"],
     "command line override: D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP must be in [0, 1), got 1.0"),
    (["D2SEG.NONFINITE.MAX_SKIPS", "-1"], "D2SEG.NONFINITE.MAX_SKIPS must be >= 0, got -1"),
    (["D2SEG.SHAPES.MAX_OBJECTS", "0"], "D2SEG.SHAPES.MAX_OBJECTS must be >= 1, got 0"),
    (["D2SEG.SHAPES.IMAGE_SIZE", "0"], "D2SEG.SHAPES.IMAGE_SIZE must be >= 32"),
    (["MODEL.SEM_SEG_HEAD.LOSS_TOP_K", "0.0"], "MODEL.SEM_SEG_HEAD.LOSS_TOP_K must be in (0, 1]"),
    (["SOLVER.STEPS", "(3, 2)"], "SOLVER.STEPS must be increasing"),
    (["SOLVER.BASE_LR", "-0.1"], "SOLVER.BASE_LR must be > 0, got -0.1"),
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be >= 1, got 0"),
    (["INPUT.MASK_FORMAT", "bitmasks"], "INPUT.MASK_FORMAT='bitmasks' is not a known name; did "
                                        "you mean bitmask?"),
    (["SOLVER.WARMUP_METHOD", "lin"], "SOLVER.WARMUP_METHOD='lin'"),
    (["INPUT.FORMAT", "GRAY"], "INPUT.FORMAT='GRAY' is not a known name"),
    (["SOLVER.OPTIMIZER", "ADAMWW"], "did you mean ADAMW"),
    (["OUTPUT_DIR", "x", "--eval-only", "y"], "--eval-only comes after the KEY VALUE overrides"),
])
def test_range_table_names_the_key_and_where_the_value_came_from(opts, expect):
    """Load-time range checks name the source (command line / file), the key and the value."""

    from d2seg.config import ConfigError, load_config

    cfg_file = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config(cfg_file, opts)


def test_range_table_accepts_gamma_zero_and_names_the_config_file(tmp_path):
    """FOCAL_GAMMA 0 (cross-entropy) is valid; a bad value from a file names that file."""
    from d2seg.config import ConfigError, load_config

    base = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")
    assert load_config(base, ["MODEL.SEM_SEG_LOSS.FOCAL_GAMMA", "0.0"]).MODEL.SEM_SEG_LOSS \
        .FOCAL_GAMMA == 0.0
    f = tmp_path / "bad.yaml"
    f.write_text(f'_BASE_: "{base}"\nTEST:\n  NUM_VIS: -1\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml \(or a file in its _BASE_\): TEST.NUM_VIS"):
        load_config(str(f))
    # every load-time check says it alike (the speed check said "(or the command line)")
    f.write_text(f'_BASE_: "{base}"\nD2SEG:\n  SPEED:\n    COMPILE: "maybe"\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml \(or a file in its _BASE_\): "
                                          r"D2SEG.SPEED.COMPILE"):
        load_config(str(f), ["SOLVER.MAX_ITER", "3"])


def test_weights_given_as_a_url_are_left_to_detectron2():
    """A MODEL.WEIGHTS URL is not checked as a local path."""
    from d2seg.config import _check_weights_path, get_cfg

    cfg = get_cfg()
    cfg.MODEL.WEIGHTS = "https://example.invalid/model.pth"
    _check_weights_path(cfg, "x.yaml")


@pytest.mark.parametrize("opts, match", [
    (["MODEL.PIXEL_MEAN", "[125.3]", "MODEL.PIXEL_STD", "[43.7]"],
     r"^command line override \(MODEL\.PIXEL_MEAN, MODEL\.PIXEL_STD\): MODEL\.PIXEL_MEAN has 1 "
     r"value\(s\) \[125\.3\], but INPUT\.FORMAT 'BGR' reads 3-channel images; set INPUT\.FORMAT L"),
    (["MODEL.PIXEL_MEAN", "[125.3]"], r"need the same number of values"),
    (["INPUT.FORMAT", "L"], r"INPUT\.FORMAT 'L' reads 1-channel images; set MODEL\.PIXEL_MEAN "
                            r"and MODEL\.PIXEL_STD to 1 value\(s\) each"),
])
def test_pixel_mean_must_fit_the_input_format_at_load_time(opts, match):
    from d2seg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"), opts)
    load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                ["INPUT.FORMAT", "L", "MODEL.PIXEL_MEAN", "[125.3]", "MODEL.PIXEL_STD", "[43.7]"])


def test_sem_seg_loss_settings_are_checked_against_num_classes_at_load_time():
    """Before the dataset checks and the model build, for d2seg's semantic models only."""
    from d2seg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^command line override: MODEL\.SEM_SEG_LOSS\.NAMES "
                                          r"\['BCE', 'Dice'\]: 'BCE' needs one output channel"):
        load_config(os.path.join(REPO, "configs/ISBI-SemanticSegmentation/unet_cpu.yaml"),
                    ["MODEL.SEM_SEG_LOSS.NAMES", "['BCE', 'Dice']"])
    # Panoptic FPN's semantic head is detectron2's and does not read these keys
    load_config(os.path.join(REPO, "configs/Shapes-PanopticSegmentation/panoptic_fpn_R_18_cpu.yaml"),
                ["MODEL.SEM_SEG_LOSS.NAMES", "['BCE', 'Dice']"])


def test_an_empty_or_non_mapping_yaml_is_one_line(tmp_path):
    from d2seg.config import ConfigError, load_config

    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- MODEL\n- SOLVER\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: is empty, not a mapping of config keys"):
        load_config(str(tmp_path / "empty.yaml"))
    with pytest.raises(ConfigError, match=r"list\.yaml: is a YAML list, not a mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_a_list_key_written_as_a_mapping_says_to_start_entries_with_a_dash(tmp_path):
    """REGISTER without the '- ' gave yacs's type message with five lines of YAML in it."""
    from d2seg.config import ConfigError, load_config

    base = os.path.join(REPO, "configs/Shapes-SemanticSegmentation/unet_cpu.yaml")
    (tmp_path / "m.yaml").write_text(f'_BASE_: "{base}"\nD2SEG:\n  DATASETS:\n    REGISTER:\n'
                                     f'      name: mydata\n      type: sem_seg\n')
    with pytest.raises(ConfigError, match=r"D2SEG.DATASETS.REGISTER takes a list, but the YAML "
                                          r"gives a mapping: start each entry with '- '") as e:
        load_config(str(tmp_path / "m.yaml"))
    assert "\n" not in str(e.value)
    (tmp_path / "l.yaml").write_text(f'_BASE_: "{base}"\nMODEL:\n  SEM_SEG_LOSS:\n'
                                     f'    NAMES: "Dice"\n')
    with pytest.raises(ConfigError, match=r"in YAML write \[Dice\]"):
        load_config(str(tmp_path / "l.yaml"))
    # a scalar key written as a mapping: its type, not the list advice
    (tmp_path / "s.yaml").write_text(f'_BASE_: "{base}"\nSOLVER:\n  BASE_LR:\n    value: 0.02\n')
    with pytest.raises(ConfigError, match=r"SOLVER.BASE_LR takes a float, but the YAML gives a "
                                          r"mapping"):
        load_config(str(tmp_path / "s.yaml"))
