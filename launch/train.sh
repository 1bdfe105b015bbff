#!/usr/bin/env bash
# Launch a recipe with the deepspeed launcher: CPU ranks with gloo when there is no GPU, one rank
# per GPU with nccl otherwise, several nodes with HOSTFILE=launch/hostfile.
#   ./launch/train.sh recipes/moe_tiny.yaml train.lr=3e-3 checkpoint.every_tokens=2e5
# Environment: NUM_RANKS (ranks on this node; default parallel.world_size of the recipe),
# HOSTFILE (multi-node), MASTER_PORT. Sets up .venv first if needed (launch/setup_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 1 ]; then echo "usage: $0 RECIPE [key=value ...]" >&2; exit 2; fi
"$ROOT/launch/setup_env.sh"
gpus=$(gpu_count)
if [ "$gpus" = 0 ]; then export DS_ACCELERATOR=cpu; fi
# The recipe is validated for the ranks this node starts (batch and EP arithmetic, the memory
# plan with parallel.device_memory): errors exit here, before any rank starts.
if [ -n "${HOSTFILE:-}" ]; then  # the hostfile decides the world: validate the recipe alone
  "$PY" -m moe_merge.train "$@" --get run_dir >/dev/null
else
  n=$("$PY" -m moe_merge.train "$@" --launch-ranks "${NUM_RANKS:-auto:$([ "$gpus" = 0 ] && echo 2 || echo "$gpus")}")
fi
port=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ -n "${HOSTFILE:-}" ]; then
  exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --master_port "$port" --module moe_merge.train "$@"
fi
exec "$VENV/bin/deepspeed" --num_gpus "$n" --master_port "$port" --module moe_merge.train "$@"
