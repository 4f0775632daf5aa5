#!/usr/bin/env bash
# The GPU figures of bench/README.md, in one go on a machine with one CUDA GPU:
#   bash bench/gpu.sh DATA RESULTS_DIR [loop|search|longer|all]
# DATA: CIFAR-10 as an image folder (../shared/datasets/cifar10-jpg.tar.gz unpacked).
# Each step writes RESULTS_DIR/<name>.json (and logs); a failed step is reported and skipped.
set -u
DATA=$1 RES=$2 PART=${3:-all}
PY=${PYTHON:-python3}
mkdir -p "$RES"
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
