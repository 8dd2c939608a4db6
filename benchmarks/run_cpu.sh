#!/usr/bin/env bash
# Regenerates the committed CPU snapshot under benchmarks/results/cpu/ (about 40 minutes on 2 cores), replacing
# its reports (--overwrite).
# Usage: bash benchmarks/run_cpu.sh [PYTHON]   (make bench-cpu runs it with the project's .venv)
set -euo pipefail
PY=${1:-python}
OUT=benchmarks/results/cpu
# op level: the feature map plus the attention core on given q, k, v (H=3, d=64, B=1)
$PY -m mirrorla bench op --n 196,1024,4096,16384,65536 --mode fwd,train --dtype fp32 --out $OUT/op --no-progress --overwrite
$PY -m mirrorla bench op --n 1024,4096,16384 --attn softmax,relu,mirror,mirror_unfolded --mode fwd --dtype bf16 \
    --out $OUT/op_bf16 --no-progress --overwrite
# the torch backend (what a GPU without Triton runs) on half-precision inputs at the GPU table's shape: its core maps
# q and k by chunks of tokens
MIRRORLA_BACKEND=torch $PY -m mirrorla bench op --n 4096,16384,65536 --attn relu,mirror --mode fwd,train --dtype bf16 \
    --batch 8 --heads 3 --head-dim 64 --out $OUT/op_torch_bf16 --no-progress --overwrite
# model level: DeiT-T images/s across resolutions (batch 8)
$PY -m mirrorla bench model --model mirrorla_deit_tiny_patch16_224 --attn softmax,relu,mirror \
    --img-size 224,384,512,768,1024 --batch 8 --mode infer,train --out $OUT/model --no-progress --overwrite
# Swin-T: window-7 softmax (the original) against the hybrid with global MirrorLA in stages 1-2
$PY -m mirrorla bench model --model mirrorla_swin_tiny_patch4_window7_224 --attn softmax,mirror \
    --img-size 224,448,896 --batch 2 --mode infer --out $OUT/swin --no-progress --overwrite
# the local term's convolution, its grid channels-last (the layer's) against NCHW (before), both in one run
PYTHONPATH=${PYTHONPATH:-src} $PY benchmarks/local_term.py --device cpu --out $OUT/local_term.txt
