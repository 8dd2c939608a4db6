#!/usr/bin/env bash
# The kernel checks (gpu_check.py) under compute-sanitizer's memcheck: every out-of-bounds or misaligned access of
# the Triton kernels, global or shared memory, named by kernel and source line. gpu_check compares values only, and
# an out-of-bounds read can return plausible numbers or fault at a later, unrelated launch (an H200 reported the
# one-tile state kernel's shared-memory read as an illegal address in the output kernel that followed it).
# PyTorch's caching allocator is off, so each tensor is its own allocation and a read past its end is caught.
# About 2 minutes on an H200 with --kernels-only --quick (the default arguments).
# Usage: bash benchmarks/gpu_sanitize.sh [GPU_CHECK ARGS...]   (exit 1 on any sanitizer error or failed check)
set -uo pipefail
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)}
if [ -z "$SANITIZER" ] || [ ! -x "$SANITIZER" ]; then
    echo "gpu_sanitize: compute-sanitizer not found (CUDA toolkit); set SANITIZER=/path/to/compute-sanitizer" >&2
    exit 2
fi
[ $# -gt 0 ] || set -- --kernels-only --quick
export PYTHONPATH=${PYTHONPATH:-src} PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
"$SANITIZER" --tool memcheck --print-limit 20 --error-exitcode 1 ${PYTHON:-python} benchmarks/gpu_check.py "$@"
