#!/usr/bin/env bash
# The quick start: set up .venv, then train the default tiny MoE recipe (Qwen3-MoE, 8 experts
# top-2, expert parallelism 2, ZeRO-2) with the deepspeed launcher on 2 ranks.
#   ./launch/quickstart.sh [key=value ...]     e.g. train.max_tokens=4e5
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
"$ROOT/launch/train.sh" recipes/moe_tiny.yaml "$@"
echo "[quickstart] finished in $(( $(date +%s) - start )) s (plus set-up)."
echo "[quickstart] watch it: .venv/bin/tensorboard --logdir runs/"
