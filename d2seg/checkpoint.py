"""Fine-tuning: load ``MODEL.WEIGHTS`` into a model with other heads, and freeze parts of it.

:class:`FinetuneCheckpointer` is detectron2's ``DetectionCheckpointer`` (which already reads
d2seg/detectron2 checkpoints and model-zoo ``.pkl`` files and skips tensors whose shape
differs) plus:

* torchvision ResNet state dicts (``torchvision.models.resnet*().state_dict()`` saved with
  ``torch.save``): keys converted to detectron2's ResNet names and placed under the model's
  ResNet (``backbone.bottom_up.`` in R-CNN/FPN models, ``backbone.`` in DeepLab/U-Net);
* SegFormer's ImageNet-pretrained Mix Transformer encoders in the official (NVlabs) layout
  (``mit_b0.pth`` ... ``mit_b5.pth``: ``patch_embed1.*``, ``block1.0.*``, ``norm1.*``):
  converted to d2seg's :class:`~d2seg.modeling.backbone.MixVisionTransformer` names;
* one log line listing the weights skipped because their shape differs (a head with another
  number of classes), instead of one warning per tensor; ``last_summary`` keeps the numbers.

:func:`freeze_parameters` (``D2SEG.FINETUNE.FREEZE``) stops training parameters whose names
match regexes and turns the BatchNorms among them into ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

import logging
import pickle
import re
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import FrozenBatchNorm2d

from .config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "FinetuneCheckpointer",
    "is_torchvision_resnet",
    "convert_torchvision_resnet",
    "is_segformer_mit",
    "convert_segformer_mit",
    "freeze_parameters",
    "load_weights",
    "require_complete_weights",
]

_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
# prefixes of a ResNet saved as part of another model: DataParallel, smp / timm encoders
_WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.", "model.", "body.")
# entries under which training frameworks save the weights
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net")


def is_torchvision_resnet(state_dict: Dict[str, Any]) -> bool:
    """Whether ``state_dict`` has torchvision ResNet keys (``conv1.weight``, ``layer1.0.*``)."""
    return "conv1.weight" in state_dict and any(k.startswith("layer1.0.") for k in state_dict)


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor], prefix: str = ""
                               ) -> Dict[str, torch.Tensor]:
    """torchvision ResNet keys -> detectron2 ResNet keys (``fc.*`` and counters dropped).

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerN.i.convK``/``bnK`` ->
    ``res{N+1}.i.convK``/``convK.norm``; ``downsample.0``/``.1`` -> ``shortcut``/
    ``shortcut.norm``. Works for BasicBlock (R18/34) and Bottleneck (R50/101/152) ResNets;
    torchvision strides in the 3x3 conv, so use ``MODEL.RESNETS.STRIDE_IN_1X1: False``.

    Args:
        prefix: prepended to every key (where the ResNet sits in the model).
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k.startswith("conv1."):
            nk = "stem.conv1." + k[len("conv1."):]
        elif k.startswith("bn1."):
            nk = "stem.conv1.norm." + k[len("bn1."):]
        else:
            m = _TV_BLOCK.match(k)
            if m is None:
                raise KeyError(f"torchvision ResNet key '{k}' has no detectron2 equivalent")
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            nk = f"res{stage}.{block}.{rest}"
        out[prefix + nk] = v
    return out


_MIT_KEY = re.compile(r"^(patch_embed|block|norm)([1-4])\.(.+)$")


def is_segformer_mit(state_dict: Dict[str, Any]) -> bool:
    """Whether ``state_dict`` is a Mix Transformer in SegFormer's official layout
    (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ...)."""
    return "patch_embed1.proj.weight" in state_dict and "block1.0.attn.q.weight" in state_dict


