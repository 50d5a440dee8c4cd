"""d2seg.data.prefetch.DevicePrefetcher (D2SEG.SPEED.DEVICE_PREFETCH): order, the end of the
loader, errors raised in the training thread, stopping an infinite loader, and identical
training with and without it (CPU; the CUDA stream path is measured by the GPU benchmarks)."""
import threading
import time

import pytest
import torch

from d2seg.data.prefetch import DevicePrefetcher, move_to_device
from d2seg.engine import fast_paths

from test_fast_paths import UNET, _cfg, _train


def _batches(n):
    return [[{"image": torch.full((3, 4, 4), i, dtype=torch.uint8), "file_name": f"{i}.png",
              "sem_seg": torch.full((4, 4), i, dtype=torch.long)}] for i in range(n)]


def _threads():
    return [t for t in threading.enumerate() if t.name == "d2seg-device-prefetch"]


def _wait_no_threads(timeout=5.0):
    end = time.time() + timeout
    while _threads() and time.time() < end:
        time.sleep(0.05)
    return not _threads()


def test_move_to_device_copies_containers_and_keeps_other_objects():
    obj = {"a": [torch.ones(2), ("x", torch.zeros(1))], "b": 3, "c": None}
    out = move_to_device(obj, torch.device("cpu"))
    assert out is not obj and out["a"] is not obj["a"]
    assert torch.equal(out["a"][0], obj["a"][0]) and out["a"][1][0] == "x"
    assert out["b"] == 3 and out["c"] is None


def test_yields_every_batch_in_order_then_stops():
    data = _batches(7)
    got = list(DevicePrefetcher(data, "cpu", depth=2))
    assert len(got) == 7
    for i, batch in enumerate(got):
        assert batch[0]["file_name"] == f"{i}.png"
        assert int(batch[0]["image"][0, 0, 0]) == i and batch[0]["sem_seg"].dtype == torch.long
    assert _wait_no_threads()


def test_loader_error_is_raised_in_the_training_thread():
    def loader():
        yield from _batches(2)
        raise KeyError("bad annotation in 3.png")

    it = iter(DevicePrefetcher(_Gen(loader), "cpu", depth=1))
    next(it), next(it)
    with pytest.raises(KeyError, match="bad annotation"):
        next(it)
    assert _wait_no_threads()


class _Gen:
    """An iterable that calls a generator function on each iter()."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self.fn()


def test_close_stops_an_infinite_loader():
    def forever():
        i = 0
        while True:
            yield _batches(1)[0]
            i += 1

    pf = DevicePrefetcher(_Gen(forever), "cpu", depth=3)
    it = iter(pf)
    for _ in range(5):
        next(it)
    pf.close()
    assert _wait_no_threads()


def test_a_new_iterator_closes_the_previous_one():
    pf = DevicePrefetcher(_batches(50), "cpu", depth=1)
    first = iter(pf)
    next(first)
    second = iter(pf)
    assert [b[0]["file_name"] for b in [next(second), next(second)]] == ["0.png", "1.png"]
    pf.close()
    assert _wait_no_threads()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        DevicePrefetcher([], "cpu", depth=0)
    cfg = _cfg(UNET)
    cfg.D2SEG.SPEED.DEVICE_PREFETCH_DEPTH = 0
    with pytest.raises(ValueError, match="D2SEG.SPEED.DEVICE_PREFETCH_DEPTH.*0"):
        fast_paths.resolve(cfg)


def test_auto_is_off_and_on_is_on():
    assert not fast_paths.resolve(_cfg(UNET)).device_prefetch
    plan = fast_paths.resolve(_cfg(UNET, "D2SEG.SPEED.DEVICE_PREFETCH", "on",
                                   "D2SEG.SPEED.DEVICE_PREFETCH_DEPTH", "3"))
    assert plan.device_prefetch and plan.device_prefetch_depth == 3
    assert "device_prefetch=on" in fast_paths.describe(
        _cfg(UNET, "D2SEG.SPEED.DEVICE_PREFETCH", "on"))
    # without loader workers the plan says off (what the loader then does)
    assert not fast_paths.resolve(_cfg(UNET, "D2SEG.SPEED.DEVICE_PREFETCH", "on",
                                       "DATALOADER.NUM_WORKERS", "0")).device_prefetch


def test_training_with_prefetch_is_identical(tmp_path):
    _, loss0, p0 = _train(tmp_path, "plain")
    trainer, loss1, p1 = _train(tmp_path, "prefetch", "D2SEG.SPEED.DEVICE_PREFETCH", "on",
                                "DATALOADER.NUM_WORKERS", "1")
    assert isinstance(trainer._trainer.data_loader, DevicePrefetcher)
    assert loss0 == loss1 and torch.equal(p0, p1)


def test_without_workers_device_prefetch_stays_off(caplog):
    """With DATALOADER.NUM_WORKERS 0 the mapper, and PositionSeededMapper's seeding and
    restoring of the process-wide random states, would run in the prefetch thread, racing the
    training step's own draws: the prefetcher is not used, with a warning."""
    import logging

    from d2seg.data.build import build_train_loader

    opts = ["D2SEG.SPEED.DEVICE_PREFETCH", "on", "D2SEG.SHAPES.NUM_TRAIN", "6",
            "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "96"]
    with caplog.at_level(logging.WARNING, logger="d2seg.data.build"):
        loader = build_train_loader(_cfg(UNET, *opts, "DATALOADER.NUM_WORKERS", "0"))
    assert not isinstance(loader, DevicePrefetcher)
    assert "DEVICE_PREFETCH is left off: it needs DATALOADER.NUM_WORKERS > 0" in caplog.text
    loader = build_train_loader(_cfg(UNET, *opts, "DATALOADER.NUM_WORKERS", "1"))
    assert isinstance(loader, DevicePrefetcher)

