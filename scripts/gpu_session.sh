#!/usr/bin/env bash
# The GPU measurements of issues 3 and 7 for a session that is lent a GPU machine through the
# workplace's `device` tool (15 minutes of device time in all, a machine start included).
# First, here: `bash scripts/gpu_prepare.sh ../shared/data` (wheels + a transfer copy of ISBI
# in .gpu_carry/). Then through the device tool, with carry [".gpu_carry"], timeout_s 600:
#   bash scripts/gpu_session.sh third-lease  # what is open in issue 7 after the H100 lease:
#       the semantic targets with the loop timed first, the largest U-Net batch, FOLD_NORM's
#       share, Mask R-CNN GN compiled (second-lease / second-lease-2: that lease's commands)
#   bash scripts/gpu_session.sh fourth-lease  # after third-lease: DeepLabV3+ with a frozen
#       backbone, DEVICE_PREFETCH with the models compiled, SegFormer-B2 default / CUDA
#       graphs / eager
#   bash scripts/gpu_session.sh eleventh-lease  # FIRST in the next lease (~480 s): issue 7's
#       GPU targets (Mask R-CNN, Panoptic FPN, the semantic preset) with today's code,
#       compared with the lease runs the README quotes (--compare): the regression sweep
#   bash scripts/gpu_session.sh eighth-lease  # then, in a later lease (~530 s): FOLD_NORM's
#       forward-only rule, SegFormer-B2 with and without MATMUL_RESIZE (time for a cold
#       compile), the frozen-backbone DeepLabV3+ loop profiled
#   bash scripts/gpu_session.sh ninth-lease   # then, if ~300 s are left: gpu-semantic (the
#       targets) with session 14's defaults
#   bash scripts/gpu_session.sh tenth-lease   # a later lease (~310 s): the ISBI anchor with
#       the semantic configs' AMP default (bf16 since session 16), the reference in bf16 too;
#       then that U-Net's inference in fp32 and bf16 (INFERENCE_AMP, session 17)
#   bash scripts/gpu_session.sh fifth-lease   # a later lease: HRNet-W48, PSPNet, DeepLabV3
#       with and without CUDA graphs (~580 s of limits)
#   bash scripts/gpu_session.sh sixth-lease   # run 2026-11-27 (session 14): gpu-semantic's
#       loops after the writer fix, DeepLabV3+ with MATMUL_RESIZE (SegFormer: time limits)
#   bash scripts/gpu_session.sh seventh-lease  # run 2026-11-27: FOLD_NORM's eval forward,
#       profiled; the frozen-backbone DeepLabV3+ loop with session 13's loader
#   bash scripts/gpu_session.sh all        # what is open in issue 7, one command of under
#       10 minutes: gpu-semantic with the sync-free step (then with DEVICE_PREFETCH on),
#       Mask R-CNN with its backbone compiled, Mask R-CNN in fp16, the largest U-Net batch
#   bash scripts/gpu_session.sh frozenbn   # then, if budget_left_s > 200: FOLD_NORM alone, the
#       model-zoo Mask R-CNN (FrozenBN) vs plain detectron2 with it on and off, fp16, and
#       RCNN_BATCHED off (its share)
#   bash scripts/gpu_session.sh targets    # the first lease's second command: gpu-semantic
#       (compile on, then off), Mask R-CNN / Panoptic FPN vs plain detectron2 in bf16
#   bash scripts/gpu_session.sh semantic   # fuller: ISBI anchor + the whole gpu-semantic preset
#   bash scripts/gpu_session.sh instance   # fuller: gpu-maskrcnn + gpu-panoptic presets
# Every step has its own time limit, so one slow step (e.g. torch.compile) cannot lose the
# others' results; a killed step's per-round timings are still in the log. Results (JSON + the
# log) go to $OUT (the device tool brings them back) or output/gpu_session/.
# D2SEG_GPU_DRY=1 runs the same plumbing on this CPU at toy sizes (.venv's python, or
# D2SEG_GPU_DRY_PY's; no install).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then  # no default: every part costs minutes of a lease's device time
  echo "usage: bash scripts/gpu_session.sh PART (see the comment at the top of this file)" >&2
  exit 2