def convert_segformer_mit(state_dict: Dict[str, torch.Tensor], prefix: str = ""
                          ) -> Dict[str, torch.Tensor]:
    """SegFormer (NVlabs) Mix Transformer keys -> d2seg's ``MixVisionTransformer`` keys.

    ``patch_embed{s}.*`` -> ``stages.{s-1}.patch_embed.*``; ``block{s}.{j}.*`` ->
    ``stages.{s-1}.blocks.{j}.*`` (``mlp.dwconv.dwconv`` -> ``mlp.dwconv``); ``norm{s}.*`` ->
    ``stages.{s-1}.norm.*``; the ImageNet classifier (``head.*``) is dropped.

    Args:
        prefix: prepended to every key (where the encoder sits in the model, ``backbone.``).
    Raises:
        KeyError: a key outside that layout.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            continue
        m = _MIT_KEY.match(k)
        if m is None:
            raise KeyError(f"SegFormer Mix Transformer key '{k}' has no d2seg equivalent")
        part, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
        if part == "block":
            rest = re.sub(r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv.", "." + rest)[1:]
            nk = f"stages.{stage}.blocks.{rest}"
        else:
            nk = f"stages.{stage}.{'patch_embed' if part == 'patch_embed' else 'norm'}.{rest}"
        out[prefix + nk] = v
    return out


def _pretrained_layout(sd: Dict[str, Any]) -> str:
    """"torchvision-resnet", "segformer-mit" or "" for a state dict's key layout."""
    if is_torchvision_resnet(sd):
        return "torchvision-resnet"
    return "segformer-mit" if is_segformer_mit(sd) else ""


class FinetuneCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also loads torchvision ResNets and logs skipped head
    weights in one line. ``last_summary`` (after :meth:`load`): dict with ``file``,
    ``format`` ("d2seg/detectron2", "torchvision-resnet", ...), ``loaded`` (number of tensors),
    ``skipped_shape`` [(key, checkpoint shape, model shape)], ``missing``, ``unexpected``.
    ``for_inference``: the caller refuses skipped weights (:func:`require_complete_weights`),
    so the fine-tuning message about them is not logged.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", for_inference: bool = False,
                 **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.for_inference = for_inference
        self.last_summary: Dict[str, Any] = {}
        self._format = ""
        self._file = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._file = filename
        try:
            loaded = super()._load_file(filename)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, UnicodeDecodeError,
                KeyError) as e:  # a png, a truncated download, another pickle
            # torch's weights-only message: the reason is the line between its boilerplate
            boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = next((x for x in lines if not x.startswith(boiler)), lines[0] if lines else "")
            raise ConfigError(f"MODEL.WEIGHTS '{filename}': not a readable checkpoint "
                              f"({type(e).__name__}: {why[:160]})") from e
        sd = loaded.get("model", {})
        # {"state_dict": ...} (timm, mmcv, Lightning) and similar wrappers
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(sd, dict) and isinstance(sd.get(k), dict)]
        if wrapped and not any(torch.is_tensor(v) for v in sd.values()):
            self.logger.info(f"{filename}: weights read from its '{wrapped[0]}' entry")
            sd = loaded["model"] = dict(sd[wrapped[0]])
        if not isinstance(sd, dict) or not any(
                torch.is_tensor(v) or isinstance(v, np.ndarray) for v in sd.values()):
            keys = sd if isinstance(sd, dict) else loaded
            raise ConfigError(f"{filename}: holds no model weights (no tensors under 'model' or "
                             f"'state_dict'; its keys: {sorted(map(str, keys))[:8]})")
        # an encoder saved inside another model: DataParallel's "module.", a whole
        # segmentation_models_pytorch model's "encoder." (its decoder left out), an mmseg
        # SegFormer's "backbone." ...
        for p in _WRAPPER_PREFIXES:
            if _pretrained_layout(sd):
                break
            sub = {k[len(p):]: v for k, v in sd.items() if str(k).startswith(p)}
            if _pretrained_layout(sub):
                rest = len(sd) - len(sub)
                self.logger.info(f"{filename}: the encoder under '{p}' taken" + (
                    f"; its {rest} other tensors (e.g. {next(k for k in sd if not str(k).startswith(p))})"
                    f" left out" if rest else ""))
                sd = sub
        layout = _pretrained_layout(sd)
        if layout == "torchvision-resnet":
            anchors = [k for k in self.model.state_dict() if k.endswith("stem.conv1.weight")]
            if not anchors:
                raise ConfigError(f"{filename} is a torchvision ResNet state dict, but the model "
                                 "has no detectron2 ResNet ('...stem.conv1.weight') to load it "
                                 "into")
            prefix = anchors[0][: -len("stem.conv1.weight")]
            converted = convert_torchvision_resnet(sd, prefix)
            self._check_torchvision_fit(filename, converted, prefix)
            loaded = {"model": converted, "__author__": "torchvision"}
            self._format = "torchvision-resnet"
            self.logger.info(f"{filename}: torchvision ResNet state dict, loaded under "
                             f"'{prefix}' with detectron2 key names")
        elif layout == "segformer-mit":
            anchor = "stages.0.patch_embed.proj.weight"
            anchors = [k for k in self.model.state_dict() if k.endswith(anchor)]
            if not anchors:
                raise ConfigError(f"{filename} is a SegFormer Mix Transformer (mit_b*), but the "
                                  f"model has no MixVisionTransformer ('...{anchor}') to load it "
                                  f"into: use MODEL.META_ARCHITECTURE SegFormer")
            prefix = anchors[0][: -len(anchor)]
            self._check_mit_fit(filename, sd, prefix)
            loaded = {"model": convert_segformer_mit(sd, prefix), "__author__": "SegFormer"}
            self._format = "segformer-mit"
            self.logger.info(f"{filename}: SegFormer Mix Transformer, loaded under '{prefix}' "
                             f"with d2seg key names (its ImageNet classifier left out)")
        else:
            self._format = str(loaded.get("__author__", "d2seg/detectron2"))
        return loaded

    def _check_mit_fit(self, filename: str, sd: Dict[str, torch.Tensor], prefix: str) -> None:
        """A Mix Transformer of another size (mit_b2 into MODEL.MIT.NAME b1: same widths,
        other depths) loaded its first blocks and dropped the rest without an error."""
        from .modeling.backbone.mit import MIT_PRESETS

        def size(keys, block_re, width_key, first: int):
            depths = tuple(1 + max((int(m.group(2)) for m in map(block_re.match, keys)
                                    if m and int(m.group(1)) == s + first), default=-1)
                           for s in range(4))
            widths = tuple(int(keys[width_key.format(s + first)].shape[0]) for s in range(4)
                           if width_key.format(s + first) in keys)
            return widths, depths

        theirs = size(sd, re.compile(r"^block(\d)\.(\d+)\."), "patch_embed{}.proj.weight", 1)
        model_sd = self.model.state_dict()
        mine = size(model_sd, re.compile(re.escape(prefix) + r"stages\.(\d)\.blocks\.(\d+)\."),
                    prefix + "stages.{}.patch_embed.proj.weight", 0)
        if theirs == mine:
            return

        def named(widths, depths) -> str:
            for n, p in MIT_PRESETS.items():
                if (tuple(p["embed_dims"]), tuple(p["depths"])) == (widths, depths):
                    return f" (mit_{n})"
            return ""

        raise ConfigError(
            f"{filename} is a Mix Transformer with widths {list(theirs[0])} and depths "
            f"{list(theirs[1])}{named(*theirs)}; the model's has {list(mine[0])} and "
            f"{list(mine[1])}{named(*mine)}: set MODEL.MIT.NAME to the file's size")

    def _check_torchvision_fit(self, filename: str, converted: Dict[str, torch.Tensor],
                               prefix: str) -> None:
        """Say where a torchvision ResNet does not fit the model's ResNet (a DeepLab stem,
        GroupNorm), and keep its stem norm out of a stem whose convolution it does not fit."""
        model_sd = self.model.state_dict()
        key = prefix + "stem.conv1.weight"
        theirs, mine = tuple(converted[key].shape), tuple(model_sd[key].shape)
        if theirs != mine:
            for k in [k for k in converted if k.startswith(prefix + "stem.conv1.")]:
                del converted[k]  # its bn1 would land on another, random convolution
            why = ("MODEL.RESNETS.STEM_TYPE 'deeplab'" if mine[-1] != 7 else
                   "another number of input channels: MODEL.PIXEL_MEAN")
            fix = ("MODEL.RESNETS.STEM_TYPE basic MODEL.RESNETS.STEM_OUT_CHANNELS 64"
                   if mine[-1] != 7 else "3 input channels (INPUT.FORMAT BGR or RGB)")
            self.logger.warning(
                f"{filename}: the torchvision ResNet's stem (conv1 {theirs}) does not fit this "
                f"model's ({key} {mine}: {why}); the stem starts from scratch (and with a DeepLab stem the first res2 "
                f"block), so the pretrained layers after it see other features. For the whole "
                f"ResNet as trained: {fix}")
        norm = getattr(self.model.get_submodule(prefix + "stem.conv1"), "norm", None)
        if isinstance(norm, nn.GroupNorm):
            self.logger.warning(
                f"{filename}: its BatchNorm weights go into this model's GroupNorm layers "
                f"(MODEL.RESNETS.NORM GN) and its running statistics are dropped; "
                f"MODEL.RESNETS.NORM FrozenBN (or BN) runs the ResNet as it was trained")

    def _load_model(self, checkpoint: Dict[str, Any]):
        # detectron2's name-matching heuristics (model-zoo .pkl files) first, as
        # DetectionCheckpointer does, so that the keys counted below are those really loaded
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
            checkpoint["matching_heuristics"] = False
        keys = [str(k) for k in checkpoint["model"]]
        if keys and all(k.startswith("module.") for k in keys):  # fvcore strips it
            keys = [k[len("module."):] for k in keys]
        self._file_keys = keys
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        shapes = list(incompatible.incorrect_shapes)
        model_keys = set(self.model.state_dict())
        skipped = {k for k, _, _ in shapes}
        missing = [k for k in incompatible.missing_keys if k in model_keys and k not in skipped]
        # tensors that came from the file (not: buffers the model filled in itself, such as
        # FrozenBatchNorm statistics absent from a Caffe2 file)
        loaded = sorted(set(self._file_keys) & model_keys - skipped)
        self.last_summary = {
            "file": self._file,
            "format": self._format,
            "loaded": len(loaded),
            "skipped_shape": shapes,
            "missing": missing,
            "unexpected": list(incompatible.unexpected_keys),
        }
        if shapes and not self.for_inference:
            self.logger.warning(
                f"Fine-tuning: {len(shapes)} weight(s) of {self._file} skipped because their "
                "shape differs from the model's (trained from scratch, e.g. a head with another "
                "number of classes): " + "; ".join(
                    f"{k} {tuple(a)}->{tuple(b)}" for k, a, b in shapes))
        rest = type(incompatible)([k for k in incompatible.missing_keys if k not in skipped],
                                  incompatible.unexpected_keys, [])
        super()._log_incompatible_keys(rest)
        self.logger.info(f"Loaded {self.last_summary['loaded']} of {len(model_keys)} model "
                         f"tensors from {self._file} ({self._format})")
        def prefixes(names):
            return sorted({n.split(".")[0] + "." for n in names})[:6]

        # a checkpoint of another architecture can share a tensor or two with the model
        # (a 2-class head's bias): that is no fine-tuning start either
        few = len(loaded) < 0.1 * len(self._file_keys) and len(loaded) < 0.1 * len(model_keys)
        if loaded and few:
            raise ConfigError(
                f"{self._file}: only {len(loaded)} of its {len(self._file_keys)} tensors fit the "
                f"model's {len(model_keys)} ({', '.join(loaded[:3])}): it is a checkpoint of "
                f"another model (names in the file start with {prefixes(self._file_keys)}, the "
                f"model's with {prefixes(model_keys)}). Give MODEL.WEIGHTS a checkpoint of this "
                f"model, a detectron2 model-zoo file, a torchvision ResNet state dict or "
                f"SegFormer's mit_b*.pth (docs/own_data.md)")
        if not loaded:
            raise ConfigError(
                f"{self._file}: none of its {len(self._file_keys)} tensors fits the model "
                f"(names in the file start with {prefixes(self._file_keys)}, the model's with "
                f"{prefixes(model_keys)}{'; shapes differ for ' + str(len(shapes)) if shapes else ''}"
                f"). Give MODEL.WEIGHTS a checkpoint of this model, a detectron2 model-zoo file, "
                f"a torchvision ResNet state dict or SegFormer's mit_b*.pth (docs/own_data.md)")


