#!/usr/bin/env bash
# The checks of miniai.accel that need a CUDA GPU, in one go (a few minutes on one GPU):
#   1. tests/test_accel.py: the CUDA tests (float16 with the scaler against PyTorch's recipe, an injected inf skipped,
#      the default dtype) and the rest of the file (two CPU processes over gloo, bfloat16 on the CPU);
#   2. examples/train_cnn.py on one GPU: float32, bfloat16 and float16, one epoch each;
#   3. bench/bench_precision.py: float16 and bfloat16 against float32 on the GPU (and bfloat16 on the CPU).
# Needs the Fashion-MNIST IDX files where miniai looks for them ($MINIAI_DATA, data/, /usr/share/datasets/...).
# PYTHON defaults to `uv run python`; on a machine with the packages installed already, PYTHON=python3 works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-uv run python}
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('GPU:', torch.cuda.get_device_name(0))"

echo "== 1. tests/test_accel.py"
$PY -m pytest tests/test_accel.py -q -rs

echo "== 2. examples/train_cnn.py on one GPU"
for mp in no bf16 fp16; do
    $PY examples/train_cnn.py --epochs 1 --mixed-precision $mp | tail -n 2
done

echo "== 3. bench/bench_precision.py"
$PY bench/bench_precision.py --skip-procs
