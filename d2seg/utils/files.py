"""File helpers shared by the checkpoint and dataset-cache writers."""
from __future__ import annotations

import os

__all__ = ["umask_mode"]


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: the permissions ``open(path, "w")`` gives a new file.

    ``tempfile.mkstemp`` (used for atomic writes: temporary file + rename) creates files 0600;
    they get this mode before the rename, so that a checkpoint or cached json is as readable
    to others as detectron2's own files are (0644 with the usual umask 022).
    """
    current = os.umask(0)
    os.umask(current)
    return mode & ~current
