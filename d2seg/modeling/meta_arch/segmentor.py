"""The encoder-decoder meta-architecture that d2seg's semantic models share."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import Backbone, build_backbone
from detectron2.structures import ImageList

from ..batching import batch_size, pad_to_batch
from ..heads.base import resize_logits
from ..losses import check_targets
from ..postprocessing import (  # noqa: F401  (binary_to_two_class_logits: re-exported)
    SemSegPostProcessor, binary_to_two_class_logits, pixel_major, semantic_output)

logger = logging.getLogger(__name__)

__all__ = ["EncoderDecoderSegmentor", "binary_to_two_class_logits", "logits_to_output_size"]


def logits_to_output_size(logits: Tensor, image_size: Tuple[int, int], height: int,
                          width: int) -> Tensor:
    """detectron2's ``sem_seg_postprocess`` for one image: (1, K, Hpad, Wpad) logits -> (K,
    height, width): the padding cropped to ``image_size``, then a bilinear resize, skipped when
    the size stays (a resize to the same size returns the same values). The memory layout is
    kept (channels_last logits give class-innermost maps)."""
    r = logits[:, :, : image_size[0], : image_size[1]]
    if (int(height), int(width)) != tuple(r.shape[-2:]):
        r = F.interpolate(r, size=(int(height), int(width)), mode="bilinear",
                          align_corners=False)
    return r[0]


class EncoderDecoderSegmentor(nn.Module):
    """detectron2's ``SemanticSegmentor`` contract for a backbone + d2seg head.

    Subclasses (registered meta-architectures) set ``head_class``; ``from_config`` builds the
    backbone with ``build_backbone(cfg)`` and the head with ``head_class(cfg, shapes)``.

    ``forward(batched_inputs)`` takes a list of dicts (from ``DatasetMapper`` or
    ``SemSegDatasetMapper``) with "image" (C, H, W) in 0-255 and, in training, "sem_seg"
    (H, W) long (or uint8, widened on the device); optional "height", "width" (output size,
    default the input size). Images are normalised, padded to a multiple of
    ``size_divisibility`` (targets with the ignore value) and batched.

    Returns:
        * training: dict of scalar losses (``loss_sem_seg_<name>``, ``loss_aux_<name>``).
        * inference: list (one per image) of dicts with "sem_seg": (K, height, width) fp32
          logits at the image's original size (padding cropped, then bilinearly resized, as
          detectron2's ``sem_seg_postprocess``: :func:`logits_to_output_size`), K =
          ``num_classes``, or K = 2 for a binary model (logits [0, z], see
          :func:`binary_to_two_class_logits`). On a CPU they are stored with the classes
          innermost (:func:`~d2seg.modeling.postprocessing.pixel_major`), so that
          ``sem_seg.argmax(0)`` (detectron2's evaluator, user code) reads contiguous memory.
          With a ``postprocessor``, "sem_seg" holds the one-hot (float) post-processed label
          map and "sem_seg_logits" the raw logits.
    """

    head_class = None  # set by subclasses

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        size_divisibility: int = -1,
        postprocessor: Optional[SemSegPostProcessor] = None,
    ):
        """
        Args:
            backbone: a detectron2 backbone producing the head's input features.
            sem_seg_head: a head following :class:`~d2seg.modeling.heads.SemSegHeadBase`'s
                protocol (``ignore_value``, ``num_classes``, forward(features, targets)).
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 input.
            size_divisibility: pad inputs to a multiple of this; -1 = the backbone's
                ``size_divisibility``, or 32 when it reports none. Must be a multiple of the
                backbone's own, or of its deepest output stride when it reports none.
            postprocessor: optional post-processing applied at inference.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"MODEL.PIXEL_MEAN {pixel_mean} and MODEL.PIXEL_STD {pixel_std} "
                             "differ in length")
        # float32 whatever the numbers' type (integer means would make integer buffers)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32)
                             .view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32)
                             .view(-1, 1, 1), False)
        own = int(getattr(backbone, "size_divisibility", 0) or 0)
        # a backbone that reports none (detectron2's ResNet): its deepest output stride, below
        # which odd sizes round and the logits no longer map onto the input pixel for pixel
        need = own or max((int(s.stride or 1) for s in backbone.output_shape().values()),
                          default=1)
        if size_divisibility is None or size_divisibility < 0:
            size_divisibility = own or max(32, need)
        if size_divisibility % need:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.SIZE_DIVISIBILITY={size_divisibility} is not a "
                             f"multiple of the backbone's "
                             f"{'size_divisibility' if own else 'deepest stride'} {need}")
        self.size_divisibility = int(size_divisibility)
        self.postprocessor = postprocessor
        # the target values are checked on the first training batch only: the losses never
        # read values back from the GPU (see d2seg/modeling/losses.py)
        self._targets_checked = False

    @classmethod
    def from_config(cls, cfg):
        if cls.head_class is None:
            raise TypeError(f"{cls.__name__} has no head_class")
        name = cfg.MODEL.SEM_SEG_HEAD.NAME
        if name not in ("SemSegFPNHead", cls.head_class.__name__):  # detectron2's default: unset
            logger.warning(f"MODEL.SEM_SEG_HEAD.NAME={name!r} is not used: {cls.__name__} "
                           f"always builds its {cls.head_class.__name__} (to put another head on "
                           "a backbone, use META_ARCHITECTURE SemanticSegmentor)")
        backbone = build_backbone(cfg)
        post = SemSegPostProcessor(cfg) if cfg.MODEL.SEM_SEG_POSTPROCESS.ENABLED else None
        return {
            "backbone": backbone,
            "sem_seg_head": cls.head_class(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.SEM_SEG_HEAD.SIZE_DIVISIBILITY,
            "postprocessor": post,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images: an ImageList (N, C, Hpad, Wpad) + original sizes.

        Host-to-device copies are ``non_blocking`` (asynchronous from the loader's pinned
        memory, ``D2SEG.SPEED.PIN_MEMORY``): the host does not wait for the GPU here. Images
        of one size that needs no padding (fixed-size training crops) are stacked first and
        normalised as one batch: three device operations instead of three per image, same
        values."""
        images = [x["image"].to(self.device, non_blocking=True) for x in batched_inputs]
        c = self.pixel_mean.shape[0]
        bad = [tuple(x.shape) for x in images if x.dim() != 3 or x.shape[0] != c]
        if bad:
            raise ValueError(f"images must be (C, H, W) with C = {c} channels, as "
                             f"MODEL.PIXEL_MEAN {self.pixel_mean.flatten().tolist()} has; got "
                             f"{bad[:3]} (set MODEL.PIXEL_MEAN/PIXEL_STD to one value per "
                             "channel of your images)")
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            sizes, hw = batch_size(images, self.size_divisibility)
            if all(s == hw for s in sizes) and all(x.shape == images[0].shape for x in images):
                return ImageList(self._normalize(torch.stack(images)), sizes)
        return pad_to_batch([self._normalize(x) for x in images], self.size_divisibility)

    def _normalize(self, x: Tensor) -> Tensor:
        """(x - mean) / std in the buffers' dtype, one new tensor (in place after the cast)."""
        if x.dtype != self.pixel_mean.dtype:
            return x.to(self.pixel_mean.dtype).sub_(self.pixel_mean).div_(self.pixel_std)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: List[Dict]
                ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """See the class docstring for inputs and what train / eval mode return."""
        images = self.preprocess_image(batched_inputs)
        if self.training:
            missing = [x.get("file_name", f"input {i}") for i, x in enumerate(batched_inputs)
                       if "sem_seg" not in x]
            if missing:
                raise ValueError(f"training inputs need 'sem_seg', missing in {missing[:3]} "
                                 "(use a sem_seg dataset and INPUT.DATASET_MAPPER_NAME 'sem_seg' "
                                 "or detectron2's mapper)")
            # plain ints: no device sync. Images and labels are padded apart and the logits
            # resized to the labels, so a label map of another size would train misaligned.
            wrong = [(x.get("file_name", f"input {i}"), tuple(x["image"].shape[-2:]),
                      tuple(x["sem_seg"].shape[-2:])) for i, x in enumerate(batched_inputs)
                     if x["image"].shape[-2:] != x["sem_seg"].shape[-2:]]
            if wrong:
                raise ValueError("image and 'sem_seg' sizes differ (file, image HxW, label HxW): "
                                 f"{wrong[:3]}; the label map must be drawn on the image it "
                                 "comes with, transformed by the same augmentations")
            # Labels are queued for the device before the backbone runs: a blocking copy
            # after it would make the host wait for the whole encoder (a GPU bubble per step).
            # uint8 labels (D2SEG.SPEED.COMPACT_LABELS) are widened there, after the copy.
            targets = pad_to_batch(
                [x["sem_seg"].to(self.device, non_blocking=True) for x in batched_inputs],
                self.size_divisibility, self.sem_seg_head.ignore_value,
            ).tensor.long()
            if not self._targets_checked:
                head = self.sem_seg_head
                check_targets(targets, head.num_classes, head.ignore_value)
                self._targets_checked = True
            features = self.backbone(images.tensor)
            _, losses = self.sem_seg_head(features, targets)
            return losses
        features = self.backbone(images.tensor)
        logits, _ = self.sem_seg_head(features, None)
        logits = resize_logits(logits, images.tensor.shape[-2:])
        return self.postprocess(logits, batched_inputs, images.image_sizes)

    def postprocess(self, logits: Tensor, batched_inputs: List[Dict],
                    image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """(N, K, Hpad, Wpad) logits -> per image {"sem_seg": (K', h, w)} at original size."""
        out = []
        for i, (inp, size) in enumerate(zip(batched_inputs, image_sizes)):
            h = inp.get("height", size[0])
            w = inp.get("width", size[1])
            r = logits_to_output_size(logits[i:i + 1], size, h, w)
            r = binary_to_two_class_logits(r) if r.shape[0] == 1 else pixel_major(r)
            out.append(semantic_output(r, self.postprocessor))
        return out
