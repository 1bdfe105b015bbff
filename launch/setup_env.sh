#!/usr/bin/env bash
# Create .venv beside the repo and install moe-merge with its pinned dependencies; on a machine
# without a GPU, compile DeepSpeed's CPU ops once. Run by every launch/ script first.
# Idempotent and quick (no Python started) when pyproject.toml and launch/constraints.txt are
# unchanged and the ops are built.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON=${PYTHON:-python3}
# The pins are for this CPU build of torch; a GPU node takes the same torch version's CUDA build
# (PyPI's default on Linux; MOE_MERGE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 picks
# another CUDA) and the same versions of everything else.
constraints="$ROOT/launch/constraints.txt"
gpus=$([ -x "$PY" ] || command -v nvidia-smi >/dev/null 2>&1 && gpu_count || echo 0)
if [ "$gpus" != 0 ]; then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' "$ROOT/launch/constraints.txt" > "$constraints"
fi
want=$(cat "$ROOT/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)
stamp="$VENV/.moe_merge_installed"
ops_built() {
  # both CPU ops compiled, and no compile lock left (a killed compile's lock blocks every launch)
  local ext=$TORCH_EXTENSIONS_DIR
  [ -f "$ext/deepspeed_shm_comm/deepspeed_shm_comm.so" ] && [ -f "$ext/fused_adam/fused_adam.so" ] \
    && [ -z "$(find "$ext" -maxdepth 2 -name lock 2>/dev/null)" ]
}
prebuild_ops() {
  # GPU nodes: DeepSpeed builds the ops it needs itself. CPU: build once, before any ranks start.
  if [ "$gpus" != 0 ] || ops_built; then return 0; fi
  echo "[setup] compiling DeepSpeed CPU ops (first time only)" >&2
  DS_ACCELERATOR=cpu "$PY" -m moe_merge.training.ops 2>&1 | grep -v "^\[.*WARNING" >&2 || true
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$PY" ]; then
  prebuild_ops
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: $PYTHON is $("$PYTHON" --version 2>&1); moe-merge needs Python >= 3.10" >&2
  exit 2
fi
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
build=$([ "$gpus" = 0 ] && echo "CPU" || echo "CUDA")
echo "[setup] installing pinned dependencies into $VENV (torch $build build, deepspeed, transformers)" >&2
"$PY" -m pip install --quiet --disable-pip-version-check \
  ${MOE_MERGE_TORCH_INDEX:+--extra-index-url "$MOE_MERGE_TORCH_INDEX"} \
  -c "$constraints" -e "$ROOT[dev]"
echo "$want" > "$stamp"
prebuild_ops
echo "[setup] done" >&2
