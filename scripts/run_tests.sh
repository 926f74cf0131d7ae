#!/usr/bin/env bash
# The project's test command: set up .venv if needed, then every test tier except gpu and slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -m "not gpu and not slow" "$@"
