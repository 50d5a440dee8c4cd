"""Reading images with more than 8 bits per pixel (16-bit and float TIFF / PNG: EM and medical
data often are).

detectron2's ``read_image`` converts every image to the 8-bit format the models take through
PIL, which clips a 16-bit image at 255 (almost all white) and a float one to 0 or 1 (black):
the model then trains on, or predicts, a constant image without any message. d2seg scales such
images to 0-255 (logged for the first such image in a process), then converts as detectron2
does. How (``INPUT.INTENSITY.SCALING``, :class:`IntensityScaling`):

* ``"minmax"`` (default): each image by its own minimum and maximum;
* ``"window"``: every image by one fixed range ``INPUT.INTENSITY.WINDOW: (lo, hi)``, values
  outside clipped (CT in Hounsfield units, e.g. a soft-tissue window (-160, 240); 16-bit
  microscopy of a known range), so that one raw value is one model input in every image;
* ``"percentile"``: each image by its own ``INPUT.INTENSITY.PERCENTILES: (low, high)``
  percentiles, values outside clipped (robust to a few hot or dead pixels); an image whose two
  percentiles are equal (a sparse bright structure on a flat background) by its own range.

8-bit images are used as they are in every mode.

Label maps (semantic segmentation ground truth) follow one rule, :func:`read_sem_seg`, wherever
d2seg reads them (training mapper, evaluators, dataset checks, repeat-factor sampler, folder
remapping, threshold search): the stored values are the class ids, never scaled or converted.
detectron2's mapper reads them through PIL's "L" conversion, which turns palette PNGs (the
Pascal VOC format) into the luminance of each class's colour (class 1 becomes 38, the ignore
value 255 becomes 220) and clips 16-bit ids at 255; d2seg does not.

:func:`install` puts :func:`read_image` in the place of ``detection_utils.read_image``, so that
detectron2's own ``DatasetMapper`` (Mask R-CNN, Panoptic FPN) reads images the same way; it is
called when ``d2seg`` is imported. 8-bit images give exactly what detectron2's reader gives.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["read_image", "read_sem_seg", "image_size", "LabelMapError", "to_uint8",
           "HIGH_BIT_MODES", "install", "IntensityScaling", "set_intensity_scaling",
           "intensity_scaling", "INTENSITY_MODES", "mapping_image"]

# PIL modes of one-channel images with more than 8 bits (integer or float)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# formats whose values are intensities (scaled); others ("L" for masks, None) are kept as read
_COLOR_FORMATS = ("BGR", "RGB", "YUV-BT.601")
_warned = False
_detectron2_read_image = detection_utils.read_image


#: ``INPUT.INTENSITY.SCALING`` values (module docstring)
INTENSITY_MODES = ("minmax", "window", "percentile")


@dataclasses.dataclass(frozen=True)
class IntensityScaling:
    """How images with more than 8 bits become 0-255 (module docstring).

    Attributes:
        mode: one of :data:`INTENSITY_MODES`.
        low, high: the window's raw values ("window") or the percentiles ("percentile");
            unused for "minmax".
    """
    mode: str = "minmax"
    low: float = 0.0
    high: float = 0.0

    def __post_init__(self):
        if self.mode not in INTENSITY_MODES:
            raise ValueError(f"INPUT.INTENSITY.SCALING must be one of {list(INTENSITY_MODES)}, "
                             f"got {self.mode!r}")
        if self.mode == "window" and not self.high > self.low:
            raise ValueError(f"INPUT.INTENSITY.WINDOW must be (low, high) with high > low for "
                             f"SCALING 'window', got ({self.low:g}, {self.high:g})")
        if self.mode == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"INPUT.INTENSITY.PERCENTILES must be (low, high) with 0 <= low < "
                             f"high <= 100, got ({self.low:g}, {self.high:g})")

    @classmethod
    def from_cfg(cls, cfg) -> "IntensityScaling":
        """``cfg.INPUT.INTENSITY`` (SCALING, WINDOW, PERCENTILES); raises ValueError naming the
        key and the value."""
        c = cfg.INPUT.INTENSITY
        mode = str(c.SCALING).lower()
        pair = {"window": c.WINDOW, "percentile": c.PERCENTILES}.get(mode, (0.0, 0.0))
        if len(pair) != 2:
            key = "WINDOW" if mode == "window" else "PERCENTILES"
            raise ValueError(f"INPUT.INTENSITY.{key} must be two numbers (low, high), got "
                             f"{list(pair)}")
        return cls(mode, float(pair[0]), float(pair[1]))

    def range_of(self, a: np.ndarray) -> Tuple[float, float]:
        """The raw values that become 0 and 255 in the float64 image ``a``."""
        if self.mode == "window":
            return self.low, self.high
        if not a.size:
            return 0.0, 0.0
        if self.mode == "percentile":
            lo, hi = np.percentile(a, (self.low, self.high))
            if hi > lo:
                return float(lo), float(hi)
            # most pixels one value (a sparse bright structure on a flat background): the
            # percentiles meet, and would make the image black; its own range instead
        return float(a.min()), float(a.max())

    def describe(self) -> str:
        if self.mode == "window":
            return f"the fixed window {self.low:g}..{self.high:g} (INPUT.INTENSITY.WINDOW)"
        if self.mode == "percentile":
            return (f"the image's own percentiles {self.low:g} and {self.high:g} "
                    f"(INPUT.INTENSITY.PERCENTILES)")
        return "the image's own minimum and maximum (INPUT.INTENSITY.SCALING minmax)"


_scaling = IntensityScaling()


def set_intensity_scaling(scaling: IntensityScaling) -> None:
    """The process's default :class:`IntensityScaling` (what :func:`read_image` uses when not
    given one, e.g. inside detectron2's ``DatasetMapper``); ``d2seg.engine.setup`` and
    ``tools/predict.py`` set it from the config. Data-loader workers forked later inherit it."""
    global _scaling
    _scaling = scaling


def intensity_scaling() -> IntensityScaling:
    """The process's default :class:`IntensityScaling`."""
    return _scaling


