#!/usr/bin/env bash
# Set up .venv with the pinned dependencies, then run the test suite on CPU (2 gloo ranks).
#   ./launch/test.sh               everything: tests/unit and tests/integration (what CI runs)
#   ./launch/test.sh --fast        the unit tier only (tests/unit: no launches), for day-to-day work
#   ./launch/test.sh [pytest args] e.g. tests/integration/test_merge.py -k zero3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$ROOT/launch/setup_env.sh"
cd "$ROOT"
if [ "$(gpu_count)" = 0 ]; then export DS_ACCELERATOR=cpu; fi
args=("$@")
if [ "${1:-}" = "--fast" ]; then args=(tests/unit "${@:2}"); fi
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 "${args[@]}"
