#!/usr/bin/env bash
# Create (or reuse) .venv with Python 3.12 and install the project with its test/eval extras.
# Idempotent: a second run only checks that the installed versions still match pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  if command -v pyenv >/dev/null 2>&1; then  # pyenv may have 3.12 without putting it on PATH
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python3" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3"; return
    fi
  fi
  echo "error: Python 3.12 not found (megatron-core 0.19.2 needs it): install python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python312)
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.megatron_tw_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing megatron-tw and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # pyproject.toml holds the ranges; constraints.txt the exact versions CI tests with.
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,hf,eval,wandb]"
  touch "$stamp"
fi
.venv/bin/python -W ignore -c "import megatron.core, torch; print(f'[setup] .venv ready: megatron-core {megatron.core.__version__}, torch {torch.__version__}')"