def to_uint8(array: np.ndarray, what: str = "image",
             scaling: Optional[IntensityScaling] = None) -> np.ndarray:
    """``array`` (any integer or float dtype) scaled to uint8 0-255 by ``scaling`` (default:
    the process's, :func:`set_intensity_scaling`; "minmax" unless set): values outside its
    range clipped. uint8 is returned unchanged; a constant array (an empty range) becomes 0.
    NaN / inf are refused."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    scaling = scaling or _scaling
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: NaN or infinite pixel values")
    lo, hi = scaling.range_of(a)
    global _warned
    if not _warned:
        _warned = True
        logger.warning(f"{what}: {array.dtype} pixels ({float(a.min()) if a.size else 0:g}.."
                       f"{float(a.max()) if a.size else 0:g}) scaled to 0-255 by "
                       f"{scaling.describe()}, as is every such image (the models take 8-bit "
                       f"input; INPUT.INTENSITY chooses the scaling)")
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# the image file a mapper is mapping (set by :func:`mapping_image`): detectron2's DatasetMapper
# reads the image and the label map of a grey ("L") model both with format "L", and only the
# image may be scaled
_mapping = contextvars.ContextVar("d2seg_mapping_image", default="")


@contextlib.contextmanager
def mapping_image(file_name: str) -> Iterator[None]:
    """Within the block, :func:`read_image` of ``file_name`` with format "L" (and ``scale``
    unset) treats it as an image, scaling a 16-bit / float file: what a mapper of a grey model
    that reads it through detectron2's ``read_image`` (detectron2's ``DatasetMapper``) needs.
    Its label map, read as "L" too, stays the stored ids."""
    token = _mapping.set(str(file_name))
    try:
        yield
    finally:
        _mapping.reset(token)


def read_image(file_name: str, format: Optional[str] = None,
               scale: Optional[bool] = None,
               scaling: Optional[IntensityScaling] = None) -> np.ndarray:
    """detectron2's ``read_image`` (EXIF orientation applied; (H, W, C) uint8 in ``format``),
    with 16-bit and float images scaled to 0-255 (``scaling``, default the process's:
    :func:`set_intensity_scaling`) instead of clipped.

    Args:
        scale: whether the file is an image whose values are intensities (scaled when it has
            more than 8 bits) rather than a mask of class ids (never scaled). None: decided by
            ``format``: colour formats ("BGR", "RGB", "YUV-BT.601") scale, "L" (how detectron2
            reads masks) does not, except for the image of :func:`mapping_image`; d2seg's
            mappers pass True for images in any format (a grey model's "L").
    """
    if scale is None:
        scale = format in _COLOR_FORMATS or (format == "L" and str(file_name) == _mapping.get())
    if not scale or format not in _COLOR_FORMATS + ("L",):
        return _detectron2_read_image(file_name, format)
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = detection_utils._apply_exif_orientation(image)
        if image.mode in HIGH_BIT_MODES:
            image = Image.fromarray(to_uint8(np.asarray(image), str(file_name), scaling),
                                    mode="L")
        return detection_utils.convert_PIL_to_numpy(image, format)


def image_size(path: str, decode: bool = False) -> Tuple[int, int]:
    """(height, width) of an image file as :func:`read_image` returns it: EXIF orientations
    5-8 (rotated by 90 degrees, as phone photos often are) swap the header's width and height.

    Args:
        decode: also decode the pixels (finds truncated / corrupt files); False reads the
            header only.

    Raises:
        OSError / ValueError: missing, unreadable or (with ``decode``) corrupt files.
    """
    with PathManager.open(path, "rb") as f, Image.open(f) as im:
        w, h = im.size
        if decode:
            im.load()
        if im.format == "PNG" and not decode and \
                not any("exif" in str(k).lower() for k in im.info):
            # Pillow's PNG getexif() decodes every pixel to look for an eXIf chunk after the
            # image data (10 ms of a 512x512 slice, for every image of a folder dataset); the
            # chunk belongs before it, where the header read has already found it (as it
            # finds ImageMagick's "Raw profile type exif" text chunk)
            orientation = 1
        else:
            orientation = im.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return h, w


class LabelMapError(ValueError):
    """A label map file that decodes but whose values are not class ids."""


def read_sem_seg(file_name: str) -> np.ndarray:
    """A label map as its class ids: (H, W) array, EXIF orientation applied as for the image.

    The values are read as stored: "L" and palette ("P", e.g. Pascal VOC) PNGs give uint8 (for
    a palette image, the palette indices, not the colours), 16-bit and 32-bit ones give their
    integer ids (uint16 / int32), bilevel ("1") ones 0 and 1 (uint8). A grey label map saved as
    RGB(A) with equal channels gives that one channel; an alpha channel is ignored.

    Raises:
        LabelMapError (a ValueError) naming the file: a colour-coded map (RGB channels that
        differ: the colours need a colour -> id table first), or float values that are not
        whole numbers.
    """
    with PathManager.open(file_name, "rb") as f:
        im = detection_utils._apply_exif_orientation(Image.open(f))
        mode = im.mode
        m = np.array(im)  # a writable copy: fvcore's flips hand it to torch.from_numpy
    if mode == "1":
        return m.astype(np.uint8)
    if mode == "F":
        if not (np.isfinite(m).all() and np.array_equal(m, np.rint(m))):
            raise LabelMapError(f"{file_name}: label map of float values that are not "
                                f"whole numbers; class ids must be integers")
        return m.astype(np.int32)
    if m.ndim == 3:
        if mode in ("LA", "La", "PA"):
            return np.ascontiguousarray(m[..., 0])
        c = m[..., :3]
        if not ((c[..., 0] == c[..., 1]).all() and (c[..., 0] == c[..., 2]).all()):
            raise LabelMapError(f"{file_name}: a colour-coded label map ({mode} with "
                                f"channels that differ); d2seg reads class ids as stored "
                                f"values, so save it as a one-channel (\"L\") or palette "
                                f"(\"P\") PNG of ids, e.g. with a colour -> id table and "
                                f"Image.fromarray(ids.astype('uint8'))")
        return np.ascontiguousarray(m[..., 0])
    return m


def install() -> None:
    """Make ``detectron2.data.detection_utils.read_image`` this module's :func:`read_image`
    (idempotent)."""
    detection_utils.read_image = read_image
