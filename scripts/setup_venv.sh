#!/usr/bin/env bash
# Create .venv (Python 3.11) and install torch, detectron2 and d2seg into it.
# Idempotent: a stamp file records the hash of the inputs; when nothing changed it exits at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.d2seg-setup-stamp"
want=$(cat scripts/setup_venv.sh setup.py requirements.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import d2seg, detectron2" 2>/dev/null; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --progress-bar off --upgrade "pip>=23" wheel
# torch first, pinned, so that nothing later pulls another build.
$PIP install -q --progress-bar off "torch==2.14.1" "torchvision==0.29.1"
# detectron2: upstream is not on PyPI; sal-detectron2 0.7.2 is a snapshot of upstream's pure
# Python code published as a cp310 wheel. Its Python code runs on 3.11; the compiled _C is unused.
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  tmp=$(mktemp -d)
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "sal-detectron2==0.7.2"
  whl=$(ls "$tmp"/sal_detectron2-0.7.2-*.whl | head -n1)
  cp "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  $PIP install -q --progress-bar off --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
fi
$PIP install -q --progress-bar off -r requirements.txt
# panopticapi (needed by detectron2's COCOPanopticEvaluator) is on PyPI as panopticapi-lite: the
# upstream module, unchanged. Its metadata pins numpy<2, which the code does not need.
$PIP install -q --progress-bar off --no-deps "panopticapi-lite==0.2.0"
$PIP install -q --progress-bar off --no-deps -e .
"$VENV/bin/python" -c "import torch, detectron2, d2seg; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__, '| d2seg ok')"
echo "$want" > "$STAMP"
