#!/usr/bin/env bash
# The GPU snapshot, within about 5 minutes on one H100-class GPU (start-up included): the op table (softmax, relu,
# mirror; forward and forward+backward; 4k, 16k and 64k tokens; bf16, B=8, H=3, d=64) on the Triton backend and,
# for comparison, on the torch reference backend; DeiT-T at 224² and 1024², inference and training, eager; and
# DeiT-T at 224² and 1024² compiled (regional, CUDA graphs). Every case of one size runs in one process, timed with CUDA events.
# Results go to benchmarks/results/gpu/ (or $OUT). Usage: bash benchmarks/run_gpu.sh [PYTHON]
set -euo pipefail
PY=${1:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/gpu.txt"
OP="--device cuda --n 4096,16384,65536 --mode fwd,train --dtype bf16 --batch 8 --heads 3 --head-dim 64 \
    --min-run-time 0.2 --timeout 60 --no-progress"
$PY -m mirrorla bench op $OP --attn softmax,relu,mirror --out "$OUT/op"
MIRRORLA_BACKEND=torch $PY -m mirrorla bench op $OP --attn relu,mirror --out "$OUT/op_torch_backend"
MODEL="--device cuda --model mirrorla_deit_tiny_patch16_224 --attn softmax,relu,mirror --mode infer,train \
    --dtype bf16 --min-run-time 0.2 --timeout 120 --no-progress"
$PY -m mirrorla bench model $MODEL --img-size 224 --batch 128 --out "$OUT/model_224"
$PY -m mirrorla bench model $MODEL --img-size 1024 --batch 8 --out "$OUT/model_1024"
# Compiled: each repeated block compiled once and its code reused by the others (--compile-scope blocks, the
# default), replayed as CUDA graphs (reduce-overhead), so the host's launch overhead leaves the step.
# Compilation takes most of these steps' time; a slow compiler must not cost the eager results above.
for SIZE_BATCH in "224 128" "1024 8"; do
    set -- $SIZE_BATCH
    timeout 100 $PY -m mirrorla bench model $MODEL --img-size "$1" --batch "$2" --compile \
        --compile-mode reduce-overhead --out "$OUT/model_$1_compiled" \
        || echo "compiled DeiT-T bench at $1 px did not finish within 100 s" | tee -a "$OUT/gpu.txt"
done
