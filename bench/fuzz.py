"""A long run of the checkpoint mutation fuzzer (tests/support/fuzzing.py), outside the suite.

The test suite runs a few hundred cases of one seed; this runs as many as asked, over the same
corpus: the two newest tags of the suite's moe_z2 and moe_z3 runs (2-rank AutoEP Qwen3-MoE,
ZeRO-2 and ZeRO-3). The runs are taken from ``--runs``, else from ``$MOE_MERGE_TEST_RUNS``, else
trained once into bench/out/fuzz_runs/ with the suite's recipes. Prints the outcome counts and
the failures grouped by cause, each with the command that replays it; ``--json`` also writes
every case's record.

    .venv/bin/python bench/fuzz.py --cases 5000 --seed 7 [--runs RUN ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import fuzzing  # noqa: E402 (found through the sys.path entry above)

OUT = REPO / "bench" / "out"
KINDS = ("moe_z2", "moe_z3")


def suite_runs() -> list[Path]:
    """The suite's moe_z2 and moe_z3 runs: kept ones, or trained once into bench/out."""
    keep = os.environ.get("MOE_MERGE_TEST_RUNS")
    root = Path(keep) if keep else OUT / "fuzz_runs"
    missing = [k for k in KINDS if not (root / k / "checkpoints" / "latest").is_file()]
    if missing:
        import conftest

        for kind in missing:
            print(f"training {kind} into {root} ...", file=sys.stderr, flush=True)
            recipe, overrides = conftest.RUNS[kind]
            conftest.launch(recipe, [*overrides, f"name={kind}", f"output_dir={root}",
                                     f"data.cache_dir={OUT / 'data_cache'}"])
    return [root / k for k in KINDS]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--runs", nargs="+", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every case's record here")
    a = ap.parse_args()
    runs = a.runs or suite_runs()
    with tempfile.TemporaryDirectory(prefix="moe_merge_fuzz_") as work:
        res = fuzzing.run(runs, Path(work), seed=a.seed, cases=a.cases, start=a.start)
    if a.json:
        a.json.write_text("".join(json.dumps(r) + "\n" for r in res.records))
    print(res.report())
    return 0 if not res.failures else 1


if __name__ == "__main__":
    sys.exit(main())
