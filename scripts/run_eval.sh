#!/usr/bin/env bash
# Top-1/top-5 of a checkpoint over the config's validation folder: the original's run_eval.sh.
#   bash scripts/run_eval.sh CONFIG [NPROC] [--model PATH] [--key=value ...]
# With NPROC > 1 each process reads its share of the images and the counts are summed: the result is exact.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_config "bash $0 CONFIG [NPROC] [--model PATH] [--key=value ...]" "$@"
config="$1"; shift
if [[ $# -gt 0 ]] && is_count "$1"; then nproc="$1"; shift; else nproc=1; fi
if (( nproc == 1 )) && (( ${NNODES:-1} == 1 )); then
  exec "$PYTHON" -m vitkit eval --config_path "$config" "$@"
fi
torchrun_args "$nproc"
exec "$PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m vitkit eval --config_path "$config" "$@"
