#!/usr/bin/env bash
# Set up .venv with the pinned dependencies, then run the test suite on CPU (2 gloo ranks).
#   ./launch/test.sh [pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/launch/setup_env.sh"
VENV=${MOE_MERGE_VENV:-$ROOT/.venv}
# DeepSpeed's JIT-compiled ops are cached per virtualenv: checkouts with different venvs would
# otherwise recompile them in turn in the one shared ~/.cache/torch_extensions.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
cd "$ROOT"
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
