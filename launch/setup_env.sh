#!/usr/bin/env bash
# Create .venv beside the repo and install moe-merge with its pinned dependencies.
# Idempotent: does nothing when pyproject.toml and launch/constraints.txt are unchanged.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MOE_MERGE_VENV:-$ROOT/.venv}
# DeepSpeed's JIT-compiled ops are cached per virtualenv: checkouts with different venvs would
# otherwise recompile them in turn in the one shared ~/.cache/torch_extensions.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
PYTHON=${PYTHON:-python3}
want=$(cat "$ROOT/pyproject.toml" "$ROOT/launch/constraints.txt" | sha256sum | cut -d' ' -f1)
stamp="$VENV/.moe_merge_installed"
prebuild_ops() {
  # Compile DeepSpeed's CPU ops once here rather than in every rank of the first launch.
  if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.cuda.is_available())' 2>/dev/null; then
    return 0
  fi
  DS_ACCELERATOR=cpu "$VENV/bin/python" -m moe_merge.training.ops 2>&1 | grep -v "^\[.*WARNING" >&2 || true
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  prebuild_ops
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: $PYTHON is $("$PYTHON" --version 2>&1); moe-merge needs Python >= 3.10" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[setup] installing pinned dependencies into $VENV (torch CPU build, deepspeed, transformers)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$ROOT/launch/constraints.txt" -e "$ROOT[dev]"
echo "$want" > "$stamp"
echo "[setup] compiling DeepSpeed CPU ops (first time only)"
prebuild_ops
echo "[setup] done"
