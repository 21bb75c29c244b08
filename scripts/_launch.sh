# Shared by the run_*.sh scripts (sourced, not run): the Python to use and the torchrun options.
# PYTHON overrides the interpreter; NNODES, NODE_RANK and RDZV_ENDPOINT (HOST:PORT) launch across machines.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# One process per GPU when there are GPUs, else one.
default_nproc() { "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)'; }

# Restarted processes must not share torchrun's store with the ones that died (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# torchrun's rendezvous: on one machine a private one (--standalone); across machines every node names the same
# endpoint, on the machine of node 0, and its own NODE_RANK. MAX_RESTARTS restarts the job after a process dies;
# the restarted processes continue from the newest checkpoint.
torchrun_args() {
  local nproc="$1" nnodes="${NNODES:-1}"
  if (( nnodes > 1 )); then
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
      echo "NNODES=$nnodes needs RDZV_ENDPOINT=HOST:PORT (node 0's address) and NODE_RANK on every machine" >&2
      exit 2
    fi
    TORCHRUN_ARGS=(--nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc"
                   --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --max-restarts="${MAX_RESTARTS:-0}")
  else
    TORCHRUN_ARGS=(--standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-0}")
  fi
}

# Whether the file $1 is an Ascend rank table (hccl_8p.json from hccl_tools.py): a JSON object listing servers.
# Only its first 64 KiB are read, so a huge or endless file cannot stall the check.
is_rank_table() {
  [[ -f "$1" ]] || return 1
  local head
  head="$(LC_ALL=C head -c 65536 -- "$1" | LC_ALL=C tr -d '\000')"
  [[ "${head#"${head%%[![:space:]]*}"}" == "{"* ]] \
    && grep -qE '"(server_list|server_count|group_list)"[[:space:]]*:' <<<"$head"
}

# Every script takes a config file first; without one it prints its usage (given as $1) and exits 2. The original's
# distributed script took an Ascend rank table first (RANK_TABLE CONFIG): that gets one line naming the config.
require_config() {
  local usage="$1"; shift
  if [[ $# -ge 1 ]] && is_rank_table "$1"; then
    local config="CONFIG"
    if [[ $# -ge 2 && -f "$2" ]]; then config="$2"; fi
    echo "vitkit: error: $1 is an Ascend rank table, which is not needed (torchrun starts the processes itself):" \
         "drop it and give the config first: ${usage/CONFIG/"$config"}" >&2
    exit 2
  fi
  if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: $usage   (CONFIG: a YAML file)" >&2
    exit 2
  fi
}
