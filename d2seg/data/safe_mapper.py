"""A mapper wrapper that turns unreadable or inconsistent inputs into a clear error or a skip.

detectron2's mappers fail on a corrupt image with a bare ``PIL.UnidentifiedImageError`` or
``OSError`` deep inside a data-loader worker, without the file's name. ``SafeMapper`` names the
file and, with ``D2SEG.BAD_INPUT.POLICY = "skip"``, returns ``None`` instead, which makes
detectron2's ``MapDataset`` train on another image (each skip logged with its path, at most
``D2SEG.BAD_INPUT.MAX_SKIPS`` per data-loader process).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from PIL import UnidentifiedImageError

from detectron2.data.detection_utils import SizeMismatchError

logger = logging.getLogger(__name__)

__all__ = ["BadInputError", "SafeMapper", "INPUT_ERRORS", "is_input_error"]

from .errors import BadInputError, MapperSetupError  # noqa: E402

# What reading a broken image / mask / annotation raises (PIL raises SyntaxError for some
# malformed PNG chunks, cv2 raises cv2.error, a subclass of Exception we match by name).
INPUT_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, SizeMismatchError,
                EOFError, IndexError, AssertionError)  # detectron2 asserts on shape mismatches


def is_input_error(e: BaseException) -> bool:
    """Whether ``e`` is what reading a broken or non-image file raises (not a
    :class:`~d2seg.data.errors.MapperSetupError`: every input would fail alike)."""
    if isinstance(e, MapperSetupError):
        return False
    return isinstance(e, INPUT_ERRORS) or type(e).__name__ == "error"  # cv2.error


class SafeMapper:
    """Wrap ``mapper`` (dataset dict -> model input) with bad-input handling.

    Args:
        mapper: e.g. detectron2's ``DatasetMapper``.
        policy: "fail" (raise :class:`BadInputError` naming the file) or "skip".
        max_skips: skips allowed in one process before failing anyway.
        num_inputs: the dataset's size, where known: once that many different inputs failed
            in this process, every input is bad (detectron2's loader would stop with "Sample
            larger than population"), and the error says so.
    """

    def __init__(self, mapper: Callable[[Dict], Any], policy: str = "fail", max_skips: int = 100,
                 num_inputs: int = 0):
        if policy not in ("fail", "skip"):
            raise ValueError(f"D2SEG.BAD_INPUT.POLICY must be 'fail' or 'skip', got '{policy}'")
        self.mapper, self.policy, self.max_skips = mapper, policy, int(max_skips)
        self.num_inputs = int(num_inputs)
        self.skipped = 0
        self._failed: set = set()

    def __call__(self, dataset_dict: Dict) -> Optional[Any]:
        try:
            return self.mapper(dataset_dict)
        except Exception as e:  # noqa: BLE001 - filtered right below
            if not is_input_error(e):
                raise
            files = [dataset_dict.get(k) for k in ("file_name", "sem_seg_file_name",
                                                    "pan_seg_file_name") if dataset_dict.get(k)]
            what = f"{' / '.join(map(str, files)) or dataset_dict.get('image_id', '?')}: " \
                   f"{type(e).__name__}: {e}"
            self._failed.add(str(files[0]) if files else str(dataset_dict.get("image_id")))
            if self.num_inputs and len(self._failed) >= self.num_inputs:
                raise BadInputError(f"Every one of the {self.num_inputs} training inputs failed "
                                    f"to load; the last: {what} (the settings that read them, "
                                    f"e.g. INPUT.FORMAT, or the data: tools/check_dataset.py)"
                                    ) from e
            if self.policy == "skip" and self.skipped < self.max_skips:
                self.skipped += 1
                logger.warning(f"Skipping bad input ({self.skipped}/{self.max_skips}): {what}")
                return None
            hint = ("more than D2SEG.BAD_INPUT.MAX_SKIPS bad inputs" if self.policy == "skip"
                    else "set D2SEG.BAD_INPUT.POLICY skip to train past such files")
            raise BadInputError(f"Cannot use training input {what} ({hint}; "
                                f"tools/check_dataset.py lists every problem)") from e
