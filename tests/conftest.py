import os
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Generated datasets of the whole test session go to one temporary cache, unless the caller
# chose one (CI may keep a cache between steps).
if "D2SEG_DATASETS" not in os.environ:
    os.environ["D2SEG_DATASETS"] = tempfile.mkdtemp(prefix="d2seg-test-cache-")

SHARED_DATA = os.environ.get("D2SEG_SHARED_DATA") or os.path.normpath(
    os.path.join(REPO, "..", "shared", "data")
)


@pytest.fixture(scope="session")
def shared_data() -> str:
    """Path of ../shared/data (real datasets); skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data not found at {SHARED_DATA} (set D2SEG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO
