#!/usr/bin/env bash
# Data-parallel training with torchrun: the original's run_train_distribute.sh without the rank table.
#   bash scripts/run_train_distribute.sh CONFIG [NPROC] [--key=value ...]
# NPROC defaults to the GPU count (1 without GPUs). Across machines, on each one:
#   NNODES=2 NODE_RANK=<0|1> RDZV_ENDPOINT=<node 0 host>:29500 bash scripts/run_train_distribute.sh CONFIG 8
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_config "bash $0 CONFIG [NPROC] [--key=value ...]   (NPROC: processes on this machine)" "$@"
config="$1"; shift
if [[ $# -gt 0 ]] && is_count "$1"; then nproc="$1"; shift; else nproc="$(default_nproc)"; fi
torchrun_args "$nproc"
exec "$PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m vitkit train --config_path "$config" "$@"
