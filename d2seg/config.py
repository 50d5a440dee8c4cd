"""d2seg's configuration: one ``add_d2seg_config`` adding every key, and ``get_cfg``.

Config files may inherit detectron2's model-zoo configs without copying them::

    _BASE_: "zoo://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"

``zoo://`` resolves to the config files shipped inside the installed detectron2 package
(``detectron2/model_zoo/configs``), so d2seg configs follow whatever detectron2 version is
installed. Only configs loaded through :func:`d2seg.config.get_cfg` understand the prefix.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import IO, Iterator, List, Optional, Sequence

from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg as _d2_get_cfg

logger = logging.getLogger(__name__)

__all__ = ["CfgNode", "ConfigError", "add_d2seg_config", "get_cfg", "load_config",
           "load_config_or_exit", "naming_config_file", "ZOO_PREFIX"]

ZOO_PREFIX = "zoo://"


class CfgNode(_D2CfgNode):
    """detectron2's CfgNode that also resolves ``_BASE_: "zoo://<path in the model zoo>"``."""

    @classmethod
    def _open_cfg(cls, filename: str) -> IO[str]:
        # fvcore joins a relative _BASE_ with the including file's folder, so a zoo base arrives
        # as "<folder>/zoo://COCO-.../x.yaml" and a base *inside* the zoo file as
        # "<folder>/zoo://COCO-.../../Base-RCNN-FPN.yaml": both resolve below.
        if ZOO_PREFIX in str(filename):
            from detectron2 import model_zoo

            rel = os.path.normpath(str(filename).split(ZOO_PREFIX, 1)[1])
            try:
                filename = model_zoo.get_config_file(rel)
            except RuntimeError as e:
                raise FileNotFoundError(
                    f"_BASE_ '{ZOO_PREFIX}{rel}' is not a config of the installed detectron2 "
                    f"model zoo: {e}"
                ) from e
        return super()._open_cfg(filename)


def add_d2seg_config(cfg: _D2CfgNode) -> None:
    """Add every d2seg config key, with its default, to ``cfg`` (in place).

    Keys ``cfg`` already has keep their values: after another plugin's ``add_*_config`` (e.g.
    detectron2's Panoptic-DeepLab: ``SOLVER.OPTIMIZER`` "ADAM", ``MODEL.RESNETS.STEM_TYPE``
    "deeplab") or values set by hand, only the missing keys are added. On detectron2's
    ``get_cfg()`` no existing value changes.

    Idempotent: calling it twice leaves ``cfg`` unchanged the second time.
    """
    if "D2SEG" in cfg:
        return
    before = cfg.clone()
    _add_d2seg_keys(cfg)
    kept = _restore_existing(cfg, before)
    if kept:
        logger.info("add_d2seg_config kept the values these keys already had (d2seg's "
                    "defaults in brackets): " + ", ".join(kept))


def _restore_existing(cfg: _D2CfgNode, before: _D2CfgNode, prefix: str = "") -> List[str]:
    """Give the leaves of ``before`` their values back in ``cfg``; the keys whose value the
    defaults had changed, as "KEY=value (default)"."""
    kept = []
    for k, v in before.items():
        if isinstance(v, _D2CfgNode) and isinstance(cfg.get(k), _D2CfgNode):
            kept += _restore_existing(cfg[k], v, f"{prefix}{k}.")
        elif cfg.get(k) != v:
            kept.append(f"{prefix}{k}={v!r} ({cfg.get(k)!r})")
            cfg[k] = v
    return kept


