#!/usr/bin/env bash
# Training in one process (one GPU, or the CPU): the original's run_train_standalone.sh.
#   bash scripts/run_train_standalone.sh CONFIG [--key=value ...]
# Pick the GPU with CUDA_VISIBLE_DEVICES, e.g. CUDA_VISIBLE_DEVICES=3 bash scripts/run_train_standalone.sh CONFIG
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_config "bash $0 CONFIG [--key=value ...]" "$@"
config="$1"; shift
exec "$PYTHON" -m vitkit train --config_path "$config" "$@"
