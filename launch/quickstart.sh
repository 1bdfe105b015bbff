#!/usr/bin/env bash
# The quick start: set up .venv, train the default tiny MoE recipe (Qwen3-MoE, 8 experts top-2,
# expert parallelism 2, ZeRO-2) with the deepspeed launcher on 2 ranks, merge its newest
# checkpoints (PMA: SMA of the newest N = 4) and compare the merged model with the latest
# checkpoint: a table of validation losses and a plot of every checkpoint's loss against tokens.
#   ./launch/quickstart.sh [key=value ...]     e.g. seed=2 train.max_tokens=6e5
# Environment: QUICKSTART_N (checkpoints merged, default 4).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/launch/setup_env.sh"
source "$ROOT/launch/common.sh"
cd "$ROOT"
MERGE="$VENV/bin/moe-merge"
N=${QUICKSTART_N:-4}
load() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?"; }
start=$(date +%s)
load0=$(load)
"$ROOT/launch/train.sh" recipes/moe_tiny.yaml "$@"
RUN=$("$PY" -m moe_merge.train recipes/moe_tiny.yaml "$@" --get run_dir)
echo "[quickstart] trained in $(( $(date +%s) - start )) s (plus set-up; 1-minute load average" \
     "$load0 before, $(load) after, on $(nproc) cores)."
OUT="$RUN/merged/sma_last$N"
"$MERGE" merge "$RUN" --last "$N" --out "$OUT" --overwrite --quiet
echo "[quickstart] evaluating every checkpoint and the merge on the run's fixed validation batches"
"$MERGE" compare "$RUN" "$OUT" --png "$RUN/compare.png" --quiet
echo "[quickstart] done in $(( $(date +%s) - start )) s. Merged HF model: $OUT"
echo "[quickstart] watch the run: $VENV/bin/tensorboard --logdir $(dirname "$RUN")"