def _add_d2seg_keys(cfg: _D2CfgNode) -> None:
    CN = type(cfg)  # children of the same class, so that yaml merges type-check
    cfg.D2SEG = CN()

    # --- synthetic "shapes" catalogs (d2seg/data/shapes.py) -------------------------------
    # The six shapes_* datasets are (re-)registered from these values by train_net's setup().
    cfg.D2SEG.SHAPES = CN()
    cfg.D2SEG.SHAPES.NUM_TRAIN = 1000
    cfg.D2SEG.SHAPES.NUM_VAL = 100
    cfg.D2SEG.SHAPES.IMAGE_SIZE = 256
    cfg.D2SEG.SHAPES.MAX_OBJECTS = 6
    cfg.D2SEG.SHAPES.SEED = 0

    # --- data loading ------------------------------------------------------------------------
    # "" = detectron2's DatasetMapper; "sem_seg" = d2seg.data.SemSegDatasetMapper.
    cfg.INPUT.DATASET_MAPPER_NAME = ""

    # --- training -----------------------------------------------------------------------------
    # Number of validation images visualized (prediction beside ground truth) after evaluation.
    cfg.TEST.NUM_VIS = 0

    # --- semantic segmentation (d2seg/modeling) ---------------------------------------------
    # Documented in docs/semantic.md. detectron2's DeepLab keys (MODEL.SEM_SEG_HEAD.ASPP_*,
    # PROJECT_FEATURES/CHANNELS, MODEL.RESNETS.RES4_DILATION/RES5_MULTI_GRID/STEM_TYPE,
    # INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ...) are reused as they are.
    from detectron2.projects.deeplab import add_deeplab_config

    add_deeplab_config(cfg)
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"  # detectron2's default stem unless a config says so
    # detectron2's DeepLab key, read by d2seg's models too: "cross_entropy", or
    # "hard_pixel_mining" (CE / BCE averaged over the hardest LOSS_TOP_K fraction of pixels)
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TOP_K = 0.2  # as detectron2's DeepLab heads (Panoptic-DeepLab's key)
    # DeepLab / ASPP: image-level pooling branch on or off (rates: SEM_SEG_HEAD.ASPP_DILATIONS).
    cfg.MODEL.SEM_SEG_HEAD.ASPP_IMAGE_POOLING = True
    # Inputs are padded to a multiple of this; -1 = the backbone's size_divisibility, or 32
    # when the backbone reports none. Outputs are cropped back to the input size.
    cfg.MODEL.SEM_SEG_HEAD.SIZE_DIVISIBILITY = -1

    # U-Net (meta-architecture "UNet"; backbone "build_unet_backbone" or any detectron2 one).
    cfg.MODEL.UNET = CN()
    cfg.MODEL.UNET.DEPTH = 4  # down-sampling levels
    cfg.MODEL.UNET.BASE_CHANNELS = 64  # channels of the first level, doubled per level
    cfg.MODEL.UNET.NORM = "BN"  # "", "BN", "GN", "SyncBN", ... (detectron2's get_norm)
    cfg.MODEL.UNET.CONV_BIAS = True  # bias in the 3x3 convs even with a norm (classic U-Net)
    cfg.MODEL.UNET.UPSAMPLE = "transposed"  # "transposed" or "bilinear" (+ 1x1 conv)
    # Encoder features the decoder uses, shallow to deep; [] = all of the backbone's outputs.
    cfg.MODEL.UNET.IN_FEATURES = []
    # Output channels of each decoder stage, deep to shallow; [] = the skip feature's channels.
    cfg.MODEL.UNET.DECODER_CHANNELS = []

    # PSPNet (meta-architecture "PSPNet").
    cfg.MODEL.PSP = CN()
    cfg.MODEL.PSP.IN_FEATURE = "res5"
    cfg.MODEL.PSP.BINS = [1, 2, 3, 6]
    cfg.MODEL.PSP.POOL_CHANNELS = 512  # channels of each pyramid branch
    cfg.MODEL.PSP.CONVS_DIM = 512  # channels of the 3x3 conv after the pyramid concat
    cfg.MODEL.PSP.DROPOUT = 0.1
    cfg.MODEL.PSP.AUX_IN_FEATURE = "res4"  # "" disables the auxiliary head
    cfg.MODEL.PSP.AUX_CONVS_DIM = 256
    cfg.MODEL.PSP.AUX_LOSS_WEIGHT = 0.4

    # SegFormer (meta-architecture "SegFormer", backbone "build_mit_backbone"; docs/semantic.md).
    # Mix Transformer encoder: preset NAME "b0".."b5"; a non-empty EMBED_DIMS / DEPTHS /
    # NUM_HEADS / SR_RATIOS (4 values, one per stage) replaces the preset's (e.g. a tiny CPU
    # variant). Outputs res2..res5 at strides 4, 8, 16, 32.
    cfg.MODEL.MIT = CN()
    cfg.MODEL.MIT.NAME = "b0"
    cfg.MODEL.MIT.EMBED_DIMS = []
    cfg.MODEL.MIT.DEPTHS = []
    cfg.MODEL.MIT.NUM_HEADS = []
    cfg.MODEL.MIT.SR_RATIOS = []
    cfg.MODEL.MIT.MLP_RATIO = 4.0
    cfg.MODEL.MIT.QKV_BIAS = True
    cfg.MODEL.MIT.DROP_RATE = 0.0
    cfg.MODEL.MIT.ATTN_DROP_RATE = 0.0
    cfg.MODEL.MIT.DROP_PATH_RATE = 0.1  # stochastic depth, linear over all blocks up to this
    cfg.MODEL.MIT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # All-MLP decoder ("SegFormerHead"): features fused ([] = all of the backbone's), their
    # common width (256 for b0/b1, 768 for b2+ as published), dropout before the classifier.
    cfg.MODEL.SEGFORMER = CN()
    cfg.MODEL.SEGFORMER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEGFORMER.DECODER_DIM = 256
    cfg.MODEL.SEGFORMER.DROPOUT = 0.1

    # HRNet (backbones "build_hrnet_backbone" / "build_hrnet_fpn_backbone", meta-architecture
    # "HRNetV2"; d2seg/modeling/backbone/hrnet.py, docs/semantic.md). NAME: preset
    # "w18_small_v1", "w18_small_v2", "w18", "w32", "w48"; a non-zero / non-empty override
    # below replaces the preset's value (e.g. a tiny CPU variant). Outputs hr1..hr4 (strides
    # 4, 8, 16, 32; WIDTH * 1, 2, 4, 8 channels) and "hrcat" (all four concatenated at stride 4).
    cfg.MODEL.HRNET = CN()
    cfg.MODEL.HRNET.NAME = "w18"
    cfg.MODEL.HRNET.WIDTH = 0  # channels of branch 1 (branch i: WIDTH * 2**(i-1))
    cfg.MODEL.HRNET.STEM_CHANNELS = 0  # the two stride-2 stem convs (presets: 64)
    cfg.MODEL.HRNET.STAGE1_CHANNELS = 0  # stage-1 bottleneck width, output 4x (presets: 32/64)
    cfg.MODEL.HRNET.NUM_MODULES = []  # modules of stages 2, 3, 4 (w18: [1, 4, 3])
    cfg.MODEL.HRNET.NUM_BLOCKS = []  # blocks of stage 1 and per branch of stages 2-4 (w18: 4s)
    cfg.MODEL.HRNET.NORM = "BN"  # "BN", "SyncBN", "GN" (groups adapted to the width), ""
    cfg.MODEL.HRNET.OUT_FEATURES = ["hr1", "hr2", "hr3", "hr4"]  # may add "hrcat"
    # "HRNetV2Head" (fuses MODEL.SEM_SEG_HEAD.IN_FEATURES): width of its 1x1 conv before the
    # classifier; 0 = the concatenation's width (HRNetV2's last_inp_channels).
    cfg.MODEL.HRNET.HEAD_CHANNELS = 0

    # Losses of every d2seg head (and of "SemSegFPNLossHead"): sum of WEIGHTS[i] * NAMES[i].
    # Names: "CE" (class-weighted cross-entropy; binary: BCE), "BCE" (binary only), "Dice",
    # "Focal", "Tversky". One output channel (SEM_SEG_HEAD.NUM_CLASSES = 1) = binary/sigmoid.
    cfg.MODEL.SEM_SEG_LOSS = CN()
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["CE"]
    cfg.MODEL.SEM_SEG_LOSS.WEIGHTS = []  # one per name; [] = all 1
    cfg.MODEL.SEM_SEG_LOSS.CLASS_WEIGHTS = []  # CE weight per class ([bg, fg] if binary); []=1
    cfg.MODEL.SEM_SEG_LOSS.SMOOTH = 1.0  # Dice / Tversky smoothing
    cfg.MODEL.SEM_SEG_LOSS.FOCAL_GAMMA = 2.0
    # [] none; [a] foreground weight (NUM_CLASSES 1, or 2 as [1 - a, a]; with more classes one
    # factor for all); [a_c] one per class
    cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA = []
    cfg.MODEL.SEM_SEG_LOSS.TVERSKY_ALPHA = 0.3  # weight of false positives
    cfg.MODEL.SEM_SEG_LOSS.TVERSKY_BETA = 0.7  # weight of false negatives

    # Post-processing at inference (d2seg meta-architectures). Applied at the original size;
    # "sem_seg" then holds the one-hot post-processed map, "sem_seg_logits" the raw logits.
    cfg.MODEL.SEM_SEG_POSTPROCESS = CN()
    cfg.MODEL.SEM_SEG_POSTPROCESS.ENABLED = False
    cfg.MODEL.SEM_SEG_POSTPROCESS.THRESHOLD = 0.5  # foreground prob. (1 or 2 classes only)
    cfg.MODEL.SEM_SEG_POSTPROCESS.OPEN_KERNEL = 0  # 0 = off; else odd kernel side
    cfg.MODEL.SEM_SEG_POSTPROCESS.CLOSE_KERNEL = 0
    cfg.MODEL.SEM_SEG_POSTPROCESS.MIN_AREA = 0  # remove components smaller than N pixels
    cfg.MODEL.SEM_SEG_POSTPROCESS.KEEP_LARGEST = False
    cfg.MODEL.SEM_SEG_POSTPROCESS.CLASSES = []  # classes the ops apply to; [] = all but BACKGROUND
    cfg.MODEL.SEM_SEG_POSTPROCESS.BACKGROUND = 0  # class given to removed pixels

    # d2seg.data.sem_seg_mapper.SemSegDatasetMapper (INPUT.DATASET_MAPPER_NAME = "sem_seg").
    # INPUT.RANDOM_FLIP also accepts "both" (independent horizontal and vertical flips).
    cfg.INPUT.RANDOM_ROT90 = False  # random multiples of 90 degrees (square crops advised)
    # How images with more than 8 bits (16-bit / float PNG, TIFF) become the models' 0-255
    # (d2seg/data/image_io.py): "minmax" each image by its own range; "window" every image by
    # WINDOW (low, high) raw values, e.g. CT Hounsfield units (-160, 240); "percentile" each
    # image by its own PERCENTILES (low, high). Values outside are clipped; 8-bit images are
    # used as they are.
    cfg.INPUT.INTENSITY = CN()
    cfg.INPUT.INTENSITY.SCALING = "minmax"
    cfg.INPUT.INTENSITY.WINDOW = (0.0, 0.0)
    cfg.INPUT.INTENSITY.PERCENTILES = (0.5, 99.5)
    cfg.INPUT.FG_CROP = CN()
    cfg.INPUT.FG_CROP.ENABLED = False  # needs INPUT.CROP.ENABLED
    cfg.INPUT.FG_CROP.PROB = 0.5  # share of crops centred on a foreground pixel
    cfg.INPUT.FG_CROP.CLASSES = []  # foreground classes; [] = every class but 0 and ignore
    # Elastic deformation as in the U-Net paper: N(0, STD^2) px displacements on a GRID x GRID
    # lattice, bicubically interpolated; images bilinear, labels nearest (semantic data only).
    cfg.INPUT.ELASTIC = CN()
    cfg.INPUT.ELASTIC.ENABLED = False
    cfg.INPUT.ELASTIC.GRID = 3
    cfg.INPUT.ELASTIC.STD = 10.0  # pixels
    cfg.INPUT.ELASTIC.PROB = 1.0  # share of training images deformed
    # DATALOADER.SAMPLER_TRAIN = "SemSegRepeatFactorTrainingSampler": repeat factors from the
    # share of images containing each class (LVIS rule, DATALOADER.REPEAT_THRESHOLD); a class
    # counts as present in an image from this many pixels on.
    cfg.DATALOADER.SEM_SEG_REPEAT_MIN_PIXELS = 1
    # DATALOADER.SAMPLER_TRAIN = "RandomSubsetTrainingSampler" (detectron2's sampler, whose key
    # detectron2's defaults lack): train on this share (0, 1] of the training images, one
    # subset drawn with SEED and kept for the whole run.
    if "RANDOM_SUBSET_RATIO" not in cfg.DATALOADER:
        cfg.DATALOADER.RANDOM_SUBSET_RATIO = 1.0

    # --- your own data, fine-tuning, predict/export, training conveniences (issue 4) ---------
    # (owned by the own-data work; documented in docs/own_data.md)
    cfg.D2SEG.DATASETS = CN()
    # Datasets that train_net's setup() registers (d2seg/data/register.py). Each entry is a
    # mapping {name, type: coco | sem_seg | coco_panoptic, paths, [val_fraction, seed], ...} or
    # the same as one "key=value,key=value" string (command line).
    cfg.D2SEG.DATASETS.REGISTER = []
    # Checks of DATASETS.TRAIN + TEST before training (d2seg/data/checks.py): "error" stops on
    # fatal problems, "warn" only logs them, "off" skips the checks (and the skipping of invalid
    # annotations).
    cfg.D2SEG.DATASETS.CHECK = "error"
    # Fine-tuning (d2seg/checkpoint.py): MODEL.WEIGHTS may be a d2seg/detectron2 checkpoint, a
    # model-zoo .pkl or a torchvision ResNet state dict; head weights of another shape are
    # skipped. FREEZE: regexes matched (re.match) against parameter names, e.g. ["backbone\\."];
    # matching parameters stop training and their BatchNorms become FrozenBatchNorm2d.
    cfg.D2SEG.FINETUNE = CN()
    cfg.D2SEG.FINETUNE.FREEZE = []
    # Inference (d2seg/inference, tools/predict.py). Semantic models: sliding windows of SIZE
    # (h, w) pixels (of the test-resized image; (0, 0) = whole image) overlapping by OVERLAP,
    # logits averaged. FLIP: average with the horizontally flipped image (semantic) or
    # detectron2's GeneralizedRCNNWithTTA with TEST.AUG.FLIP (R-CNN).
    cfg.D2SEG.INFERENCE = CN()
    cfg.D2SEG.INFERENCE.SLIDING_WINDOW = CN()
    cfg.D2SEG.INFERENCE.SLIDING_WINDOW.SIZE = (0, 0)
    cfg.D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP = 0.25
    cfg.D2SEG.INFERENCE.FLIP = False
    # Semantic models: also average the 90/180/270-degree rotations (x2 with FLIP: 8 views).
    cfg.D2SEG.INFERENCE.ROT90 = False
    # Semantic models: multi-scale test, factors of the test-resized image, e.g.
    # (0.75, 1.0, 1.25); the logits of every scale resized back and averaged.
    cfg.D2SEG.INFERENCE.SCALES = (1.0,)
    # TEST.AUG.ENABLED (detectron2's key) makes train_net also evaluate with test-time
    # augmentation after training / in --eval-only, results keyed "<task>_TTA": R-CNN models
    # through detectron2's GeneralizedRCNNWithTTA (TEST.AUG.MIN_SIZES / MAX_SIZE / FLIP),
    # semantic models through d2seg.inference.SemanticSegmentorWithTTA (TEST.AUG.FLIP or
    # D2SEG.INFERENCE.FLIP, D2SEG.INFERENCE.ROT90, D2SEG.INFERENCE.SLIDING_WINDOW).
    # Training conveniences (d2seg/engine/hooks.py).
    # Validation loss on DATASETS.TEST every VAL_LOSS_PERIOD iterations and at the end
    # (scalars "val_total_loss", "val_<loss>"); 0 = off.
    cfg.D2SEG.VAL_LOSS_PERIOD = 0
    # Keep OUTPUT_DIR/model_best.pth by this metric ("" = off), e.g. "segm/AP", "sem_seg/mIoU"
    # (checked every TEST.EVAL_PERIOD) or "val_total_loss" (every VAL_LOSS_PERIOD, MODE "min").
    cfg.D2SEG.BEST_CHECKPOINT = CN()
    cfg.D2SEG.BEST_CHECKPOINT.METRIC = ""
    # "auto": "min" for a metric whose name holds "loss" (val_total_loss), a distance (HD95,
    # ASSD) or a spread (mDiceImgSD), "max" otherwise (AP, mIoU, mDice, PQ); or "max" / "min"
    # as detectron2's BestCheckpointer takes them
    cfg.D2SEG.BEST_CHECKPOINT.MODE = "auto"
    # Plot losses, learning rate and evaluation metrics to OUTPUT_DIR/curves.png after training.
    cfg.D2SEG.PLOT_CURVES = True

    # --- reliability (d2seg/engine) -----------------------------------------------------------
    # Non-finite losses (d2seg/engine/train_step.py): 0 = stop at the first one with an error
    # naming the loss, the iteration and the batch's images; N > 0 = skip up to N such steps.
    cfg.D2SEG.NONFINITE = CN()
    cfg.D2SEG.NONFINITE.MAX_SKIPS = 0
    # Name the file_name of each image in the offending batch in that error / warning.
    cfg.D2SEG.NONFINITE.REPORT_IMAGES = True
    # When the check runs: "step" (before each update: the host waits for the GPU once per
    # step), "lagged" (during the next step, no wait; checkpoint, evaluation, writer and last
    # iterations still before their update), "auto" (lagged on CUDA when MAX_SKIPS is 0).
    cfg.D2SEG.NONFINITE.CHECK = "auto"
    # Unreadable or corrupt training images: "fail" (error naming the file) or "skip" (warn
    # with the file and train on another image; at most D2SEG.BAD_INPUT.MAX_SKIPS of them).
    cfg.D2SEG.BAD_INPUT = CN()
    cfg.D2SEG.BAD_INPUT.POLICY = "fail"
    cfg.D2SEG.BAD_INPUT.MAX_SKIPS = 100
    # Deterministic training: torch.use_deterministic_algorithms + cuDNN deterministic. Needs a
    # fixed SEED (>= 0) to give identical losses across runs.
    cfg.D2SEG.DETERMINISTIC = False

    # --- optimizer ----------------------------------------------------------------------------
    # "SGD" (detectron2's default, momentum SOLVER.MOMENTUM), "ADAM" or "ADAMW" (betas below).
    # Learning rate, weight decay (incl. the norm/bias variants), schedule and gradient
    # clipping stay detectron2's SOLVER.* keys.
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)

    # --- training fast paths (d2seg/engine/fast_paths.py; docs/benchmarks.md "Fast paths") ----
    # Switches take "auto", "on" or "off" (quote them in YAML). "auto" decides per model family
    # (semantic / rcnn / panoptic / other) and device in fast_paths.resolve(): on CUDA semantic
    # models get cuDNN benchmark + channels_last + torch.compile, R-CNN and panoptic models none
    # of these (their ROI shapes change every iteration); on CPU the conv families get
    # channels_last only. Measurements: docs/benchmarks.md ("Fast paths").
    cfg.D2SEG.SPEED = CN()
    # Autocast dtype when SOLVER.AMP.ENABLED: "auto" (bfloat16 where the GPU has it, else
    # float16; CPU: bfloat16 where a short measurement finds it >= 1.2x faster than fp32 on
    # that CPU, else fp32), "float16" or "bfloat16" (the only AMP that also runs on CPU).
    cfg.D2SEG.SPEED.AMP_DTYPE = "auto"
    # Mixed-precision inference (evaluation, tools/predict.py, the threshold search): the
    # eval-mode forward under autocast, outputs returned in fp32. "auto" = for semantic models
    # the training autocast dtype above (on where SOLVER.AMP.ENABLED trains in bf16 / fp16 on
    # this device, else fp32), for R-CNN / panoptic models fp32 (as detectron2 evaluates);
    # "on" = that dtype, or bf16 (CPU) / the GPU's AMP dtype without training AMP, for every
    # family; "off" = fp32.
    cfg.D2SEG.SPEED.INFERENCE_AMP = "auto"
    # cuDNN autotuning; with "auto", detectron2's top-level CUDNN_BENCHMARK: True also turns it
    # on. D2SEG.DETERMINISTIC forces it off.
    cfg.D2SEG.SPEED.CUDNN_BENCHMARK = "auto"
    cfg.D2SEG.SPEED.TF32 = "auto"  # TF32 matmuls/convs in fp32 on Ampere+ GPUs
    cfg.D2SEG.SPEED.CHANNELS_LAST = "auto"  # NHWC model weights and backbone input
    # torch.compile of COMPILE_MODULES (dotted sub-module paths; [] = the family's default,
    # e.g. ["backbone", "sem_seg_head"]; ["."] = the whole model). A failure at first use logs
    # one warning and runs eagerly.
    cfg.D2SEG.SPEED.COMPILE = "auto"
    cfg.D2SEG.SPEED.COMPILE_MODULES = []
    # "auto": "reduce-overhead" (CUDA graphs, training calls only) on CUDA for DeepLabV3(+),
    # whose step is host-bound there; "default" otherwise. Or "default", "reduce-overhead",
    # "max-autotune", "max-autotune-no-cudagraphs".
    cfg.D2SEG.SPEED.COMPILE_MODE = "auto"
    cfg.D2SEG.SPEED.COMPILE_BACKEND = "inductor"
    # SGD / Adam / AdamW implementation: "auto" (= "fused" where torch has the kernels, CUDA
    # and CPU; else foreach), "fused", "foreach" or "for-loop".
    cfg.D2SEG.SPEED.OPTIMIZER_IMPL = "auto"
    # Training data loader: pinned host memory ("auto" = on with CUDA), workers kept alive
    # between iterators ("auto" = off: the training iterator is created once), batches
    # prefetched per worker (0 = torch's default, 2).
    cfg.D2SEG.SPEED.PIN_MEMORY = "auto"
    cfg.D2SEG.SPEED.PERSISTENT_WORKERS = "auto"
    cfg.D2SEG.SPEED.PREFETCH_FACTOR = 0
    # Copy each training batch to the device in a background thread on a separate CUDA
    # stream while the previous step runs (d2seg/data/prefetch.py). "auto" = off until
    # measured on a GPU (docs/benchmarks.md); DEPTH batches are kept ahead.
    cfg.D2SEG.SPEED.DEVICE_PREFETCH = "auto"
    cfg.D2SEG.SPEED.DEVICE_PREFETCH_DEPTH = 2
    # Label maps as uint8 from the "sem_seg" mapper (1 byte per pixel through the loader
    # workers, pinned memory and the host-to-device copy instead of 8); d2seg's segmentors
    # widen them on the device. "auto": on for d2seg's segmentors with an IGNORE_VALUE in
    # [0, 255] (detectron2's own SemanticSegmentor keeps int64).
    cfg.D2SEG.SPEED.COMPACT_LABELS = "auto"
    # R-CNN / panoptic: detectron2's ground-truth matcher, ROI-head relabelling, ROI poolers
    # and anchor grids replaced by forms with identical results and fewer host waits, and the
    # box / mask heads' logged statistics read with the losses
    # (d2seg/modeling/sync_free_rcnn.py).
    cfg.D2SEG.SPEED.RCNN_SYNC_FREE = "auto"
    # R-CNN / panoptic: the RPN's proposals, its anchor targets and the ROI heads' proposal
    # targets computed for the whole batch at once instead of image by image
    # (d2seg/modeling/batched_rcnn.py): the same proposals, matches and sample counts, each
    # sample a uniformly random subset as in detectron2 but drawn differently (off =
    # detectron2's per-image code and random stream). "auto": on for R-CNN / panoptic models.
    cfg.D2SEG.SPEED.RCNN_BATCHED = "auto"
    # Fixed normalisations (FrozenBatchNorm2d: the model-zoo ResNets and D2SEG.FINETUNE.FREEZE;
    # BatchNorms in eval mode) folded into the detectron2 Conv2d before them: one convolution
    # instead of conv + scale + shift, same results (d2seg/modeling/fold_norm.py). "auto": on.
    cfg.D2SEG.SPEED.FOLD_NORM = "auto"
    # Semantic models' bilinear feature resizing (SegFormer, HRNet, DeepLabV3+, PSPNet, a
    # bilinear U-Net) and the training logits' resize to the labels (every d2seg head) as two
    # small matrix products instead of F.interpolate: same values up to
    # float rounding, a backward without atomic adds (deterministic; the atomics took half of
    # SegFormer-B2's GPU time on an H100). Dense work a CPU pays for. "auto": on CUDA for
    # SegFormer, DeepLabV3+ (H100: 1.11x its step) and with D2SEG.DETERMINISTIC; off
    # elsewhere until a GPU measures it
    # (fast_paths.MATMUL_RESIZE_META_ARCHS; d2seg/modeling/layers/resize.py).
    cfg.D2SEG.SPEED.MATMUL_RESIZE = "auto"
    # Mask R-CNN with INPUT.MASK_FORMAT "bitmask": mask targets cropped from each image's object
    # masks by index instead of from a full-image copy per sampled proposal; same targets,
    # gigabytes less memory at batch 16 (d2seg/modeling/indexed_masks.py). "auto": on for
    # R-CNN / panoptic models.
    cfg.D2SEG.SPEED.RCNN_INDEXED_MASKS = "auto"
    # ROIAlign (the ROI heads' poolers) on CPU with its channels split over torch's intra-op
    # threads: torchvision's CPU kernels run on one thread; same results bit for bit
    # (d2seg/modeling/layers/roi_align.py). "auto": on for CPU training and inference; on CUDA
    # the layer is detectron2's.
    cfg.D2SEG.SPEED.PARALLEL_ROI_ALIGN = "auto"
    # ROIAlign's input gradient on CPU as one sparse-dense matrix product (the bilinear
    # weights computed once per sampling point) instead of torchvision's CPU backward, which
    # recomputes them for every channel on one thread: gradients within float rounding of
    # torchvision's (bit-identical with a fixed POOLER_SAMPLING_RATIO, the CPU configs' 2,
    # where MKL adds in order: AMD EPYC; ~1 ulp apart on an Intel AVX-512 CPU)
    # (d2seg/modeling/layers/roi_align.py). "auto": on for CPU training; never on CUDA.
    cfg.D2SEG.SPEED.SPARSE_ROI_ALIGN_GRAD = "auto"
    # Each training sample's tensors (image, labels, boxes, ...) copied into one buffer in the
    # loader worker, so the sample reaches the training process as one shared-memory block
    # instead of one per tensor (d2seg/data/pack.py). "auto": on with DATALOADER.NUM_WORKERS > 0.
    cfg.D2SEG.SPEED.PACK_SAMPLES = "auto"
    # How loader workers share tensors with the training process (process-wide, see
    # torch.multiprocessing): "auto" (= "file_system" with DATALOADER.NUM_WORKERS > 0 where
    # torch offers it: no per-tensor socket handshake; measured in docs/benchmarks.md),
    # "file_system", "file_descriptor" (torch's Linux default) or "default" (leave it as is).
    cfg.D2SEG.SPEED.SHARING_STRATEGY = "auto"

    # --- evaluation speed (d2seg/evaluation/coco_backend.py) ---------------------------------
    # COCO AP implementation: "auto" (detectron2's C++ if it loads, else faster-coco-eval if
    # installed, else pycocotools), "faster_coco_eval" or "pycocotools".
    cfg.D2SEG.EVAL = CN()
    cfg.D2SEG.EVAL.COCO_BACKEND = "auto"
    # Semantic evaluation also writes detectron2's sem_seg_predictions.json (every prediction
    # RLE-encoded per class, COCO-stuff results format): 27 ms per 512x512 image with 19
    # classes on a 2-core CPU, and every process sends them all to the main one. Off: the
    # metrics only (d2seg/evaluation/sem_seg_evaluator.py).
    cfg.D2SEG.EVAL.SEM_SEG_PREDICTIONS_JSON = False
    # Semantic datasets: also HD95 and ASSD (symmetric surface distances, in pixels) per class
    # and image, in sem_seg_metrics and sem_seg_per_image.csv (two distance transforms per
    # class and image: off by default).
    cfg.D2SEG.EVAL.SURFACE_DISTANCE = False
    # The size of a pixel (row, column) the distances are measured in, e.g. (0.7, 0.7) mm for
    # a CT slice; (1.0, 1.0) = pixels. One value for the dataset (images at their own size).
    cfg.D2SEG.EVAL.PIXEL_SPACING = (1.0, 1.0)


