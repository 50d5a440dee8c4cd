"""Reading images with more than 8 bits per pixel (16-bit and float TIFF / PNG: EM and medical
data often are).

detectron2's ``read_image`` converts every image to the 8-bit format the models take through
PIL, which clips a 16-bit image at 255 (almost all white) and a float one to 0 or 1 (black):
the model then trains on, or predicts, a constant image without any message. d2seg reads such
images by scaling each one by its own minimum and maximum to 0-255 (logged for the first such
image in a process), then converts as detectron2 does.

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

import logging
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["read_image", "read_sem_seg", "image_size", "LabelMapError", "to_uint8",
           "HIGH_BIT_MODES", "install"]

# PIL modes of one-channel images with more than 8 bits (integer or float)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# formats whose values are intensities (scaled); others ("L" for masks, None) are kept as read
_COLOR_FORMATS = ("BGR", "RGB", "YUV-BT.601")
_warned = False
_detectron2_read_image = detection_utils.read_image


def to_uint8(array: np.ndarray, what: str = "image") -> np.ndarray:
    """``array`` (any integer or float dtype) scaled by its own minimum and maximum to uint8
    0-255; uint8 is returned unchanged, a constant array becomes 0. NaN / inf are refused."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: NaN or infinite pixel values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    global _warned
    if not _warned:
        _warned = True
        logger.warning(f"{what}: {array.dtype} pixels ({lo:g}..{hi:g}) scaled to 0-255 by the "
                       f"image's own minimum and maximum, as is every such image (the models "
                       f"take 8-bit input); convert them beforehand for another scaling")
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_image(file_name: str, format: Optional[str] = None,
               scale: Optional[bool] = None) -> np.ndarray:
    """detectron2's ``read_image`` (EXIF orientation applied; (H, W, C) uint8 in ``format``),
    with 16-bit and float images scaled to 0-255 by their own range instead of clipped.

    Args:
        scale: whether the file is an image whose values are intensities (scaled when it has
            more than 8 bits) rather than a mask of class ids (never scaled). None: decided by
            ``format``: colour formats ("BGR", "RGB", "YUV-BT.601") scale, "L" (how detectron2
            reads masks) does not; d2seg's mappers pass True for images in any format (a grey
            model's "L").
    """
    if scale is None:
        scale = format in _COLOR_FORMATS
    if not scale or format not in _COLOR_FORMATS + ("L",):
        return _detectron2_read_image(file_name, format)
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = detection_utils._apply_exif_orientation(image)
        if image.mode in HIGH_BIT_MODES:
            image = Image.fromarray(to_uint8(np.asarray(image), str(file_name)), mode="L")
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
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        if decode:
            im.load()
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
