"""File helpers shared by the checkpoint and dataset-cache writers."""
from __future__ import annotations

import os

__all__ = ["umask_mode", "writable_dir_problem"]


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: the permissions ``open(path, "w")`` gives a new file.

    ``tempfile.mkstemp`` (used for atomic writes: temporary file + rename) creates files 0600;
    they get this mode before the rename, so that a checkpoint or cached json is as readable
    to others as detectron2's own files are (0644 with the usual umask 022).
    """
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def writable_dir_problem(path: str) -> str:
    """Why ``path`` cannot be an output folder ("" when it can): created here if missing; a
    file in its place or a folder this process cannot write into is the problem, said before
    a tool builds its model rather than as a traceback after it."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"'{path}' is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"'{path}' cannot be created ({e.strerror or e})"
    probe = os.path.join(path, f".d2seg_write_test_{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return f"'{path}' is not writable ({e.strerror or e})"
    return ""
