#!/usr/bin/env bash
# The main job in one command: set up, then train a LoRA on SST-2 with all-MiniLM-L6-v2, offline.
# Extra arguments go to `adapterkit train` (see `adapterkit train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/adapterkit train "$@"
