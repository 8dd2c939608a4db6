#!/usr/bin/env bash
# The GPU snapshot: op and model benchmarks on CUDA in bf16 and fp32, within about 8 minutes on one
# H100-class GPU. Results go to benchmarks/results/gpu/ (or $OUT when set, e.g. the device tool's $OUT).
# Usage: bash benchmarks/run_gpu.sh [PYTHON]
set -euo pipefail
PY=${1:-python}
OUT=${OUT:-benchmarks/results/gpu}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
$PY -m mirrorla bench op --device cuda --n 1024,4096,16384,65536 --mode fwd,train --dtype bf16,fp32 \
    --min-run-time 0.3 --timeout 60 --out $OUT/op --no-progress
$PY -m mirrorla bench model --device cuda --model mirrorla_deit_tiny_patch16_224 --attn softmax,relu,mirror \
    --img-size 224,512,1024 --batch 32 --mode infer,train --dtype bf16 --min-run-time 0.3 --timeout 60 \
    --out $OUT/model --no-progress
