"""The GPU-lease scripts (scripts/gpu_prepare.sh, scripts/gpu_session.sh) parse, and the
session script's plumbing runs on CPU in its dry mode."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(REPO, "scripts", n) for n in ("gpu_prepare.sh", "gpu_session.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)


def test_session_rejects_unknown_part(tmp_path):
    # the dry mode runs this suite's interpreter (D2SEG_GPU_DRY_PY), whichever it is
    env = dict(os.environ, D2SEG_GPU_DRY="1", D2SEG_GPU_DRY_PY=sys.executable, OUT=str(tmp_path))
    p = subprocess.run(["bash", SCRIPTS[1], "nonsense"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown part 'nonsense'" in p.stdout
    # the message lists every part the script has
    text = open(SCRIPTS[1]).read()
    parts = re.findall(r"^  ([a-z0-9-]+)\)", text, flags=re.M)
    listed = p.stdout.split("(")[-1].rstrip(")\n").split("|")
    assert sorted(parts) == sorted(listed), (parts, listed)
    log = (tmp_path / "session_nonsense.log").read_text()
    assert "torch" in log and "d2" in log  # the environment line was written first


def test_session_needs_a_part(tmp_path):
    """No default part: a bare call (easy to make by mistake) must not spend device time."""
    env = dict(os.environ, D2SEG_GPU_DRY="1", OUT=str(tmp_path))
    p = subprocess.run(["bash", SCRIPTS[1]], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage:" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written
