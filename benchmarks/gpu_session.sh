#!/usr/bin/env bash
# One GPU session's measurements, ordered so that each step can trust the one before: the kernels against the torch
# backend on this GPU (gpu_check.py --kernels-only --quick, ~110 s on an H100), the host cost of the attention's
# pieces and of eager DeiT-T training steps (gpu_profile.py --host --mode train, ~50 s), then the snapshot
# (run_gpu.sh, ~270 s). About 7 minutes on one H100, start-up excluded; each step has its own time limit, so a
# failing step costs only its own results. Every step's exit code and duration go to $OUT/session.log.
# Usage: bash benchmarks/gpu_session.sh [PYTHON]     (OUT defaults to benchmarks/results/gpu)
set -uo pipefail
PY=${1:-python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
t0=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run it, log its exit code and when it finished
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@"
    echo "$name: exit $? at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/session.log"
}
step gpu_check 150 bash -c "$PY benchmarks/gpu_check.py --kernels-only --quick > '$OUT/gpu_check.txt' 2>&1"
step gpu_profile 120 bash -c "$PY benchmarks/gpu_profile.py --host --mode train --attn relu,mirror \
    --out '$OUT/profile_host.txt' > '$OUT/gpu_profile.log' 2>&1"
step run_gpu 420 bash -c "OUT='$OUT' bash benchmarks/run_gpu.sh $PY > '$OUT/run_gpu.log' 2>&1"
