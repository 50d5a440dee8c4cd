import atexit
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Generated datasets of the whole test session go to one temporary cache, unless the caller
# chose one (CI may keep a cache between steps).
if "D2SEG_DATASETS" not in os.environ:
    os.environ["D2SEG_DATASETS"] = tempfile.mkdtemp(prefix="d2seg-test-cache-")
    # removed when the session's process ends (processes it starts inherit the variable and
    # register nothing); ~60 MB were left in /tmp by every run
    atexit.register(shutil.rmtree, os.environ["D2SEG_DATASETS"], True)

# CPU AMP "auto" measures bf16 against fp32 on the CPU it runs on (d2seg/engine/fast_paths.py);
# the suite pins that measurement to "no faster", so every CPU runs the same (fp32) numerics.
# tests/test_fast_paths.py covers the measurement and the bf16 decision explicitly.
os.environ.setdefault("D2SEG_CPU_BF16_SPEEDUP", "1.0")

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
def isbi_registered(shared_data) -> str:
    """The builtin ISBI catalogs registered from ``shared_data`` (once per session, whatever
    the order of the tests; the environment is left as it was); returns ``shared_data``."""
    from detectron2.data import DatasetCatalog

    if "isbi2012_membrane_train" not in DatasetCatalog.list():
        from d2seg.data import register_all_builtin

        old = os.environ.get("D2SEG_SHARED_DATA")
        os.environ["D2SEG_SHARED_DATA"] = shared_data
        try:
            register_all_builtin()
        finally:
            if old is None:
                del os.environ["D2SEG_SHARED_DATA"]
            else:
                os.environ["D2SEG_SHARED_DATA"] = old
    return shared_data


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


def toy_nan_model(name: str, is_bad):
    """Register (once) and return a meta-architecture ``name``: one 1x1 conv on the batch's
    images, loss ``{"loss_toy": ...}``, NaN on the calls where ``is_bad(calls)`` is true."""
    import torch
    from torch import nn

    from detectron2.modeling import META_ARCH_REGISTRY

    if name in META_ARCH_REGISTRY:
        return META_ARCH_REGISTRY.get(name)

    class Toy(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1)
            self.calls = 0

        @property
        def device(self):
            return self.conv.weight.device

        def forward(self, batched_inputs):
            x = torch.stack([d["image"].float() / 255 for d in batched_inputs])
            loss = (self.conv(x) - 0.5).pow(2).mean()
            if is_bad(self.calls):
                loss = loss * float("nan")
            self.calls += 1
            return {"loss_toy": loss}

    Toy.__name__ = Toy.__qualname__ = name
    META_ARCH_REGISTRY.register(Toy)
    return Toy
