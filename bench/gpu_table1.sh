#!/usr/bin/env bash
# The paper's CIFAR-10 Table 1 setting on one GPU: the authors' VGG-16 with
# BN, K = 8 workers x 16 (vmapped on the one device), 200 epochs = 78,000
# steps, lr 0.05 (EF 0.01), wd 5e-4, lr / 10 at epochs 100 and 150, crop +
# flip, one RBGS block per leaf (configs/cifar10_vgg16.py).
#
#   bash bench/gpu_table1.sh            # stage 1: SGD and DEF at ratio 256
#   STAGE=2 bash bench/gpu_table1.sh    # then EF (lr 0.01), SAEF, PSync at
#                                       # 256 and DEF at 64 and 1024
#   CIFAR10=/path/to/cifar10-jpeg.tar bash bench/gpu_table1.sh   # not TFDS
#
# Stage 1 runs its two runs at once, as two processes sharing the GPU (each
# is one small VGG at batch 8 x 16: one alone leaves most of an H200 idle).
# Duration: NOT MEASURED (no GPU session has run it yet). A FLOP estimate:
# ~0.94 GFLOP per training image x 128 images x 78,000 steps = 9.4 PFLOP per
# run; at 30-60 TFLOP/s reached (TF32, small convolutions) that is 3-5
# minutes per run, so stage 1 should fit in about 10 minutes of one H200.
# Every run resumes from its checkpoint when the script is run again, and
# the report is rewritten from whatever finished.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-results/cifar10_table1_gpu}
STAGE=${STAGE:-1}
BASE=(--config configs/cifar10_vgg16.py --set steps_per_dispatch=${SPD:-78}
      --set checkpoint_every_steps=7800 --set max_to_keep=1)
if [ -n "${CIFAR10:-}" ]; then
  BASE+=(--set dataset=image_folder --set data_dir="$CIFAR10")
fi
# Two processes on one GPU: neither may preallocate most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
sweep() { "$PY" -m defjax.sweep "${BASE[@]}" "$@"; }

if [ "$STAGE" = 1 ]; then
  mkdir -p "$OUT"
  sweep --out "$OUT/runs" --methods sgd --seeds 0 > "$OUT/sgd.log" 2>&1 &
  sgd=$!

  sweep --out "$OUT/runs_def" --methods def --ratios 256 --seeds 0 > "$OUT/def.log" 2>&1 &
  def=$!
  wait $sgd; wait $def
else
  sweep --out "$OUT/runs" --methods saef,psync --ratios 256 --seeds 0
  sweep --out "$OUT/runs" --methods def --ratios 64,1024 --seeds 0
  sweep --out "$OUT/runs_ef_lr0.01" --methods ef --ratios 256 --seeds 0 --set optim.lr=0.01
fi
"$PY" -m defjax.report "$OUT"/runs* --out "$OUT"
