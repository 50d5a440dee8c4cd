#!/usr/bin/env bash
# The GPU measurements of issues 3 and 7 in two commands of under 10 minutes each, for a session
# that is lent a GPU machine through the workplace's `device` tool (15 minutes of device time in
# all). First, here: `bash scripts/gpu_prepare.sh ../shared/data` (wheels + a transfer copy of
# ISBI in .gpu_carry/). Then through the device tool, with carry [".gpu_carry"], timeout_s 600:
#   bash scripts/gpu_session.sh semantic   # ISBI anchor: d2seg U-Net vs plain PyTorch U-Net,
#                                          # then --preset gpu-semantic        (~8 min on an H100)
#   bash scripts/gpu_session.sh instance   # --preset gpu-maskrcnn, gpu-panoptic (~8 min)
# Results (JSON + logs) go to $OUT (the device tool brings them back) or output/gpu_session/.
# D2SEG_GPU_DRY=1 runs the same plumbing on this CPU at toy sizes (.venv's python, no install).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: gpu_session.sh semantic|instance}
OUTDIR=${OUT:-output/gpu_session}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 D2SEG_DATASETS=${D2SEG_DATASETS:-/tmp/d2seg_datasets}
LOG="$OUTDIR/session_$PART.log"
if [ "${D2SEG_GPU_DRY:-0}" = 1 ]; then
  PY=.venv/bin/python
else
  PY=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu_carry/whl/*.whl >/dev/null 2>&1 \
    || { echo "gpu_session: installing .gpu_carry/whl failed (run scripts/gpu_prepare.sh and carry .gpu_carry)"; exit 1; }
  # The repository first: sal-detectron2's wheel also installs a top-level 'tools' package.
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step() {  # step NAME SECONDS CMD...: run with a time limit, log it, never stop the session
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 15 "$secs" "$@" 2>&1 | tee -a "$LOG" | grep -E "^\[isbi\]|^\||pass|FAIL|img/s|Error|error" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, torchvision, detectron2, d2seg; print('torch', torch.__version__, 'tv', torchvision.__version__, 'd2', detectron2.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"
case "$PART" in
  semantic)
    if [ "${D2SEG_GPU_DRY:-0}" = 1 ]; then
      ISBI=(--preset cpu --iters 4 --opts MODEL.UNET.BASE_CHANNELS 8 INPUT.CROP.SIZE "(64, 64)" TEST.EVAL_PERIOD 0)
      SEM=(--preset cpu-smoke)
    else
      ISBI=(--preset gpu)
      SEM=(--preset gpu-semantic --repeats 2)
    fi
    if [ -d .gpu_carry/data/isbi2012_membrane ] || [ "${D2SEG_GPU_DRY:-0}" = 1 ]; then
      DATA=.gpu_carry/data; [ -d "$DATA/isbi2012_membrane" ] || DATA=../shared/data
      step isbi_anchor 270 $PY benchmarks/isbi.py --data "$DATA" --archs unet --reference \
        --output-dir /tmp/isbi_out --results "$OUTDIR/isbi_gpu.json" "${ISBI[@]}"
    else
      echo "=== isbi_anchor: skipped (no .gpu_carry/data/isbi2012_membrane)" | tee -a "$LOG"
    fi
    step gpu_semantic 290 $PY tools/benchmark.py "${SEM[@]}" --json "$OUTDIR/benchmark_semantic.json"
    ;;
  instance)
    if [ "${D2SEG_GPU_DRY:-0}" = 1 ]; then
      MRC=(--preset cpu-smoke); PAN=(--preset cpu-smoke)
    else
      MRC=(--preset gpu-maskrcnn --repeats 2); PAN=(--preset gpu-panoptic --repeats 2)
    fi
    step gpu_maskrcnn 300 $PY tools/benchmark.py "${MRC[@]}" --json "$OUTDIR/benchmark_maskrcnn.json"
    step gpu_panoptic 240 $PY tools/benchmark.py "${PAN[@]}" --json "$OUTDIR/benchmark_panoptic.json"
    ;;
  *) echo "gpu_session: unknown part '$PART' (semantic|instance)"; exit 2 ;;
esac
ls -la "$OUTDIR"
