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
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from ..utils.files import umask_mode

__all__ = ["build_once", "file_lock", "cache_root", "file_key"]


def cache_root() -> str:
    """The root of d2seg's derived data: ``$D2SEG_DATASETS`` if set, else ``~/.cache/d2seg``."""
    return os.environ.get("D2SEG_DATASETS") or os.path.join(
        os.path.expanduser("~"), ".cache", "d2seg")


def file_key(*paths: str, extra: Any = None) -> str:
    """16 hex digits naming the content of ``paths`` (absolute path, size and modification
    time of each) and ``extra`` (any json-able settings): a cache folder's name."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


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
