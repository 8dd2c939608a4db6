#!/usr/bin/env bash
# The GPU snapshot, within about 5 minutes on one H100-class GPU (start-up included): the op table (softmax, relu,
# mirror; forward and forward+backward; 4k, 16k and 64k tokens; bf16, B=8, H=3, d=64) on the Triton backend;
# DeiT-T at 224² and 1024², inference and training, eager; and DeiT-T compiled (each block compiled once, replayed
# as CUDA graphs) for softmax and mirror, the pair the compiled targets compare. Every case of one size runs in one
# process, timed with CUDA events. Results go to benchmarks/results/gpu/ (or $OUT).
# Usage: bash benchmarks/run_gpu.sh [PYTHON]    (the torch reference backend: MIRRORLA_BACKEND=torch)
set -euo pipefail
PY=${1:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/gpu.txt"
# Rounds: every attention of a size is timed once per round, and the ratios are paired by round, with an interval
# from 6 rounds up (benchmarks/targets.py judges the targets by it). Seven rounds of one eager DeiT-T training step
# each (the H200 snapshot at 7659dc1) left IQRs of 15-30% of the median around a 0.9 target; 21 rounds of about 1 s
# per attention add ~15 s to the run.
$PY -m mirrorla bench op --device cuda --n 4096,16384,65536 --mode fwd,train --dtype bf16 --batch 8 --heads 3 \
    --head-dim 64 --min-run-time 0.2 --rounds 15 --timeout 60 --no-progress --attn softmax,relu,mirror \
    --out "$OUT/op" --overwrite
MODEL="--device cuda --model mirrorla_deit_tiny_patch16_224 --dtype bf16 --timeout 120 --no-progress --overwrite"
$PY -m mirrorla bench model $MODEL --min-run-time 1 --rounds 21 --attn softmax,relu,mirror --mode infer,train \
    --img-size 224 --batch 128 --out "$OUT/model_224"
$PY -m mirrorla bench model $MODEL --min-run-time 1 --rounds 21 --attn softmax,relu,mirror --mode infer,train \
    --img-size 1024 --batch 8 --out "$OUT/model_1024"
# Compiled: each repeated block compiled once and its code reused by the others (--compile-scope blocks, the
# default), replayed as CUDA graphs (reduce-overhead), so the host's launch overhead leaves the step. Compilation
# takes most of these steps' time: one process per size and mode, each with its own time limit, so that a slow
# compiler costs only its own numbers.
for SIZE_BATCH in "224 128" "1024 8"; do
    set -- $SIZE_BATCH
    for MODE in infer train; do
        timeout 80 $PY -m mirrorla bench model $MODEL --min-run-time 0.2 --rounds 15 --attn softmax,mirror \
            --mode "$MODE" --img-size "$1" --batch "$2" --compile --compile-mode reduce-overhead --out "$OUT/model_$1_compiled_$MODE" \
            || echo "compiled DeiT-T bench ($1 px, $MODE) failed or did not finish within 80 s" | tee -a "$OUT/gpu.txt"
    done
done
