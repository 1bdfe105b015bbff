# Sourced by the launch/ scripts: paths, the virtualenv, and what hardware this node has.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MOE_MERGE_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"
# DeepSpeed's JIT-compiled ops are cached per virtualenv: checkouts with different venvs would
# otherwise recompile them in turn in the one shared ~/.cache/torch_extensions.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}

# GPUs torch will see here, without importing torch (seconds) when it can be avoided.
gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ] && [ -z "$CUDA_VISIBLE_DEVICES" ]; then echo 0; return; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$n" -gt 0 ]; then
      n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    fi
    echo "$n"
  elif compgen -G "/dev/nvidia[0-9]*" >/dev/null || compgen -G "/dev/kfd" >/dev/null; then
    "$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'
  else
    echo 0
  fi
}
