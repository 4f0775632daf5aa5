#!/usr/bin/env bash
# The GPU figures of bench/README.md, in one go on a machine with one CUDA GPU:
#   bash bench/gpu.sh DATA RESULTS_DIR [loop|search|longer|all|open]
#   SEEDS="0 1" VARIANTS="asha_tpe random_no_stopping" bash bench/gpu.sh DATA RESULTS_DIR asha
#     (also SPACE=..., RANDOM_TRIALS=24, ASHA_TRIALS=72)
#   AIRBENCH=/path/to/airbench94.py bash bench/gpu.sh DATA RESULTS_DIR reference
# DATA: CIFAR-10 as an image folder (../shared/datasets/cifar10-jpg.tar.gz unpacked).
# Each step writes RESULTS_DIR/<name>.json (and logs); a failed step is reported and skipped.
# None of `open`, `asha` and `reference` is part of `all`:
# - `reference` runs the published airbench94.py (not in this repository) on this copy of the
#   data, 25 runs of a few seconds: what the reference 94% recipe reaches here (airbench_data.py).
# - `open` measures what earlier GPU sessions left open (about 6 minutes).
# - `asha` takes about 5 minutes per seed and variant (estimated, not yet run), so give one call
#   one seed. It leaves RESULTS_DIR/asha_tables_<seeds>_<variants>.tar.gz: the run folders'
#   tables, which asha_replay.py, sampler_quality.py and asha_vs_random.py --reuse read anywhere.
set -u
DATA=$1 RES=$2 PART=${3:-all}
PY=${PYTHON:-python3}
mkdir -p "$RES" && RES=$(cd "$RES" && pwd)
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, go on after a failure
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"; local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1; local rc=$?
  tail -n 4 "$RES/$name.log"; echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -m tuner.cli data prepare --data "$DATA"

if [[ $PART == loop || $PART == all ]]; then
  # (a) the training loop against the hand-written one; ResNet-18 is the 35,000 img/s bar
  step loop_resnet18 150 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet18 \
    --batch-size 512 --images 45000 --epochs 3 --rounds 2 --json "$RES/loop_resnet18.json"
  # small models on a big GPU: 1, 2, 4 trials sharing it
  step share_resnet20 150 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet20 --shares 1 2 4 \
    --epochs 2 --json "$RES/share_resnet20.json"
  step share_resnet18 120 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet18 --batch-size 512 \
    --shares 1 2 --epochs 2 --json "$RES/share_resnet18.json"
  # torch.compile: compile time (the warm-up epoch) against the steady speed it buys
  step compile_resnet20 150 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet20 \
    --images 45000 --epochs 2 --rounds 1 --compile --skip-accuracy --json "$RES/compile_resnet20.json"
  step compile_resnet18 180 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet18 \
    --batch-size 512 --images 45000 --epochs 2 --rounds 1 --compile --skip-accuracy \
    --json "$RES/compile_resnet18.json"
  step share_resnet20w32 120 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet20 --width 32 \
    --shares 1 2 4 --epochs 1 --images 20000 --json "$RES/share_resnet20w32.json"
  step share_resnet56 120 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet56 --shares 1 2 4 \
    --epochs 1 --images 20000 --json "$RES/share_resnet56.json"
  step loop_resnet20 120 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet20 \
    --images 45000 --epochs 2 --rounds 2 --json "$RES/loop_resnet20.json"
fi

if [[ $PART == search || $PART == all ]]; then
  # (d) the searched ResNet-18: 12 trials of up to 8 epochs, then a 30-epoch refit, tested once
  step search_resnet18 420 $PY -m tuner.cli search --space spaces/resnet18.yaml --data "$DATA" \
    --storage "$RES/runs"
  cp "$RES/runs/resnet18-cifar10/summary.json" "$RES/search_resnet18_summary.json" 2>/dev/null
  cp "$RES/runs/resnet18-cifar10/best/metrics.json" "$RES/refit_resnet18_metrics.json" 2>/dev/null
  # per-trial overhead with a GPU: fresh and reused trial processes, checkpoint + report
  step overhead_resnet20 150 $PY bench/trial_overhead.py --data "$DATA" --space spaces/quick.yaml \
    --trials 12 --json "$RES/overhead_resnet20.json"
fi

if [[ $PART == longer || $PART == all ]]; then
  # after `search`: how far the searched ResNet-18 gets with a longer refit, and with cutout
  RUN="$RES/runs/resnet18-cifar10"
  step refit_resnet18_60 150 $PY -m tuner.cli refit "$RUN" --epochs 60
  cp "$RUN/best/metrics.json" "$RES/refit_resnet18_60_metrics.json" 2>/dev/null
  $PY -c "import json, sys, yaml; best = json.load(open(sys.argv[1]))['best_config']
yaml.safe_dump({**best, 'arch': 'resnet18', 'batch_size': 512, 'eval_batch_size': 2500, 'cutout': 8,
                'epochs': 30}, open(sys.argv[2], 'w'))" "$RUN/summary.json" "$RES/cutout.yaml"
  step train_resnet18_cutout 120 $PY -m tuner.cli train --config "$RES/cutout.yaml" --data "$DATA" --refit \
    --out "$RES/cutout"
  cp "$RES/cutout/metrics.json" "$RES/train_resnet18_cutout_metrics.json" 2>/dev/null
fi

if [[ $PART == asha ]]; then
  # (c) at GPU scale: ASHA + TPE (72 trials) against random search without early stopping (24
  # trials, about the same epochs) on the quick space trained on all 45,000 images
  SEEDS=${SEEDS:-0} VARIANTS=${VARIANTS:-"asha_tpe random_no_stopping"}
  SPACE=${SPACE:-bench/spaces/quick_full.yaml} RANDOM_TRIALS=${RANDOM_TRIALS:-24} ASHA_TRIALS=${ASHA_TRIALS:-72}
  TAG="${SEEDS// /-}_${VARIANTS// /-}"
  step "asha_full_$TAG" 570 $PY bench/asha_vs_random.py --data "$DATA" --space "$SPACE" \
    --trials "$RANDOM_TRIALS" --asha-trials "$ASHA_TRIALS" --seeds $SEEDS --variants $VARIANTS \
    --targets 0.8 0.82 0.84 0.85 0.86 0.87 0.88 0.89 0.9 --work "$RES/asha" --json "$RES/asha_full_$TAG.json"
  (cd "$RES/asha" && tar czf "$RES/asha_tables_$TAG.tar.gz" \
    */history.parquet */trials.parquet */summary.json */search.json */optuna.journal 2>/dev/null)
  ls -l "$RES/asha_tables_$TAG.tar.gz"
fi

if [[ $PART == reference ]]; then
  # (d) calibration: the reference "94% in seconds" recipe, unmodified, on this JPEG copy
  $PY bench/airbench_data.py --data "$DATA" --out "$RES/airbench"
  (cd "$RES/airbench" && step airbench94 300 $PY "${AIRBENCH:?set AIRBENCH=/path/to/airbench94.py}")
  grep -E "Mean|eval" "$RES/airbench94.log" | tail -n 4
fi

if [[ $PART == open ]]; then
  # the weight average's cost on a GPU (spaces/quick.yaml trains with ema: 0.5): the loop with it,
  # without it and the hand-written one, in one rotation
  step loop_resnet20_ema 150 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet20 \
    --images 45000 --epochs 2 --rounds 2 --ema 0.5 --skip-accuracy --json "$RES/loop_resnet20_ema.json"
  step loop_resnet18_ema 180 $PY bench/train_throughput.py --data "$DATA" --device cuda --arch resnet18 \
    --batch-size 512 --images 45000 --epochs 2 --rounds 2 --ema 0.5 --skip-accuracy \
    --json "$RES/loop_resnet18_ema.json"
  # sizes between ResNet-20 w32 (163M MACs per image) and ResNet-18 (556M): where trial.gpus auto
  # once gave 2 trials per GPU (it now goes by MACs per step: bench/README.md)
  step share_resnet32w32 150 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet32 --width 32 \
    --shares 1 2 4 --epochs 1 --images 20000 --json "$RES/share_resnet32w32.json"
  step share_resnet44w32 150 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet44 --width 32 \
    --shares 1 2 4 --epochs 1 --images 20000 --json "$RES/share_resnet44w32.json"
  # 4 per GPU still beat 2 at 389M MACs: the next size up, between it and ResNet-18 (556M)
  step share_resnet56w32 150 $PY bench/gpu_sharing.py --data "$DATA" --arch resnet56 --width 32 \
    --shares 1 2 4 --epochs 1 --images 20000 --json "$RES/share_resnet56w32.json"
fi