def load_weights(model: nn.Module, path: str, complete: bool = False,
                 context: str = "") -> Dict[str, Any]:
    """Load ``path`` into ``model`` with :class:`FinetuneCheckpointer`; returns its summary.
    With ``complete``, :func:`require_complete_weights` (inference: no random layers)."""
    ck = FinetuneCheckpointer(model, for_inference=complete)
    ck.load(path, checkpointables=[])
    if complete:
        require_complete_weights(ck.last_summary, model, context)
    return ck.last_summary


def require_complete_weights(summary: Dict[str, Any], model: nn.Module, context: str) -> None:
    """For inference (``--eval-only``, ``tools/predict.py``, export): every parameter of
    ``model`` must come from the file (``summary``: :attr:`FinetuneCheckpointer.last_summary`).

    Fine-tuning may skip a head of another shape or start a missing one from scratch; a model
    that predicts or is evaluated would silently use those random layers.

    Raises:
        ValueError: naming the file, the tensors of other shapes and the missing parameters.
    """
    shapes = summary.get("skipped_shape") or []
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in summary.get("missing") or [] if k in params]
    if not shapes and not missing:
        return
    parts = []
    if shapes:
        shown = "; ".join(f"{k} {tuple(a)} in the file, {tuple(b)} in the model"
                          for k, a, b in shapes[:3])
        parts.append(f"{len(shapes)} tensor(s) have other shapes than the model built from the "
                     f"config ({shown}{'; ...' if len(shapes) > 3 else ''})")
    if missing:
        parts.append(f"{len(missing)} parameter(s) of the model are not in it "
                     f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    raise ConfigError(
        f"{context}: {summary.get('file')}: " + "; ".join(parts) + ". The model would run with "
        "random layers. Use the config it was trained with (its OUTPUT_DIR/config.yaml), e.g. "
        "the same MODEL.META_ARCHITECTURE and MODEL.ROI_HEADS.NUM_CLASSES / "
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Freeze the parameters whose names ``re.match`` one of ``patterns``.

    BatchNorm modules whose parameters are all frozen become ``FrozenBatchNorm2d`` (their
    statistics stop updating too).

    Returns:
        Names of the frozen parameters.

    Raises:
        ValueError: a pattern is not a regular expression, or matches no parameter (naming
            the pattern and example names).
    """
    if not patterns:
        return []
    regexes = []
    for p in patterns:
        try:
            regexes.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"D2SEG.FINETUNE.FREEZE pattern {p!r} is not a regular "
                             f"expression: {e}") from None
    names = [n for n, _ in model.named_parameters()]
    for p, r in zip(patterns, regexes):
        if not any(r.match(n) for n in names):
            raise ConfigError(f"D2SEG.FINETUNE.FREEZE pattern '{p}' matches no parameter; "
                             f"parameter names look like {names[:3]} ... {names[-2:]}")
    frozen = []
    for n, param in model.named_parameters():
        if any(r.match(n) for r in regexes):
            param.requires_grad_(False)
            frozen.append(n)
    num_bn = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and name:
            params = list(m.parameters())
            if params and all(not p.requires_grad for p in params):
                _set_submodule(model, name, FrozenBatchNorm2d.convert_frozen_batchnorm(m))
                num_bn += 1
    numel = sum(p.numel() for n, p in model.named_parameters() if n in set(frozen))
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"Froze {len(frozen)} parameter tensors ({numel} of {total} weights) matching "
                f"{list(patterns)}; {num_bn} BatchNorm layers made FrozenBatchNorm2d")
    return frozen
