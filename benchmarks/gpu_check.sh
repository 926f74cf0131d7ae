#!/bin/bash
# The GPU check: ONE command on one GPU, under 9 minutes on an H200, one markdown table.
#
#   bash benchmarks/gpu_check.sh                      # Llama-3.2-1B shape, 8k tokens
#   bash benchmarks/gpu_check.sh --rows uniform,dense-self-sliding   # any gpu_check.py option
#   bash benchmarks/gpu_check.sh --allow-cpu --model tiny            # the same path on a CPU
#
# Works on a machine with Python 3.12 and torch with CUDA and nothing else of the project's
# (no megatron-core, no Transformer Engine, no network): when the folder .whl/ exists (wheels
# downloaded elsewhere by benchmarks/gpu_check_wheels.sh, copied with the working tree) and
# megatron-core 0.19.2 does not import, the wheels are installed into GPU_CHECK_SITE
# [/tmp/site] without the network or their dependencies, and put on PYTHONPATH
# (GPU_CHECK_WHEELS=always installs them anyway, =never never).
#
# Sections (benchmarks/gpu_check.py has the details): setup (machine, fixtures), attention
# (the project's attention kernels vs float64, peak memory, 16k/32k), pretrain (uniform, dense
# self sliding/windows, dense frozen, sparse precomputed; FP8 with TE only), evaluate
# (tools/evaluate.py on the GPU). The table goes to stdout and to GPU_CHECK_OUT
# [benchmarks/results/gpu_check.md] (its figures as .json beside it); logs and work files to
# GPU_CHECK_LOGS [/tmp/tw_gpu_check]. Exit status 1 when a row failed.

set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python
    elif command -v python3 >/dev/null; then PYTHON=python3
    else PYTHON=python
    fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
WHEELS=$REPO_DIR/.whl
SITE=${GPU_CHECK_SITE:-/tmp/site}

has_megatron() {
    "$PYTHON" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
import megatron.core  # noqa: F401
sys.exit(0 if md.version("megatron-core") == "0.19.2" else 1)
EOF
}

MODE=${GPU_CHECK_WHEELS:-auto}
if [ "$MODE" != never ] && compgen -G "$WHEELS/*.whl" >/dev/null \
        && { [ "$MODE" = always ] || ! has_megatron; }; then
    echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from .whl into $SITE" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

exec "$PYTHON" "$REPO_DIR/benchmarks/gpu_check.py" \
    --out "${GPU_CHECK_OUT:-$REPO_DIR/benchmarks/results/gpu_check.md}" \
    --log-dir "${GPU_CHECK_LOGS:-/tmp/tw_gpu_check}" \
    "$@"
