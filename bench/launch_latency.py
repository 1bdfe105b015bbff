"""Time from ``./launch/train.sh`` to the first training step, for this checkout and, side by
side in the same run, another one (``--against``, e.g. an older commit's worktree).

Each launch trains a few steps of a tiny MoE (2 ranks, AutoEP, ZeRO-2) with the same recipe and
overrides; the first step's wall-clock time comes from the run's ``metrics.jsonl``. The corpus
and tokenizer cache is shared and built by a warm-up launch per checkout that is not counted,
so the numbers are what a user pays on every launch after the first. Launches alternate between
the checkouts to spread machine noise over both.

    .venv/bin/python bench/launch_latency.py [--against DIR] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "tests" / "recipes" / "moe_tiny.yaml"
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=32", "model.moe_intermediate_size=64", "model.num_experts=4",
        "data.seq_len=64", "parallel.micro_batch=2", "parallel.global_batch=4",
        "schedule.warmup_tokens=256", "train.max_tokens=1024", "logging.log_every=1",
        "logging.val_every=0", "logging.progress=false"]


def launch(checkout: Path, overrides: list[str], cache: Path) -> tuple[float, float]:
    """One launch in ``checkout``: (seconds to the first step's end, seconds in all)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(checkout / "launch" / "train.sh"), str(RECIPE), *TINY, *overrides,
               f"output_dir={tmp}", "name=r", f"data.cache_dir={cache}"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        end = time.time()
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(Path(tmp) / "r" / "metrics.jsonl")]
        first = next(r for r in rows if "train/loss" in r)
        return first["time"] - start, end - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, help="another checkout, launched with its own "
                   "launch/train.sh (and its .venv)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="recipe overrides for every launch")
    a = p.parse_args()
    checkouts = {"this checkout": REPO}
    if a.against is not None:
        checkouts[f"--against {a.against}"] = a.against.resolve()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as cache:
        for name, path in checkouts.items():
            launch(path, a.overrides, Path(cache) / name.replace(" ", "_").replace("/", "_"))
        for i in range(a.repeats):
            for name, path in checkouts.items():
                cache_dir = Path(cache) / name.replace(" ", "_").replace("/", "_")
                results[name].append(launch(path, a.overrides, cache_dir))
                first, total = results[name][-1]
                print(f"[{i + 1}/{a.repeats}] {name}: first step {first:.1f} s, "
                      f"launch {total:.1f} s", flush=True)
    load = os.getloadavg()[0]
    print(f"\nlaunch/train.sh -> end of the first training step, median of {a.repeats} "
          f"(1-minute load {load:.2f} at the end, {os.cpu_count()} cores)")
    print(f"  {'checkout':<40} {'first step s':>12} {'whole launch s':>15}")
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(r[0] for r in rows)
        total = statistics.median(r[1] for r in rows)
        print(f"  {name:<40} {medians[name]:>12.1f} {total:>15.1f}")
    if a.against is not None:
        this, other = medians.values()
        print(f"  ratio this / against: {this / other:.2f}")


if __name__ == "__main__":
    main()
