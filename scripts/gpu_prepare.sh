#!/usr/bin/env bash
# Prepare .gpu_carry/ for a GPU session through the workplace's `device` tool (no registry there):
#   .gpu_carry/whl/   the wheels d2seg needs that the GPU image (Python 3.12, torch 2.11) lacks
#   .gpu_carry/data/  a transfer copy of ../shared/data/isbi2012_membrane (../shared does not travel)
# Then run, through the device tool, with carry [".gpu_carry"]:
#   bash scripts/gpu_session.sh semantic     # ISBI anchor (issue 3) + gpu-semantic (issue 7)
#   bash scripts/gpu_session.sh instance     # gpu-maskrcnn + gpu-panoptic (issue 7)
# .gpu_carry/ is git-ignored; nothing here is committed. About 12 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
DEST=.gpu_carry
PYV=${GPU_PYTHON_VERSION:-3.12}
rm -rf "$DEST/whl" && mkdir -p "$DEST/whl" "$DEST/data"
PLAT=(--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pipq() { python3 -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# Wheels published for any Python / for cp312.
pipq download -q --no-deps --only-binary=:all: --python-version "$PYV" "${PLAT[@]}" -d "$DEST/whl" \
  iopath==0.1.9 yacs==0.1.8 termcolor "omegaconf>=2.1,<2.4" "hydra-core>=1.1" \
  "pycocotools>=2.0.7" "faster-coco-eval>=1.6" panopticapi-lite==0.2.0 "setuptools<81" \
  segmentation-models-pytorch
# Published as source only (pure Python): build the wheels here.
pipq wheel -q --no-deps -w "$DEST/whl" "fvcore>=0.1.5" "antlr4-python3-runtime==4.9.3"
# detectron2: the cp310-tagged wheel of pure Python code, under a name any Python accepts.
tmp=$(mktemp -d)
pipq download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" sal-detectron2==0.7.2
cp "$tmp"/sal_detectron2-0.7.2-*.whl "$DEST/whl/sal_detectron2-0.7.2-py3-none-any.whl"
rm -rf "$tmp"
n=$(ls "$DEST/whl"/*.whl | wc -l)
[ "$n" -ge 13 ] || { echo "gpu_prepare: expected 13 wheels in $DEST/whl, got $n" >&2; exit 1; }
if [ -d "$DATA/isbi2012_membrane" ]; then
  rm -rf "$DEST/data/isbi2012_membrane" && cp -r "$DATA/isbi2012_membrane" "$DEST/data/"
else
  echo "gpu_prepare: $DATA/isbi2012_membrane not found; the ISBI anchor will be skipped" >&2
fi
du -sh "$DEST"
