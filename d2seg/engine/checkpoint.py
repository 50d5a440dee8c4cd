"""Crash-safe checkpoint writes.

detectron2/fvcore write ``model_XXXX.pth`` and ``last_checkpoint`` in place: a process killed
mid-write leaves a truncated file that ``--resume`` then fails to load. Here both are written to
a temporary file in the same folder, flushed to disk, and renamed over the target (``os.replace``
is atomic on POSIX), so a reader only ever sees the old file or the complete new one.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.files import umask_mode

__all__ = ["atomic_write_bytes", "AtomicSaveMixin", "D2SegCheckpointer"]


def _atomic_write(path: str, write_fn) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp's 0600 -> what a plain write would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # make the rename itself durable
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    _atomic_write(path, lambda f: f.write(data))


class AtomicSaveMixin:
    """Checkpointer mixin: atomic ``save`` and ``tag_last_checkpoint`` for local folders.

    Non-local save dirs (other PathManager handlers) use the parent's behaviour.
    """

    def _is_local(self) -> bool:
        return "://" not in str(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_bytes(
            os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode()
        )


class D2SegCheckpointer(AtomicSaveMixin, DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoints survive being killed mid-write."""
