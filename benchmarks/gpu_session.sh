#!/usr/bin/env bash
# One GPU session's measurements, ordered so that each step can trust the one before and the speed targets come
# before the diagnostics: the kernels against the torch backend on this GPU (gpu_check.py --kernels-only --quick,
# ~110 s on an H100), then this GPU's launch settings (mirrorla tune: the row kernels against the chunked kernels,
# the backward block options; ~2 minutes), then the snapshot (run_gpu.sh, ~270 s), the speed targets judged on it
# (targets.py, seconds) and the profile: the host cost
# of the attention's pieces (with what a bare backward() costs, and a table at DeiT-T's 1024² layer shape: chunked
# against row kernels), the op's kernels at 65,536 tokens and eager DeiT-T training steps (gpu_profile.py
# --host --mode train --op 65536, ~1 minute), both with the settings tune chose (MIRRORLA_TUNING), and the local term's
# convolution in both grid orders (local_term.py, ~20 s), and where budget is left the op at 65,536 tokens on the torch
# backend. About 9 minutes on one H100, start-up excluded.
#
# Each step has its own time limit, and the whole session a budget (BUDGET seconds, default 570): a step gets at
# most what is left of it, and a step with less than MIN_STEP seconds left (default 30) is skipped. So the session
# ends, archive written, before a caller's own limit (a lent machine's 600 s per command) kills it, and a failing or
# slow step costs only its own results. Every step's exit code and duration go to $OUT/session.log ("skipped" for a
# step the budget left out), its console output to its log, which stays LOG.partial where the step failed or was
# killed. The tuning entry to commit is $OUT/kernel_tuning.json (copy it into src/mirrorla/ops/kernel_tuning.json),
# its evidence $OUT/tune/.
# Usage: bash benchmarks/gpu_session.sh [PYTHON]     (OUT defaults to benchmarks/results/gpu)
#        PACK=FILE.tgz also packs $OUT into one archive at the end, for machines that return only a few files.
set -uo pipefail
PY=${1:-python}
OUT=${OUT:-benchmarks/results/gpu}
BUDGET=${BUDGET:-570}
MIN_STEP=${MIN_STEP:-30}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
t0=$(date +%s)
: > "$OUT/session.log"  # this session's steps only
step() {  # step NAME LIMIT_S LOG COMMAND...: run it with its console output in $OUT/LOG, log its exit code and time
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( BUDGET - ($(date +%s) - t0) ))
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "$name: skipped, ${left} s of the session's ${BUDGET} s budget left" | tee -a "$OUT/session.log"
        return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    timeout "$limit" "$@" > "$OUT/$log.partial" 2>&1
    local code=$?
    # a finished step's log takes its name; a failed or killed one stays LOG.partial, never passing as complete
    if [ "$code" -eq 0 ]; then mv "$OUT/$log.partial" "$OUT/$log"; fi
    echo "$name: exit $code at $(( $(date +%s) - t0 )) s (limit ${limit} s)" | tee -a "$OUT/session.log"
}
step gpu_check 200 gpu_check.txt $PY benchmarks/gpu_check.py --kernels-only --quick
rm -f "$OUT/kernel_tuning.json"  # this session's measurement only
step tune 200 tune.log $PY -m mirrorla tune --out "$OUT/kernel_tuning.json" --report "$OUT/tune" --overwrite
# the later steps run with the settings tune chose, where it finished
if [ -f "$OUT/kernel_tuning.json" ]; then export MIRRORLA_TUNING="$OUT/kernel_tuning.json"; fi
step run_gpu 420 run_gpu.log env OUT="$OUT" bash benchmarks/run_gpu.sh $PY
# the targets judged on that snapshot (targets.md, targets.png), at once: a later step that fails leaves them written
step targets 60 targets.log $PY benchmarks/targets.py "$OUT"
# --op 65536: the op's kernels at the targets' longest rows, one by one (which pass holds MirrorLA's extra time)
step gpu_profile 120 gpu_profile.log $PY benchmarks/gpu_profile.py --host --mode train --attn relu,mirror \
    --op 65536 --out "$OUT/profile_host.txt"
# the local term's convolution with its grid channels-last (the layer's) and NCHW (before), bf16: the suspect of eager
# DeiT-T's gap to softmax at 1024² (~20 s)
step local_term 60 local_term.log $PY benchmarks/local_term.py --device cuda --dtype bf16 --out "$OUT/local_term.txt"
# last, where budget is left: the torch backend (a GPU without Triton) at the longest rows, whose core maps q and k by
# chunks of tokens since 78e9907 (op_torch_backend/ holds the H100 table from before: 2.5 and 2.1 GB forward)
step torch_backend 60 torch_backend.log env MIRRORLA_BACKEND=torch $PY -m mirrorla bench op --device cuda --n 65536 \
    --mode fwd,train --dtype bf16 --batch 8 --heads 3 --head-dim 64 --min-run-time 0.2 --timeout 40 --no-progress \
    --attn relu,mirror --out "$OUT/op_torch_backend" --overwrite
if [ -n "${PACK:-}" ]; then
    # written outside $OUT and renamed when complete: a killed pack never leaves a truncated archive under its name,
    # and a PACK inside $OUT is neither archived into itself (tar: "file changed as we read it") nor an old one
    # packed again
    packing=$(mktemp "${TMPDIR:-/tmp}/gpu_session_pack.XXXXXX")
    tar czf "$packing" -C "$OUT" --exclude "./${PACK##*/}" . && mv "$packing" "$PACK" \
        && echo "packed $OUT into $PACK" | tee -a "$OUT/session.log"
    rm -f "$packing"
fi
