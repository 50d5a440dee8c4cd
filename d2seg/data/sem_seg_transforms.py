"""Augmentations for semantic segmentation that detectron2 lacks.

* :class:`ForegroundCenteredCrop`: a share of the crops centred on a foreground pixel (class
  imbalance), the rest uniform;
* :class:`RandomRot90` / :class:`Rot90Transform`: exact rotations by multiples of 90 degrees
  (detectron2's ``RandomRotation`` interpolates);
* :class:`RandomElasticDeformation` / :class:`ElasticTransform`: the U-Net paper's elastic
  deformation (random displacements on a coarse grid, interpolated bicubically to every pixel);
* :class:`ResizeShortestEdge`: detectron2's, without the resize when the size stays the same
  (detectron2 still round-trips image and label map through PIL then: a third of the
  mapper's time for 512x512 images trained at 512).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
from fvcore.transforms.transform import CropTransform, NoOpTransform, Transform

from detectron2.data import transforms as T

__all__ = ["ForegroundCenteredCrop", "RandomRot90", "Rot90Transform", "ElasticTransform",
           "RandomElasticDeformation", "ResizeShortestEdge"]


class ResizeShortestEdge(T.ResizeShortestEdge):
    """``detectron2.data.transforms.ResizeShortestEdge`` (same arguments, same random draws)
    that returns a ``NoOpTransform`` where the drawn size is the image's own: the same arrays
    without converting them to PIL images and back."""

    def get_transform(self, image: np.ndarray) -> Transform:
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform) and (t.new_h, t.new_w) == (t.h, t.w):
            return NoOpTransform()
        return t


class ForegroundCenteredCrop(T.Augmentation):
    """Crop of ``crop_size`` (detectron2 ``RandomCrop`` types) whose centre is, with
    probability ``prob``, a uniformly drawn pixel of a foreground class; otherwise the crop
    position is uniform. Near the border the window is shifted to stay inside the image, so
    the chosen pixel is inside the crop but not always at its centre. An image without
    foreground pixels gets a uniform crop.
    """

    def __init__(
        self,
        crop_type: str,
        crop_size: Tuple[float, float],
        prob: float = 0.5,
        foreground_classes: Optional[Sequence[int]] = None,
        ignore_label: int = 255,
    ):
        """
        Args:
            crop_type, crop_size: as ``detectron2.data.transforms.RandomCrop``.
            prob: share of crops centred on foreground, in [0, 1].
            foreground_classes: class ids counting as foreground; None or empty = every class
                except 0 and ``ignore_label``.
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"INPUT.FG_CROP.PROB must be in [0, 1], got {prob}")
        self._crop = T.RandomCrop(crop_type, crop_size)
        fg = sorted(int(c) for c in foreground_classes) if foreground_classes else None
        self._init(dict(crop_type=crop_type, crop_size=crop_size, prob=prob,
                        foreground_classes=fg, ignore_label=ignore_label))

    def _foreground(self, sem_seg: np.ndarray) -> np.ndarray:
        if self.foreground_classes:
            return np.isin(sem_seg, self.foreground_classes)
        return (sem_seg != 0) & (sem_seg != self.ignore_label)

    def get_transform(self, image: np.ndarray, sem_seg: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        ch, cw = self._crop.get_crop_size((h, w))
        ch, cw = min(ch, h), min(cw, w)
        if self._rand_range() < self.prob:
            idx = np.flatnonzero(self._foreground(sem_seg))
            if idx.size:
                y, x = divmod(int(idx[np.random.randint(idx.size)]), w)
                y0 = int(np.clip(y - ch // 2, 0, h - ch))
                x0 = int(np.clip(x - cw // 2, 0, w - cw))
                return CropTransform(x0, y0, cw, ch)
        return CropTransform(np.random.randint(w - cw + 1), np.random.randint(h - ch + 1), cw, ch)


class Rot90Transform(Transform):
    """Rotate by ``k`` x 90 degrees counter-clockwise (``np.rot90``) an image of size (h, w)."""

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes(dict(h=h, w=w, k=k % 4))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) x, y in pixel-edge coordinates."""
        coords = np.asarray(coords, dtype=np.float64).copy()
        w, h = self.w, self.h
        for _ in range(self.k):  # one CCW quarter turn: (x, y) -> (y, w - x); size -> (w, h)
            coords = np.stack([coords[:, 1], w - coords[:, 0]], axis=1)
            w, h = h, w
        return coords

    def inverse(self) -> Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, (4 - self.k) % 4)


class RandomRot90(T.Augmentation):
    """Rotation by a uniformly drawn multiple of 90 degrees (0, 90, 180 or 270)."""

    def __init__(self):
        super().__init__()

    def get_transform(self, image: np.ndarray) -> Transform:
        k = int(np.random.randint(4))
        if k == 0:
            return NoOpTransform()
        return Rot90Transform(image.shape[0], image.shape[1], k)


class ElasticTransform(Transform):
    """Warp by a smooth displacement field given on a coarse ``(g, g, 2)`` grid of (dx, dy)
    pixel displacements; the per-pixel field is the grid resized bicubically to (h, w).
    Output pixel (x, y) takes the input at (x + dx, y + dy): images bilinearly, label maps by
    nearest neighbour (no new class ids), both with reflected borders.
    """

    def __init__(self, h: int, w: int, grid: np.ndarray):
        super().__init__()
        grid = np.asarray(grid, dtype=np.float32)
        if grid.ndim != 3 or grid.shape[2] != 2:
            raise ValueError(f"ElasticTransform: grid must be (g, g, 2), got {grid.shape}")
        self._set_attributes(dict(h=h, w=w, grid=grid))
        self._maps: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def _sample_maps(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            disp = cv2.resize(self.grid, (self.w, self.h), interpolation=cv2.INTER_CUBIC)
            xs, ys = np.meshgrid(np.arange(self.w, dtype=np.float32),
                                 np.arange(self.h, dtype=np.float32))
            self._maps = (xs + disp[..., 0], ys + disp[..., 1])
        return self._maps

    def _warp(self, img: np.ndarray, interp: int) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"ElasticTransform: made for {self.h}x{self.w}, got an array of "
                             f"shape {img.shape}")
        mx, my = self._sample_maps()
        out = cv2.remap(img, mx, my, interpolation=interp, borderMode=cv2.BORDER_REFLECT_101)
        if img.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing channel axis of size 1
            out = out[..., None]
        return out

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8/float image, bilinear."""
        if img.dtype not in (np.uint8, np.float32):  # remap's types; int labels go nearest
            return self._warp(img.astype(np.float32), cv2.INTER_LINEAR).astype(img.dtype)
        return self._warp(img, cv2.INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """(H, W) integer label map, nearest neighbour."""
        if segmentation.dtype in (np.uint8, np.int16, np.uint16, np.float32):
            return self._warp(segmentation, cv2.INTER_NEAREST)
        return self._warp(segmentation.astype(np.float32), cv2.INTER_NEAREST).astype(
            segmentation.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "INPUT.ELASTIC deforms images and label maps only (semantic segmentation); boxes, "
            "polygons and keypoints cannot follow it. Turn INPUT.ELASTIC.ENABLED off for "
            "instance or panoptic data.")


class RandomElasticDeformation(T.Augmentation):
    """The U-Net paper's augmentation (Ronneberger et al. 2015, sec. 3.1): with probability
    ``prob``, (dx, dy) displacements drawn from N(0, ``std``²) pixels on a ``grid`` x ``grid``
    lattice, interpolated bicubically to a smooth per-pixel field (:class:`ElasticTransform`).
    The paper's setting is ``grid=3, std=10``.
    """

    def __init__(self, grid: int = 3, std: float = 10.0, prob: float = 1.0):
        super().__init__()
        if int(grid) < 2:
            raise ValueError(f"INPUT.ELASTIC.GRID must be >= 2, got {grid}")
        if std < 0:
            raise ValueError(f"INPUT.ELASTIC.STD must be >= 0 pixels, got {std}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"INPUT.ELASTIC.PROB must be in [0, 1], got {prob}")
        self._init(dict(grid=int(grid), std=float(std), prob=float(prob)))

    def get_transform(self, image: np.ndarray) -> Transform:
        if self.std == 0 or self._rand_range() >= self.prob:
            return NoOpTransform()
        g = np.random.normal(0.0, self.std, size=(self.grid, self.grid, 2)).astype(np.float32)
        return ElasticTransform(image.shape[0], image.shape[1], g)
