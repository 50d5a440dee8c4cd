"""Errors about input data; their messages name the offending file."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["BadInputError", "DatasetLoadError", "MapperSetupError", "guard_load"]

T = TypeVar("T")


class BadInputError(RuntimeError):
    """An input file (image, mask) that cannot be used for training."""


class MapperSetupError(ValueError):
    """A mapper that cannot work with the dataset or config it was given (e.g. a dataset
    without label maps for a semantic mapper): raised for every input alike, so
    ``D2SEG.BAD_INPUT.POLICY: skip`` never skips it as one bad file."""


class DatasetLoadError(ValueError):
    """A dataset description (json, folder) that cannot be loaded."""


def guard_load(path: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; any failure is re-raised as :class:`DatasetLoadError` naming
    ``path`` (the chained exception keeps the original traceback)."""
    try:
        return fn(*args, **kwargs)
    except DatasetLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file's name
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        # a file the description names that is missing is the problem itself (the dataset
        # check cannot list more: it needs the loaded dataset)
        hint = "" if isinstance(e, FileNotFoundError) else \
            "; tools/check_dataset.py lists every problem"
        raise DatasetLoadError(
            f"{path}: cannot be loaded as a dataset ({detail}){hint}"
        ) from e
