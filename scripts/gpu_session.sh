#!/usr/bin/env bash
# The GPU measurements of issues 3 and 7 for a session that is lent a GPU machine through the
# workplace's `device` tool (15 minutes of device time in all, a machine start included).
# First, here: `bash scripts/gpu_prepare.sh ../shared/data` (wheels + a transfer copy of ISBI
# in .gpu_carry/). Then through the device tool, with carry [".gpu_carry"], timeout_s 600:
#   bash scripts/gpu_session.sh all        # everything in one command of under 10 minutes:
#       ISBI anchor (d2seg U-Net vs plain PyTorch U-Net, 1500 x 4, full slices), gpu-semantic,
#       gpu-maskrcnn (vs plain detectron2 only), gpu-panoptic, each trimmed to few rounds
#   bash scripts/gpu_session.sh semantic   # fuller: ISBI anchor + the whole gpu-semantic preset
#   bash scripts/gpu_session.sh instance   # fuller: gpu-maskrcnn + gpu-panoptic presets
# Every step has its own time limit, so one slow step (e.g. torch.compile) cannot lose the
# others' results; a killed step's per-round timings are still in the log. Results (JSON + the
# log) go to $OUT (the device tool brings them back) or output/gpu_session/.
# D2SEG_GPU_DRY=1 runs the same plumbing on this CPU at toy sizes (.venv's python, no install).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
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
DRY=${D2SEG_GPU_DRY:-0}
isbi_anchor() {  # isbi_anchor SECONDS [extra opts for d2seg's run]
  local secs=$1; shift
  local data=.gpu_carry/data args
  [ -d "$data/isbi2012_membrane" ] || data=../shared/data
  if [ ! -d "$data/isbi2012_membrane" ]; then
    echo "=== isbi_anchor: skipped (no .gpu_carry/data/isbi2012_membrane)" | tee -a "$LOG"; return
  fi
  if [ "$DRY" = 1 ]; then
    args=(--preset cpu --iters 4 --opts MODEL.UNET.BASE_CHANNELS 8 INPUT.CROP.SIZE "(64, 64)")
  else
    args=(--preset gpu)
    [ $# -gt 0 ] && args+=(--opts "$@")
  fi
  step isbi_anchor "$secs" $PY benchmarks/isbi.py --data "$data" --archs unet --reference \
    --output-dir /tmp/isbi_out --results "$OUTDIR/isbi_gpu.json" "${args[@]}"
}
bench() {  # bench NAME SECONDS PRESET [harness args]: the preset (cpu-smoke when dry)
  local name=$1 secs=$2 preset=$3; shift 3
  if [ "$DRY" = 1 ]; then set -- ; preset=cpu-smoke; fi
  step "$name" "$secs" $PY tools/benchmark.py --preset "$preset" "$@" \
    --json "$OUTDIR/benchmark_${name#gpu_}.json"
}
case "$PART" in
  all)
    # 210 + 170 + 110 + 80 s of limits: the command ends inside the tool's 600 s.
    isbi_anchor 210 D2SEG.SPEED.COMPILE off
    bench gpu_semantic 170 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --infer-iters 5 --latency-iters 10
    bench gpu_maskrcnn 110 gpu-maskrcnn --refs plain_d2 --repeats 2 --iters 10 \
      --loop-iters 20 --infer-iters 3 --latency-iters 5
    bench gpu_panoptic 80 gpu-panoptic --repeats 2 --iters 10 --warmup 5 --no-inference
    ;;
  semantic)
    isbi_anchor 270
    bench gpu_semantic 290 gpu-semantic --repeats 2
    ;;
  instance)
    bench gpu_maskrcnn 300 gpu-maskrcnn --repeats 2
    bench gpu_panoptic 240 gpu-panoptic --repeats 2
    ;;
  *) echo "gpu_session: unknown part '$PART' (all|semantic|instance)"; exit 2 ;;
esac
ls -la "$OUTDIR"
