"""d2seg.data.cache.build_once: a cache folder built once when several processes ask at once
(every rank of a distributed run registers its datasets)."""
import multiprocessing as mp
import os
import time

import pytest

from d2seg.data.cache import build_once


def _build_slowly(folder, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(os.path.join(tmp, "part.txt"), "w") as f:
            f.write("x")
        time.sleep(0.5)  # the others arrive while this one builds
        open(os.path.join(tmp, "done"), "w").close()

    build_once(folder, "done", build)
    assert sorted(os.listdir(folder)) == ["done", "part.txt"]


def test_concurrent_processes_build_the_folder_once(tmp_path):
    folder, log = str(tmp_path / "cache" / "x"), str(tmp_path / "log.txt")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_slowly, args=(folder, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with open(log) as f:
        assert len(f.read().split()) == 1
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".x.tmp-")]


def test_an_incomplete_folder_is_rebuilt_and_a_build_without_marker_fails(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "stale.txt").write_text("left by a killed run")
    build_once(str(folder), "done", lambda tmp: open(os.path.join(tmp, "done"), "w").close())
    assert os.listdir(folder) == ["done"]
    from d2seg.utils.files import umask_mode

    assert os.stat(folder).st_mode & 0o777 == umask_mode(0o777)  # as mkdir would make it
    with pytest.raises(RuntimeError, match="wrote no done"):
        build_once(str(tmp_path / "y"), "done", lambda tmp: None)
    assert not (tmp_path / "y").exists()
