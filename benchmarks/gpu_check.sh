#!/bin/bash
# The GPU check a maintainer with one GPU runs in a few minutes (inside the Dockerfile image, or
# any environment with CUDA, Transformer Engine and this repository installed):
#
#   bash benchmarks/gpu_check.sh                      # Llama-3.2-1B shape, 8k tokens, 4 rows
#   bash benchmarks/gpu_check.sh --seq-length 16384   # any benchmarks/gpu_check.py option
#
# 1. Transformer Engine import check (its version and FP8 support per recipe on this GPU).
# 2. bf16 and FP8 training steps with token weighting off (uniform) and on (dense, short
#    context 4096), each a short pretrain_tw.py run on --mock-data.
# 3. A table: step time, tokens/s, TFLOP/s (formula in benchmarks/gpu_check.py) and MFU
#    against the dense peak (H100/H200: bf16 989, FP8 1979 TFLOP/s), written to
#    GPU_CHECK_OUT [benchmarks/results/gpu_check.md]; per-row logs in GPU_CHECK_LOGS
#    [/tmp/tw_gpu_check].
#
# Without Transformer Engine the bf16 rows run with --transformer-impl local and the FP8 rows
# are marked "skipped: Transformer Engine not installed". Exit status 1 when a row failed.

set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec "$PYTHON" "$REPO_DIR/benchmarks/gpu_check.py" \
    --out "${GPU_CHECK_OUT:-$REPO_DIR/benchmarks/results/gpu_check.md}" \
    --log-dir "${GPU_CHECK_LOGS:-/tmp/tw_gpu_check}" \
    "$@"
