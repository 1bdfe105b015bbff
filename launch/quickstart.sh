#!/usr/bin/env bash
# The quick start: set up .venv, train the default tiny MoE recipe (Qwen3-MoE, 8 experts top-2,
# expert parallelism 2, ZeRO-2) with the deepspeed launcher on 2 ranks, merge its last
# checkpoints (PMA, SMA of the newest 3) and compare validation losses.
#   ./launch/quickstart.sh [key=value ...]     e.g. train.max_tokens=4e5
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
MERGE="$ROOT/.venv/bin/moe-merge"
start=$(date +%s)
"$ROOT/launch/train.sh" recipes/moe_tiny.yaml "$@"
RUN=$("$PY" -m moe_merge.train recipes/moe_tiny.yaml "$@" --get run_dir)
echo "[quickstart] trained in $(( $(date +%s) - start )) s (plus set-up)."
"$MERGE" merge "$RUN" --last 3 --out "$RUN/merged/sma_last3" --overwrite
echo "[quickstart] validation loss on the run's fixed validation batches:"
"$MERGE" eval "$RUN" | sed 's/^/  latest checkpoint  /'
"$MERGE" eval "$RUN/merged/sma_last3" | sed 's/^/  merged (SMA of 3)  /'
echo "[quickstart] done in $(( $(date +%s) - start )) s. Merged HF model: $RUN/merged/sma_last3"
echo "[quickstart] watch the run: .venv/bin/tensorboard --logdir runs/"