fi
PART=$1
OUTDIR=${OUT:-output/gpu_session}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 D2SEG_DATASETS=${D2SEG_DATASETS:-/tmp/d2seg_datasets}
LOG="$OUTDIR/session_$PART.log"
if [ "${D2SEG_GPU_DRY:-0}" = 1 ]; then
  PY=${D2SEG_GPU_DRY_PY:-.venv/bin/python}  # or another, e.g. with the GPU image's torch
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
  timeout -k 15 "$secs" "$@" 2>&1 | tee -a "$LOG" | grep -E "^\[isbi\]|^\||^  (train|eval)|pass|FAIL|img/s|Error|error" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, torchvision, detectron2, d2seg; print('torch', torch.__version__, 'tv', torchvision.__version__, 'd2', detectron2.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"
DRY=${D2SEG_GPU_DRY:-0}
# A lease without a working CUDA torch (or with a failed import) would run every GPU preset on
# the CPU "and say so", spending the whole lease: stop before the first step instead.
if [ "$DRY" != 1 ] && ! $PY -c "import sys, torch, detectron2, d2seg; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_session: no CUDA device, or an import failed (the line above): no step run" | tee -a "$LOG"
  exit 1
fi
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
infer_amp() {  # infer_amp SECONDS RUN_DIR...: benchmarks/inference_amp.py on trained runs
  local secs=$1; shift
  local dev=cuda; [ "$DRY" = 1 ] && dev=cpu
  step inference_amp "$secs" $PY benchmarks/inference_amp.py --runs "$@" --device "$dev" \
    --json "$OUTDIR/inference_amp.json"
}
bench() {  # bench NAME SECONDS PRESET [harness args]: the preset (cpu-smoke when dry)
  local name=$1 secs=$2 preset=$3; shift 3
  if [ "$DRY" = 1 ]; then set -- ; preset=cpu-smoke; fi
  step "$name" "$secs" $PY tools/benchmark.py --preset "$preset" \
    --json "$OUTDIR/benchmark_${name#gpu_}.json" "$@"
}
# The shapes catalogs at 512x512 (as the gpu-semantic preset's SHAPES_512).
SHAPES_512=(D2SEG.SHAPES.IMAGE_SIZE 512 D2SEG.SHAPES.NUM_TRAIN 256 D2SEG.SHAPES.NUM_VAL 4
            INPUT.MIN_SIZE_TRAIN "(512,)" INPUT.MAX_SIZE_TRAIN 1024 INPUT.CROP.SIZE "(512, 512)"
            DATALOADER.NUM_WORKERS 8)
unet_cfg() {  # unet_cfg NAME SECONDS [harness args] -- [opts]: the Shapes U-Net (64 ch), bf16 b16 512
  local name=$1 secs=$2; shift 2
  local dev=(--device cuda --batch 16 --size 512 --precision bf16)
  [ "$DRY" = 1 ] && dev=(--device cpu --batch 2 --size 64 --precision fp32 --iters 1 --warmup 1
                         --repeats 1)
  local pre=() ; while [ $# -gt 0 ] && [ "$1" != -- ]; do pre+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local opts=("${SHAPES_512[@]}")
  [ "$DRY" = 1 ] && opts=(MODEL.UNET.BASE_CHANNELS 8 D2SEG.SHAPES.IMAGE_SIZE 64
                          D2SEG.SHAPES.NUM_TRAIN 4 D2SEG.SHAPES.NUM_VAL 2 INPUT.MIN_SIZE_TRAIN "(64,)"
                          INPUT.CROP.SIZE "(64, 64)" DATALOADER.NUM_WORKERS 0)
  step "$name" "$secs" $PY tools/benchmark.py --config-file \
    configs/Shapes-SemanticSegmentation/unet.yaml --name "$name" "${pre[@]}" "${dev[@]}" \
    --json "$OUTDIR/benchmark_${name}.json" "${opts[@]}" "$@"
}
SEM_EXTRA=()
sem_cfg() {  # sem_cfg NAME SECONDS CONFIG CASE [harness args] -- [opts]: a Shapes semantic
  # config (configs/Shapes-SemanticSegmentation/CONFIG), bf16 b16 512; SEM_EXTRA: its base opts
  local name=$1 secs=$2 config=$3 case=$4; shift 4
  local dev=(--device cuda --batch 16 --size 512 --precision bf16)
  [ "$DRY" = 1 ] && dev=(--device cpu --batch 2 --size 64 --precision fp32 --iters 1 --warmup 1
                         --repeats 1 --loop-iters 2 --loop-warmup 1)
  local pre=() ; while [ $# -gt 0 ] && [ "$1" != -- ]; do pre+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local opts=("${SHAPES_512[@]}" "${SEM_EXTRA[@]}")
  [ "$DRY" = 1 ] && opts=("${SEM_EXTRA[@]}"
                          D2SEG.SHAPES.IMAGE_SIZE 64 D2SEG.SHAPES.NUM_TRAIN 4 D2SEG.SHAPES.NUM_VAL 2
                          INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.CROP.SIZE "(64, 64)"
                          DATALOADER.NUM_WORKERS 0)
  step "$name" "$secs" $PY tools/benchmark.py --config-file \
    "configs/Shapes-SemanticSegmentation/$config" --name "$case" \
    "${pre[@]}" "${dev[@]}" --json "$OUTDIR/benchmark_${name}.json" "${opts[@]}" "$@"
}
dlv3_cfg() {  # dlv3_cfg NAME SECONDS [harness args] -- [opts]: DeepLabV3+ R50 (the reference's
  # stem), bf16 b16 512, as gpu-semantic's deeplabv3plus case
  local name=$1 secs=$2; shift 2
  local SEM_EXTRA=(MODEL.RESNETS.STEM_TYPE basic MODEL.RESNETS.STEM_OUT_CHANNELS 64)
  sem_cfg "$name" "$secs" deeplabv3plus_R_50.yaml deeplabv3plus "$@"
}
fold_norm_step() {  # fold_norm_step [NAME [SECONDS [args]]]: FOLD_NORM alone on the R50
  # backbone (batch 16, 800x1216, bf16)
  local name=${1:-fold_norm} secs=${2:-40}; shift $(( $# < 2 ? $# : 2 ))
  if [ "$DRY" = 1 ]; then
    step "$name" 60 $PY benchmarks/fold_norm.py --device cpu --depth 18 --size 64x64 \
      --rounds 1 --iters 1 --json "$OUTDIR/$name.json" "$@"
  else
    step "$name" "$secs" $PY benchmarks/fold_norm.py --device cuda --rounds 3 \
      --json "$OUTDIR/$name.json" "$@"
  fi
}
H100_26=benchmarks/results/gpu_h100_2026-11-26
H100_27=benchmarks/results/gpu_h100_2026-11-27
case "$PART" in
  eleventh-lease)
    # Written 2026-11-27 (session 19): FIRST in the next lease (~480 s with set-up). Issue 7's
    # GPU targets with the code of sessions 15-19, each compared (--compare) with the lease run
    # that the README quotes, same preset and settings: a regression shows as a row marked
    # "regression" (ratios on any card; absolute numbers when the card is the same H100).
    # Sessions 15-18 changed CPU paths (ROIAlign, the RPN's NMS threads), evaluation precision
    # (INFERENCE_AMP); session 19 the loader's seeding and, in R-CNN training, the statistics
    # detectron2 logs (read with the losses: 11 fewer host waits per step), the ROI
    # poolers (one wait per call instead of 5-6) and the anchor grids (made on the device: 10
    # copies fewer), the box-delta check (CPU only: 2 fewer): expected about 25 waits per
    # step on the H100 instead of 60. Then the same step with that off (RCNN_SYNC_FREE off, no reference;
    # shown against the first, same card: "settings differ", the numbers side by side).
    bench gpu_maskrcnn_frozenbn_v2 85 gpu-maskrcnn-frozenbn --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference --compare "$H100_26/benchmark_maskrcnn_frozenbn.json"
    bench gpu_maskrcnn_frozenbn_v2_nosyncfree 50 gpu-maskrcnn-frozenbn --precision bf16 \
      --repeats 2 --iters 10 --warmup 5 --no-inference --refs none \
      --compare "$OUTDIR/benchmark_maskrcnn_frozenbn_v2.json" D2SEG.SPEED.RCNN_SYNC_FREE off
    bench gpu_panoptic_v2 70 gpu-panoptic --refs none --precision bf16 --repeats 2 --iters 10 \
      --warmup 5 --no-inference --compare "$H100_26/benchmark_panoptic_batched.json"
    bench gpu_semantic_v5 250 gpu-semantic --repeats 2 --iters 10 --loop-iters 40 \
      --no-inference --compare "$H100_27/benchmark_semantic_v4.json"
    ;;
  all)
    # The next lease (written 2026-11-26, session 5, after the first lease): measure the
    # sync-free semantic step (losses read nothing back; head + loss one compiled graph),
    # the "lagged" non-finite check (auto on CUDA) and DEVICE_PREFETCH; Mask R-CNN compiled
    # and in fp16; the largest U-Net batch. 185 + 130 + 120 + 50 + 60 s of limits (+ ~20 s
    # set-up): inside the tool's 600 s. Each JSON also lists the host syncs of one step of
    # every subject (CUDA sync debug mode) with their source lines, and (--profile-steps)
    # how busy the GPU is during a step and the top operators.
    # 1. the semantic targets with the new defaults: step vs references, loop vs step
    bench gpu_semantic_syncfree 185 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2
    # 2. the same with DEVICE_PREFETCH on (the loop is what it changes; no references)
    bench gpu_semantic_prefetch 130 gpu-semantic --refs none --repeats 1 --iters 10 \
      --loop-iters 30 --no-inference D2SEG.SPEED.DEVICE_PREFETCH on
    # 3. Mask R-CNN (bf16) with its backbone compiled (GroupNorm is memory-bound in eager)
    bench gpu_maskrcnn_compile 120 gpu-maskrcnn --refs plain_d2 --precision bf16 --repeats 2 \
      --iters 10 --warmup 10 --loop-iters 0 --no-inference --profile-steps 2 \
      D2SEG.SPEED.COMPILE on
    # 4. fp16: d2seg's warm-up diverged in the first lease; the cause (fused SGD's uninitialised
    #    momentum after a grad-scaler-skipped first step) is fixed since: does it train now,
    #    and how fast against plain detectron2?
    bench gpu_maskrcnn_fp16 50 gpu-maskrcnn --refs plain_d2 --precision fp16 --repeats 1 \
      --iters 5 --warmup 5 --loop-iters 0 --no-inference
    # 5. issue 7's "largest batch that fits" (UNet 64 ch, 512x512, bf16, compile off)
    unet_cfg unet_largest 60 --refs none --scaling-only --scaling-sizes 512 \
      --scaling-batches 16 --max-batch 256 -- D2SEG.SPEED.COMPILE off
    ;;
  frozenbn)
    # The next lease's second command if budget_left_s allows (310 s of limits): issue 7's
    # Mask R-CNN target in the issue's own setting - the model-zoo config (FrozenBN ResNet)
    # against plain detectron2 - with D2SEG.SPEED.FOLD_NORM on (auto), then off (its share);
    # first the fold alone on the R50 backbone (batch 16, 800x1216, bf16). Ordered by priority:
    # each step writes its JSON, so a run cut short by the device budget keeps the first ones.
    fold_norm_step
    bench gpu_maskrcnn_frozenbn 85 gpu-maskrcnn-frozenbn --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference --profile-steps 2
    bench gpu_maskrcnn_frozenbn_nofold 60 gpu-maskrcnn-frozenbn --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference D2SEG.SPEED.FOLD_NORM off
    # fp16, the precision of the issue's anchor (plain detectron2: 49 img/s on an H100)
    bench gpu_maskrcnn_frozenbn_fp16 50 gpu-maskrcnn-frozenbn --precision fp16 --repeats 1 \
      --iters 10 --warmup 5 --no-inference
    # RCNN_BATCHED's share (the RPN / ROI-head per-image Python done for the batch at once)
    bench gpu_maskrcnn_frozenbn_unbatched 75 gpu-maskrcnn-frozenbn --precision bf16 \
      --repeats 2 --iters 10 --warmup 5 --no-inference D2SEG.SPEED.RCNN_BATCHED off
    ;;
  third-lease)
    # The next lease (written 2026-11-26, session 9, after the H100 lease): the harness now
    # times the train_net loop before its diagnostics (the H100 loops ran the model eagerly
    # after the host-sync audit), profiles loop iterations (compiled regions, host waits), and
    # DeepLab compiles with CUDA graphs by default. Session 10 found the cause: torch 2.11
    # skips a compiled frame for good once it ran under a TorchDispatchMode (the audit's;
    # pytorch#190286); CompiledForward now runs such calls eagerly, and the step profile after
    # the audit ("compiled regions ... after the sync audit") checks that on torch 2.11.
    # 240 + 75 + 60 + 120 + 40 s of limits.
    # 1. the semantic targets with the new defaults: step vs references, loop vs step
    bench gpu_semantic_v3 240 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2
    # 2. the largest U-Net batch at 512x512 on the card (issue 7's scaling item)
    unet_cfg unet_largest 75 --refs none --scaling-only --scaling-sizes 512 \
      --scaling-batches 16 --max-batch 160 -- D2SEG.SPEED.COMPILE off
    # 3. FOLD_NORM's share on the zoo Mask R-CNN
    bench gpu_maskrcnn_frozenbn_nofold 60 gpu-maskrcnn-frozenbn --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference D2SEG.SPEED.FOLD_NORM off
    # 4. Mask R-CNN GN with its backbone compiled
    bench gpu_maskrcnn_compile 120 gpu-maskrcnn --refs plain_d2 --precision bf16 --repeats 2 \
      --iters 10 --warmup 10 --loop-iters 0 --no-inference D2SEG.SPEED.COMPILE on
    # 5. FOLD_NORM alone on the backbone
    fold_norm_step
    ;;
  fourth-lease)
    # After third-lease (written 2026-11-26, session 10), if the budget allows: what the CUDA-
    # graph default has not been measured with. 90 + 130 + 110 + 110 + 50 s of limits, by
    # priority: each step writes its JSON, so a run cut short by the budget keeps the first.
    # 1. DeepLabV3+ fine-tuning with a frozen backbone: a CUDA graph of the backbone would
    #    have no backward and feed the head's (pytorch#160281, torch < mid-2026), so
    #    CompiledForward compiles frozen modules without CUDA graphs (session 10); the head
    #    keeps them. Does it run (no "torch.compile of ... failed"), compiled regions in the
    #    loop profile, and the speed.
    dlv3_cfg dlv3_frozen_backbone 90 --refs none --repeats 2 --iters 10 --loop-iters 20 \
      --no-inference --profile-steps 1 -- D2SEG.FINETUNE.FREEZE '["backbone"]'
    # 2. DEVICE_PREFETCH with the models compiled (the second lease's loops ran eagerly)
    bench gpu_semantic_prefetch_v2 130 gpu-semantic --refs none --repeats 1 --iters 10 \
      --loop-iters 30 --no-inference D2SEG.SPEED.DEVICE_PREFETCH on
    # 3. SegFormer-B2: 2765 device operations per step for 19 GFLOPs per image (DeepLabV3+:
    #    914 for 69), so host-bound on a GPU by the CPU count (docs/benchmarks.md, Fast paths):
    #    CUDA graphs should pay off more than for DeepLab. auto's default mode, then CUDA
    #    graphs, then eager.
    sem_cfg segformer_b2_default 110 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference --profile-steps 1 -- \
      D2SEG.SPEED.COMPILE_MODE default
    sem_cfg segformer_b2_cudagraphs 110 segformer_b2.yaml segformer_b2 --refs none \
      --repeats 2 --iters 10 --loop-iters 0 --no-inference -- \
      D2SEG.SPEED.COMPILE_MODE reduce-overhead
    sem_cfg segformer_b2_eager 50 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE off
    ;;
  sixth-lease)
    # Written 2026-11-26 (session 12), after the third and fourth leases; run 2026-11-27. D2SEG.SPEED.MATMUL_RESIZE (session 13: "auto" = on CUDA for
    # SegFormer only, not yet measured on a GPU): SegFormer-B2's compiled step spent 28.4 of 59.4 ms of GPU
    # time in one fused kernel of the bilinear backward's atomic adds. And the loops again: the
    # first case's loop paid TensorBoard's import at its first write (now done at build).
    # 130 + 90 + 240 + 75 s of limits (+ ~20 s set-up).
    # 1. SegFormer-B2 with the matrix resize (auto: on; with CUDA graphs, SegFormer's auto
    #    mode since session 12), profiled; then with F.interpolate
    sem_cfg segformer_b2_mresize 130 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference --profile-steps 1 -- D2SEG.SPEED.MATMUL_RESIZE on
    sem_cfg segformer_b2_nomresize 90 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.MATMUL_RESIZE off
    # 2. issue 7's semantic targets (auto: F.interpolate, as measured before) and both loops
    bench gpu_semantic_v4 240 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2
    # 3. DeepLabV3+ (CUDA graphs) with the matrix resize: its share against step 2
    dlv3_cfg dlv3_mresize 75 --refs none --repeats 2 --iters 10 --loop-iters 0 \
      --no-inference -- D2SEG.SPEED.MATMUL_RESIZE on
    ;;
  eighth-lease)
    # Written 2026-11-27 (session 14), after the sixth and seventh leases. 40 + 220 + 160 +
    # 90 s of limits (+ ~20 s set-up).
    # 1. FOLD_NORM's forward-only rule: on CUDA, calls no gradient flows through (eval, the
    #    frozen stem and res2 in training) now run detectron2's path; folded_always is the
    #    old rule (eval 0.90x). Expected: eval 1.00x, train >= 1.12x. The eval also times
    #    folded_cudnn (conv + bias + ReLU fused in cuDNN; an experiment, not a d2seg path).
    fold_norm_step fold_norm_forward_only 40
    # 2. SegFormer-B2 with the matrix resize (auto) and with F.interpolate. Both sixth-lease
    #    runs were stopped by their limits (130 s, 90 s) while compiling on a fresh machine
    #    (empty inductor cache; the fourth lease's 82 s run followed a default-mode compile).
    sem_cfg segformer_b2_mresize 220 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.MATMUL_RESIZE on
    sem_cfg segformer_b2_nomresize 160 segformer_b2.yaml segformer_b2 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.MATMUL_RESIZE off
    # 3. The frozen-backbone DeepLabV3+ loop at 60 % of its step (seventh lease: step 915
    #    img/s, loop 548; run_step 26 ms in the loop against 17.5 ms alone): where the host
    #    time goes, profiled (now with MATMUL_RESIZE, auto for DeepLabV3+).
    dlv3_cfg dlv3_frozen_backbone_v3 90 --refs none --repeats 2 --iters 10 --loop-iters 40 \
      --loop-warmup 20 \
      --no-inference --profile-steps 1 -- D2SEG.FINETUNE.FREEZE '["backbone"]'
    ;;
  ninth-lease)
    # Written 2026-11-27 (session 14): issue 7's semantic targets with session 14's defaults
    # (DeepLabV3+ with MATMUL_RESIZE beside its references; FOLD_NORM's CUDA rule; the loop
    # timed after 20 warm-up iterations, 40 timed: one metrics write per 20). ~250 s of
    # limits: after eighth-lease in the same lease if ~300 s of device time are left.
    # Session 19: compared with the sixth lease's run (same preset and settings); the same
    # step is the last of eleventh-lease, which supersedes this part.
    bench gpu_semantic_v5 250 gpu-semantic --repeats 2 --iters 10 --loop-iters 40 \
      --no-inference --compare "$H100_27/benchmark_semantic_v4.json"
    ;;
  tenth-lease)
    # Written 2026-11-27 (session 16): the semantic configs enable AMP since session 16 (bf16
    # on the GPU; fp32 before). The ISBI anchor with the config's defaults, the plain-PyTorch
    # U-Net given the same precision (bf16 autocast), against the fp32 runs of the first
    # lease (d2seg 0.812 Dice in 63 s, plain 0.815 in 83.8 s on the H200). ~250 s.
    isbi_anchor 250
    # Session 17: semantic models evaluate in their training precision (INFERENCE_AMP auto =
    # bf16 here). The U-Net just trained, fp32 against bf16 inference on the 5 test slices:
    # speed and Dice (CPU: 1.78x, Dice 80.62 / 80.61). ~60 s.
    infer_amp 90 /tmp/isbi_out/unet_$([ "$DRY" = 1 ] && echo cpu || echo gpu)
    ;;
  seventh-lease)
    # Written 2026-11-27 (session 13): why FOLD_NORM's eval forward was slower on the H100
    # (29.8 -> 33.3 ms, third lease) while its training step was faster. The eval runs a
    # third variant (the folded model frozen: cached fold, no per-call recompute) and each
    # variant's busiest kernels are profiled. ~150 s of limits in all.
    fold_norm_step fold_norm_eval_profile 60 --profile
    # The loader-bound loop: DeepLabV3+ with a frozen backbone (step 929 img/s, loop 389 in the
    # fourth lease, 7.4 ms per iteration waiting for the 8 workers), now with whole packed
    # batches from the workers and the same-size resize skipped (session 13). ~90 s.
    dlv3_cfg dlv3_frozen_backbone_v2 90 --refs none --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference -- D2SEG.FINETUNE.FREEZE '["backbone"]'
    ;;
  fifth-lease)
    # (Session 13: these run with F.interpolate, MATMUL_RESIZE's auto for these models; the
    # last one runs HRNet-W48 with the matrix resize. Session 14: the limits add up to 680 s,
    # over the tool's 600 s per command; HRNet-W48 eager is dropped and the HRNet limits cut:
    # 100 + 100 + 4 x 75 + 60 = 560 s (+ ~20 s set-up), timeout_s 600; a slow compile cuts
    # the last step first.)
    # The rest of the CUDA-graph decisions (session 10): HRNet-W48 (4063 operations per step
    # for 93 GFLOPs: the most host-bound by the CPU count), PSPNet (output stride 8, predicted
    # GPU-bound) and DeepLabV3 (16, predicted host-bound; auto already records CUDA graphs).
    sem_cfg hrnet_w48_default 100 hrnet_w48.yaml hrnet_w48 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference --profile-steps 1 -- \
      D2SEG.SPEED.COMPILE_MODE default
    sem_cfg hrnet_w48_cudagraphs 100 hrnet_w48.yaml hrnet_w48 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE_MODE reduce-overhead
    sem_cfg pspnet_default 75 pspnet_R_50.yaml pspnet --refs none --repeats 2 --iters 10 \
      --loop-iters 0 --no-inference --profile-steps 1 -- D2SEG.SPEED.COMPILE_MODE default
    sem_cfg pspnet_cudagraphs 75 pspnet_R_50.yaml pspnet --refs none --repeats 2 --iters 10 \
      --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE_MODE reduce-overhead
    sem_cfg deeplabv3_default 75 deeplabv3_R_50.yaml deeplabv3 --refs tv_deeplabv3_r50 \
      --repeats 2 --iters 10 --loop-iters 0 --no-inference --profile-steps 1 -- \
      D2SEG.SPEED.COMPILE_MODE default
    sem_cfg deeplabv3_cudagraphs 75 deeplabv3_R_50.yaml deeplabv3 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE_MODE reduce-overhead
    # last (a run cut short by the budget loses it first): HRNet-W48 with the matrix resize
    # (its ~34 resizes per step become ~4 matrix products each)
    sem_cfg hrnet_w48_mresize 60 hrnet_w48.yaml hrnet_w48 --refs none --repeats 2 \
      --iters 10 --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE_MODE default \
      D2SEG.SPEED.MATMUL_RESIZE on
    ;;
  second-lease)
    # The second lease's first command (written 2026-11-26, session 9), in order of priority:
    # each step writes its JSON, so a command cut short keeps the first ones. 185 + 85 + 130
    # + 50 + 75 s of limits (+ ~20 s set-up).
    # 1. the semantic targets (DeepLabV3+ with the reference's stem; sync-free step): step vs
    #    references, loop vs step
    bench gpu_semantic_syncfree 185 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2
    # 2. the Mask R-CNN target in the issue's setting: zoo config (FrozenBN) vs plain
    #    detectron2, with FOLD_NORM and RCNN_BATCHED (auto on), bf16
    bench gpu_maskrcnn_frozenbn 85 gpu-maskrcnn-frozenbn --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference --profile-steps 2
    # 3. DEVICE_PREFETCH on: the loop is what it changes (no references)
    bench gpu_semantic_prefetch 130 gpu-semantic --refs none --repeats 1 --iters 10 \
      --loop-iters 30 --no-inference D2SEG.SPEED.DEVICE_PREFETCH on
    # 4. fp16, the anchor's precision (fused SGD's momentum fix)
    bench gpu_maskrcnn_frozenbn_fp16 50 gpu-maskrcnn-frozenbn --precision fp16 --repeats 1 \
      --iters 10 --warmup 5 --no-inference
    # 5. RCNN_BATCHED's share
    bench gpu_maskrcnn_frozenbn_unbatched 75 gpu-maskrcnn-frozenbn --precision bf16 \
      --repeats 2 --iters 10 --warmup 5 --no-inference D2SEG.SPEED.RCNN_BATCHED off
    ;;
  second-lease-2)
    # The second lease's second command (written after its first, 2026-11-26 session 9): the
    # DeepLabV3+ step was host-bound there (GPU 57 % busy) and both loops at 61-66 % of the
    # step. Each run now records torch.compile's counters (graphs, breaks, recompiles) and,
    # with --profile-steps, a profile of loop iterations (host waits). 75+45+110+75+60 s.
    dlv3_cfg dlv3_compile 75 --refs none --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2
    dlv3_cfg dlv3_eager 45 --refs none --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference --profile-steps 2 -- D2SEG.SPEED.COMPILE off
    # CUDA graphs (inductor's cudagraph trees) against the host-bound step, with the reference
    dlv3_cfg dlv3_cudagraphs 110 --refs plain_deeplabv3plus_r50 --repeats 2 --iters 10 \
      --loop-iters 30 --no-inference --profile-steps 2 -- D2SEG.SPEED.COMPILE_MODE reduce-overhead
    # Panoptic FPN / Mask R-CNN with RCNN_BATCHED (the GN configs of the first lease)
    bench gpu_panoptic_batched 75 gpu-panoptic --refs none --precision bf16 --repeats 2 \
      --iters 10 --warmup 5 --no-inference
    unet_cfg unet_largest 60 --refs none --scaling-only --scaling-sizes 512 \
      --scaling-batches 16 --max-batch 256 -- D2SEG.SPEED.COMPILE off
    ;;
  first-lease)
    # The command of the first lease (2026-11-26, H200), kept for reproduction (the semantic
    # configs trained in fp32 then; they enable AMP since session 16).
    isbi_anchor 195 D2SEG.SPEED.COMPILE off SOLVER.AMP.ENABLED False
    bench gpu_semantic 100 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --infer-iters 5 --latency-iters 10 D2SEG.SPEED.COMPILE off
    unet_cfg unet_compile 85 --refs plain_unet --warmup 10 --iters 10 --repeats 2 \
      --loop-iters 0 --no-inference -- D2SEG.SPEED.COMPILE on
    unet_cfg unet_scaling 35 --refs none --scaling-only --scaling-sizes 256,512,1024 \
      --scaling-batches 1,4,16 --max-batch 256 -- D2SEG.SPEED.COMPILE off
    bench gpu_panoptic 135 gpu-panoptic --repeats 2 --iters 10 --warmup 5 --no-inference
    ;;
  targets)
    # issue 7's semantic targets with the CUDA defaults (torch.compile on), without inference;
    # Mask R-CNN / Panoptic FPN vs plain detectron2 in bf16 (fp16 diverged at random init);
    # the semantic targets again with compile off (a per-switch run) and inference.
    bench gpu_semantic_compile 180 gpu-semantic --repeats 2 --iters 10 --loop-iters 30 \
      --no-inference
    bench gpu_panoptic_bf16 140 gpu-panoptic --repeats 2 --iters 10 --warmup 5 --no-inference \
      --precision bf16
    bench gpu_semantic_nocompile 90 gpu-semantic --repeats 2 --iters 10 --loop-iters 20 \
      --infer-iters 5 --latency-iters 10 D2SEG.SPEED.COMPILE off
    ;;
  semantic)
    isbi_anchor 250  # the configs' precision (bf16 on a GPU); the reference follows it
    bench gpu_semantic 270 gpu-semantic --repeats 2
    unet_cfg unet_largest 60 --refs none --scaling-only --scaling-sizes 512 \
      --scaling-batches 16 --max-batch 256 -- D2SEG.SPEED.COMPILE off
    ;;
  instance)
    bench gpu_maskrcnn 300 gpu-maskrcnn --repeats 2
    bench gpu_panoptic 240 gpu-panoptic --repeats 2
    ;;
  *) echo "gpu_session: unknown part '$PART' (eleventh-lease|all|frozenbn|third-lease|fourth-lease|fifth-lease|sixth-lease|seventh-lease|eighth-lease|ninth-lease|tenth-lease|second-lease|second-lease-2|first-lease|targets|semantic|instance)"
     exit 2 ;;
esac
ls -la "$OUTDIR"
