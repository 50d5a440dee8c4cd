"""Training hooks d2seg adds to detectron2's defaults."""
from __future__ import annotations

from typing import List

from detectron2.engine import HookBase

__all__ = ["extend_hooks"]


def extend_hooks(trainer, hooks: List[HookBase]) -> List[HookBase]:
    """Return ``hooks`` (detectron2's defaults for ``trainer``) with d2seg's hooks inserted.

    detectron2's writer hook (``PeriodicWriter``) stays last so that it sees every metric.
    """
    return hooks
