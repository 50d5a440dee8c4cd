"""Folders that d2seg derives once and caches on disk (generated shapes data, remapped label
maps, separated panoptic annotations), built safely when several processes ask at once.

Every process of a distributed run registers its datasets, so each may find a cache folder
missing at the same moment. :func:`build_once` builds it in one process, under a file lock,
into a temporary folder renamed into place when complete; the others wait for the lock and
find it done. A folder left incomplete by a killed run is rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from typing import Callable, Iterator

from ..utils.files import umask_mode

__all__ = ["build_once", "file_lock"]


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(folder: str, marker: str, build: Callable[[str], None]) -> str:
    """``folder``, built by ``build(tmp_folder)`` unless ``folder/marker`` exists.

    Args:
        folder: the cache folder.
        marker: a file that ``build`` writes last; its presence means the folder is complete.
        build: fills the temporary folder it is given (same file system as ``folder``).

    Returns:
        ``folder``.

    Raises:
        RuntimeError: ``build`` returned without writing ``marker``.
    """
    if os.path.isfile(os.path.join(folder, marker)):
        return folder
    root = os.path.dirname(os.path.abspath(folder))
    os.makedirs(root, exist_ok=True)
    with file_lock(os.path.join(root, ".lock")):
        if os.path.isfile(os.path.join(folder, marker)):  # another process built it meanwhile
            return folder
        if os.path.exists(folder):  # left incomplete (a killed run, an older layout)
            shutil.rmtree(folder, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=root)
        try:
            build(tmp)
            if not os.path.isfile(os.path.join(tmp, marker)):
                raise RuntimeError(f"building {folder} wrote no {marker}")
            # mkdtemp's 0700 would hide a shared cache from the other users the umask admits
            os.chmod(tmp, umask_mode(0o777))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