def get_cfg() -> CfgNode:
    """detectron2's default config plus every d2seg key, as a ``zoo://``-aware CfgNode."""
    cfg = CfgNode(_d2_get_cfg())
    add_d2seg_config(cfg)
    return cfg


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names file, key and value."""


# a message that starts with a config key, as d2seg's and its modules' value checks do
_KEY_FIRST = re.compile(r"(MODEL|INPUT|SOLVER|DATALOADER|DATASETS|TEST|D2SEG)\.[A-Z0-9_]")
_KEY = re.compile(r"\b(?:MODEL|INPUT|SOLVER|DATALOADER|DATASETS|TEST|D2SEG)(?:\.[A-Z0-9_]+)+")


@contextlib.contextmanager
def naming_config_file(config_file: str, opts: Sequence[str] = ()) -> Iterator[None]:
    """Re-raise a plain ``ValueError`` whose message starts with a config key (``"MODEL.UNET.
    DEPTH must be >= 1, got -1"``: the checks of d2seg's modules, run when the model, the
    loader or the optimizer is built) as a :class:`ConfigError` that also says where the value
    came from: "command line override" when a key the message names is among the ``KEY VALUE``
    ``opts``, else ``config_file``. Other exceptions pass unchanged."""
    try:
        yield
    except ValueError as e:
        if type(e) is not ValueError or not config_file or not _KEY_FIRST.match(str(e)):
            raise
        raise ConfigError(f"{_where(str(e), config_file, opts)}: "
                          f"{' '.join(str(e).split())}") from e


def _where(message: str, config_file: str, opts: Sequence[str],
           keys: Optional[Sequence[str]] = None, name_keys: bool = False) -> str:
    """Where the value an error is about came from: "command line override" when one of
    ``keys`` (or of a key under one of them; default: the keys ``message`` names) is among
    the ``KEY VALUE`` ``opts`` (listed in parentheses with ``name_keys``), else
    ``config_file`` or the default config. Without ``keys``, a message that names no
    overridden key leaves the command line open."""
    given = [str(k) for k in list(opts)[0::2]]
    named = set(_KEY.findall(message)) if keys is None else set(keys)
    hit = sorted(k for k in given if any(k == n or k.startswith(n + ".") for n in named))
    if hit:
        return "command line override" + (f" ({', '.join(hit)})" if name_keys else "")
    sure = keys is not None or not given
    if not config_file:
        return "default config" if sure else "the command line or the default config"
    return f"{config_file} (or a file in its _BASE_)" if sure else \
        f"{config_file} (or the command line)"


def _all_keys(node, prefix: str = "") -> List[str]:
    out = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        out.append(full)
        if isinstance(v, _D2CfgNode):
            out.extend(_all_keys(v, full + "."))
    return out


def _explain(err: BaseException, cfg, in_file: bool = False) -> str:
    msg = str(err.args[0]) if getattr(err, "args", None) else str(err)
    inherit = re.search(r"Cannot inherit key '(.*)' from base", msg)
    as_mapping = re.search(r"\(<class '(?:list|tuple)'> vs\. <class '[\w.]*CfgNode'>\).*"
                           r"for config key: (\S+)", " ".join(msg.split()))
    if inherit or as_mapping:  # a value key written as a mapping (a list: the "- " left out)
        key = inherit.group(1) if inherit else as_mapping.group(1)
        if "." not in key:  # detectron2's "Cannot inherit" names the last part only
            full = [k for k in _all_keys(cfg) if k == key or k.endswith("." + key)]
            key = full[0] if len(full) == 1 else key
        try:
            value = _get(cfg, key)
        except KeyError:
            value = None
        if isinstance(value, (list, tuple)):
            return (f"{key} takes a list, but the YAML gives a mapping: start each entry with "
                    f"'- ' (e.g. 'REGISTER:' then '  - name: mydata' and its keys indented "
                    f"below)")
        kind = type(value).__name__ if value is not None else "value"
        return f"{key} takes a {kind}, but the YAML gives a mapping (keys indented below it)"
    if "Non-existent" in msg and "key" in msg:  # merge_from_file (KeyError) / _list (Assert)
        key = msg.split(":", 1)[1].strip()
        close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown config key '{key}'{hint}"
    if isinstance(err, ValueError) and "Type mismatch" in msg:
        out = msg.replace("Type mismatch", "wrong type:")
        if "<class 'bool'>" in msg and "<class 'str'>" in msg:
            # YAML 1.1 reads an unquoted on / off / yes / no as a boolean
            out += ('; YAML reads an unquoted on / off / yes / no as true / false: quote the '
                    'value (e.g. "off")')
        elif re.search(r"\(<class '(list|tuple)'> vs\. <class 'str'>\)", msg):
            # a list key given one string on the command line: the tuple of that string
            given = re.search(r"with values \(.* vs\. (.*)\) for config key", msg)
            one = given.group(1) if given else "a"
            out += (f"; the key takes a list: in YAML write [{one}] (or one '- {one}' line per "
                    f"item)" if in_file else
                    f"; the key takes a list: on the command line write it as a tuple, e.g. "
                    f"\"('{one}',)\" (one item) or \"('a', 'b')\"")
        return out
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _check_top_level(config_file: str) -> None:
    """After detectron2's reader failed on ``config_file``: a ConfigError where the file is
    empty or not a mapping (its TypeError / AttributeError said nothing of that)."""
    import yaml

    try:
        with open(config_file) as f:
            top = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # the reader's own error says it, with the line
    if not isinstance(top, dict):
        what = "empty" if top is None else f"a YAML {type(top).__name__}"
        raise ConfigError(f"{config_file}: is {what}, not a mapping of config keys "
                          f"(e.g. '_BASE_: ...' and 'MODEL:' on their own lines)")


def load_config(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """``get_cfg()`` merged with ``config_file`` and ``KEY VALUE`` ``opts``.

    Raises:
        ConfigError: one line naming the file (or the command line), the key and the value,
            for a missing file, unknown key, wrong type or malformed YAML.
    """
    import yaml

    cfg = get_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"{config_file}: no such config file")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError, AttributeError,
                yaml.YAMLError, FileNotFoundError) as e:
            _check_top_level(config_file)  # an empty or non-mapping file: said so
            raise ConfigError(f"{config_file} (or a file in its _BASE_): "
                              f"{_explain(e, cfg, in_file=True)}") from e
    opts = list(opts)
    options = [str(o) for o in opts[0::2] if str(o).startswith("--")]
    if options:
        raise ConfigError(f"command line: {options[0]} comes after the KEY VALUE overrides; put "
                          f"options first and the overrides last (detectron2's convention), "
                          f"e.g. '--config-file CFG {options[0]} ... SOLVER.BASE_LR 0.01'")
    if len(opts) % 2:
        raise ConfigError(f"command line overrides must be KEY VALUE pairs; got {len(opts)} "
                          f"items: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"command line override: {_explain(e, cfg)}") from e
    _check_names(cfg, config_file, opts)
    _check_ranges(cfg, config_file, opts)
    _check_channels(cfg, config_file, opts)
    _check_intensity(cfg, config_file, opts)
    _check_sem_seg_loss(cfg, config_file, opts)
    _check_speed(cfg, config_file, opts)
    return cfg


# (key, test, what the value must be): values that no run can use, whichever model or tool
# reads them, checked at load time rather than (or besides) where they are read
_RANGES = (
    ("D2SEG.SHAPES.NUM_TRAIN", lambda v: v >= 1, ">= 1"),
    ("D2SEG.SHAPES.NUM_VAL", lambda v: v >= 1, ">= 1"),
    ("D2SEG.SHAPES.MAX_OBJECTS", lambda v: v >= 1, ">= 1"),
    ("D2SEG.SHAPES.IMAGE_SIZE", lambda v: v >= 32, ">= 32 (smaller images hold hardly any shape)"),
    ("TEST.NUM_VIS", lambda v: v >= 0, ">= 0"),
    ("SOLVER.BASE_LR", lambda v: v > 0, "> 0"),
    ("SOLVER.MAX_ITER", lambda v: v >= 1, ">= 1"),
    ("SOLVER.IMS_PER_BATCH", lambda v: v >= 1, ">= 1"),
    ("SOLVER.CHECKPOINT_PERIOD", lambda v: v >= 1, ">= 1"),
    ("SOLVER.STEPS", lambda v: all(a < b for a, b in zip(v, v[1:])),
     "increasing (the iterations the learning rate drops at)"),
    ("D2SEG.NONFINITE.MAX_SKIPS", lambda v: v >= 0, ">= 0"),
    ("D2SEG.BAD_INPUT.MAX_SKIPS", lambda v: v >= 0, ">= 0"),
    ("MODEL.SEM_SEG_LOSS.WEIGHTS", lambda v: all(w >= 0 for w in v), "weights >= 0"),
    ("MODEL.SEM_SEG_LOSS.CLASS_WEIGHTS", lambda v: all(w >= 0 for w in v), "weights >= 0"),
    ("MODEL.SEM_SEG_LOSS.FOCAL_GAMMA", lambda v: v >= 0, ">= 0"),
    ("MODEL.SEM_SEG_LOSS.FOCAL_ALPHA", lambda v: all(0 <= a <= 1 for a in v), "values in [0, 1]"),
    ("MODEL.SEM_SEG_LOSS.SMOOTH", lambda v: v >= 0, ">= 0"),
    ("MODEL.SEM_SEG_HEAD.LOSS_TOP_K", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", lambda v: v >= 0, ">= 0"),
    ("MODEL.SEM_SEG_LOSS.TVERSKY_ALPHA", lambda v: v >= 0, ">= 0"),
    ("MODEL.SEM_SEG_LOSS.TVERSKY_BETA", lambda v: v >= 0, ">= 0"),
    ("D2SEG.INFERENCE.SLIDING_WINDOW.OVERLAP", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("D2SEG.INFERENCE.SCALES", lambda v: len(v) > 0 and all(s > 0 for s in v),
     "one or more factors > 0"),
    ("D2SEG.EVAL.PIXEL_SPACING", lambda v: len(v) == 2 and all(s > 0 for s in v),
     "two sizes > 0 (row, column)"),
    ("D2SEG.EVAL.COCO_BACKEND", lambda v: v in ("auto", "faster_coco_eval", "pycocotools"),
     "one of 'auto', 'faster_coco_eval', 'pycocotools'"),
)


def _check_ranges(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """The :data:`_RANGES` table: a ConfigError naming where the value came from, the key and
    the value."""
    for key, ok, what in _RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{_where('', config_file, opts, [key])}: {key} must be {what}, "
                              f"got {value!r}")


# channels of the images detectron2's read_image gives in each INPUT.FORMAT
_FORMAT_CHANNELS = {"L": 1, "BGR": 3, "RGB": 3, "YUV-BT.601": 3}


def _check_channels(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """MODEL.PIXEL_MEAN / PIXEL_STD: one value per channel of the images INPUT.FORMAT reads
    (checked at load time, not at the first training step)."""
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    fmt = cfg.INPUT.FORMAT
    where = _where("", config_file, opts, ["MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
                                           "INPUT.FORMAT"], name_keys=True)
    if len(mean) != len(std):
        raise ConfigError(f"{where}: MODEL.PIXEL_MEAN {mean} and MODEL.PIXEL_STD {std} need "
                          f"the same number of values (one per image channel)")
    want = _FORMAT_CHANNELS.get(fmt)
    if want is not None and len(mean) != want:
        fix = "INPUT.FORMAT L for grey images" if len(mean) == 1 else \
            f"MODEL.PIXEL_MEAN and MODEL.PIXEL_STD to {want} value(s) each"
        raise ConfigError(f"{where}: MODEL.PIXEL_MEAN has {len(mean)} value(s) {mean}, but "
                          f"INPUT.FORMAT {fmt!r} reads {want}-channel images; set {fix}")


def _check_intensity(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """``INPUT.INTENSITY``: a known SCALING with the range it needs."""
    from .data.image_io import IntensityScaling

    try:
        IntensityScaling.from_cfg(cfg)
    except ValueError as e:
        where = _where("", config_file, opts, ["INPUT.INTENSITY"], name_keys=True)
        raise ConfigError(f"{where}: {e}") from e


def _check_sem_seg_loss(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """``MODEL.SEM_SEG_LOSS`` against ``NUM_CLASSES`` (lengths, 'BCE'), at load time rather than
    when the model is built after the dataset checks, for the models that use it: d2seg's
    meta-architectures and semantic heads."""
    from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    def ours(registry, name: str) -> bool:
        return name in registry and registry.get(name).__module__.startswith("d2seg.")

    if not (ours(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE)
            or ours(SEM_SEG_HEADS_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.NAME)):
        return
    from .modeling.losses import SemSegLoss

    try:  # config_args: the checks without from_config's log lines (said at the model build)
        SemSegLoss(**SemSegLoss.config_args(cfg))
    except ValueError as e:
        raise ConfigError(f"{_where(str(e), config_file, opts)}: "
                          f"{' '.join(str(e).split())}") from e


def _check_speed(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """``D2SEG.SPEED.*`` values (see :func:`d2seg.engine.fast_paths.validate`), at load time
    rather than when the trainer is built."""
    from .engine import fast_paths

    try:
        fast_paths.validate(cfg)
    except ValueError as e:
        keys = _KEY.findall(str(e)) or [str(e).split(" ", 1)[0]]  # every key it names
        raise ConfigError(f"{_where('', config_file, opts, keys)}: {e}") from e


def load_config_or_exit(config_file: str, opts: Sequence[str], prog: str,
                        dataset_keys: Sequence[str] = (), data_optional: bool = False) -> CfgNode:
    """:func:`load_config` for command-line tools, with the ``D2SEG.DATASETS.REGISTER`` entries
    parsed and their paths checked (nothing registered yet), the dataset names under
    ``dataset_keys`` (those the tool uses, e.g. ``("DATASETS.TRAIN", "DATASETS.TEST")``) known
    and a local ``MODEL.WEIGHTS`` present: a :class:`ConfigError` exits with the one line
    ``<prog>: error: <file>: <key> ...`` instead of a traceback. ``data_optional``: entries
    whose files are missing are no error (tools that need only a dataset's class names)."""
    import sys

    from .data.register import check_register_entries

    try:
        cfg = load_config(config_file, opts)
        check_register_entries(cfg, config_file, dataset_keys, data_optional)
        _check_weights_path(cfg, config_file)
    except ConfigError as e:
        sys.exit(f"{prog}: error: {e}")
    return cfg


def _check_weights_path(cfg: CfgNode, config_file: str) -> None:
    """A local ``MODEL.WEIGHTS`` that does not exist (URLs and ``scheme://`` paths are left to
    detectron2's path handlers)."""
    w = cfg.MODEL.WEIGHTS
    if w and "://" not in w and os.path.isdir(w):
        raise ConfigError(f"{config_file} (or the command line): MODEL.WEIGHTS '{w}' is a folder; "
                          f"give the checkpoint file in it (e.g. {os.path.join(w, 'model_final.pth')})")
    if w and "://" not in w and not os.path.exists(w):
        raise ConfigError(f"{config_file} (or the command line): MODEL.WEIGHTS '{w}' does not "
                          f"exist (relative paths resolve against the working directory "
                          f"{os.getcwd()})")


# (config key, registry getter): names looked up in a registry when the model is built
def _registries():
    from detectron2.modeling import (BACKBONE_REGISTRY, META_ARCH_REGISTRY,
                                     PROPOSAL_GENERATOR_REGISTRY, SEM_SEG_HEADS_REGISTRY)
    from detectron2.modeling.roi_heads import (ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY,
                                               ROI_MASK_HEAD_REGISTRY)

    return (("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
            ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
            ("MODEL.SEM_SEG_HEAD.NAME", SEM_SEG_HEADS_REGISTRY),
            ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY),
            ("MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY),
            ("MODEL.ROI_BOX_HEAD.NAME", ROI_BOX_HEAD_REGISTRY),
            ("MODEL.ROI_MASK_HEAD.NAME", ROI_MASK_HEAD_REGISTRY))


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


BEST_CHECKPOINT_MODES = ("auto", "max", "min")


def best_checkpoint_mode(metric: str, mode: str) -> str:
    """``D2SEG.BEST_CHECKPOINT.MODE`` resolved for ``metric``: "auto" is "min" for a loss or
    a distance (a name holding "loss", e.g. ``val_total_loss``, or "HD95" / "ASSD", e.g.
    ``sem_seg_metrics/mHD95``) and "max" for a score."""
    if mode not in BEST_CHECKPOINT_MODES:
        raise ValueError(f"D2SEG.BEST_CHECKPOINT.MODE must be one of {BEST_CHECKPOINT_MODES}, "
                         f"got {mode!r}")
    if mode == "auto":
        lower = metric.lower()
        low_is_good = ("loss", "hd95", "assd", "imgsd")  # losses, distances, a spread
        return "min" if any(w in lower for w in low_is_good) else "max"
    return mode


def _check_names(cfg, config_file: str, opts: Sequence[str]) -> None:
    """Registry names and loss names, checked when the config is loaded (instead of deep in
    model building, after the dataset checks): a ConfigError naming where the value came
    from, the key, the value and the closest valid names."""
    from .modeling.losses import LOSS_NAMES

    def fail(key: str, value: str, what: str, valid: Sequence[str]) -> None:
        where = _where("", config_file, opts, [key])
        close = difflib.get_close_matches(value, list(valid), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{where}: {key}={value!r} is not {what}; {hint}"
                          f"choose from {sorted(valid)}")

    for key, registry in _registries():
        value = _get(cfg, key)
        if value and value not in registry:
            valid = [name for name, _ in registry]
            fail(key, value, f"registered in detectron2's {registry._name} registry "
                             "(import the module that registers it before loading the config)",
                 valid)
    mode = str(cfg.D2SEG.BEST_CHECKPOINT.MODE)
    if mode not in BEST_CHECKPOINT_MODES:
        fail("D2SEG.BEST_CHECKPOINT.MODE", mode, "a best-checkpoint mode",
             BEST_CHECKPOINT_MODES)
    # names detectron2 (and d2seg's trainer) look up only when the trainer is built, or in
    # an assert without a message
    for key, valid, upper in (
            ("SOLVER.OPTIMIZER", ("SGD", "ADAM", "ADAMW"), True),
            ("SOLVER.LR_SCHEDULER_NAME", ("WarmupMultiStepLR", "WarmupCosineLR",
                                          "WarmupStepWithFixedGammaLR", "WarmupPolyLR"), False),
            ("INPUT.CROP.TYPE", ("relative_range", "relative", "absolute", "absolute_range"),
             False),
            ("INPUT.FORMAT", tuple(_FORMAT_CHANNELS), False),
            ("INPUT.MASK_FORMAT", ("polygon", "bitmask"), False),
            ("INPUT.MIN_SIZE_TRAIN_SAMPLING", ("choice", "range"), False),
            ("SOLVER.WARMUP_METHOD", ("linear", "constant"), False),
            ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", ("value", "norm", "full_model"), False)):
        value = str(_get(cfg, key))
        if (value.upper() if upper else value) not in valid:
            fail(key, value, "a known name" + (" (case-insensitive)" if upper else ""), valid)
    canon = {n.lower() for n in LOSS_NAMES}
    for key in ("MODEL.SEM_SEG_LOSS.NAMES",):
        for name in _get(cfg, key):
            if str(name).lower() not in canon:
                fail(key, str(name), "a d2seg loss (case-insensitive)", LOSS_NAMES)
