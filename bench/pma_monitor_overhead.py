"""Cost of the live PMA monitor: the tiny recipe with the monitor off and on, side by side.

Both runs are the frozen tiny MoE recipe (tests/recipes/moe_tiny.yaml, 200 steps, a checkpoint
and a validation pass every 20 steps) started by the deepspeed launcher, alternating (off, on,
off, on, ...). Reported per run: the launch's wall time (start-up included), the training loop's
time (first to last step, from metrics.jsonl; checkpoints, validation and the monitor
included) and the time the monitor itself reports (sum of pma/seconds over its evaluations).
The goal of the annealing issue: the monitor costs <= 5% of the run's wall time.

    .venv/bin/python bench/pma_monitor_overhead.py [--repeats 2] [key=value ...]
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


def launch(recipe: str, overrides: list[str]) -> float:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(29700 + os.getpid() % 200), "--module", "moe_merge.train", recipe, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def loop_stats(run_dir: Path) -> dict:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "time" in r]
    pma = [r for r in rows if "pma/val_loss" in r]
    return {"loop_s": max(times) - min(times) if times else float("nan"),
            "pma_s": sum(r["pma/seconds"] for r in pma), "pma_evals": len(pma),
            "pma_last": pma[-1]["pma/val_loss"] if pma else None,
            "val_last": next((r["val/loss"] for r in reversed(rows) if "val/loss" in r), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tests/recipes/moe_tiny.yaml",
                    help="default: the frozen tiny MoE recipe the documented numbers used")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from moe_merge.config.recipe import load_recipe

    cfg = load_recipe(REPO / args.recipe, args.overrides)
    runs: dict[str, list[dict]] = {"monitor off": [], "monitor on": []}
    with tempfile.TemporaryDirectory(prefix="pma_bench_") as tmp:
        # one launch first, not counted: the first launch after a while pays for cold caches
        # (Python imports, the tokenizer and data cache, DeepSpeed's ops) in its start-up
        wall = launch(args.recipe, [*args.overrides, f"output_dir={Path(tmp) / 'warmup'}",
                                    "train.resume=never", "logging.progress=false",
                                    "train.max_tokens=2.048e4", "schedule.warmup_tokens=4096"])
        print(f"  warm-up launch (not counted): {wall:.1f} s", flush=True)
        for rep in range(args.repeats):
            for kind in (runs if rep % 2 == 0 else list(runs)[::-1]):
                out = Path(tmp) / f"{kind.replace(' ', '_')}{rep}"
                ov = [*args.overrides, f"output_dir={out}", "train.resume=never",
                      "logging.progress=false", f"pma_monitor.enabled={kind == 'monitor on'}"]
                wall = launch(args.recipe, ov)
                stats = {"wall_s": wall, **loop_stats(out / cfg.name)}
                runs[kind].append(stats)
                print(f"  {kind:11s} repeat {rep}: wall {wall:6.1f} s, "
                      f"loop {stats['loop_s']:6.1f} s,"
                      f" monitor {stats['pma_s']:5.1f} s in {stats['pma_evals']} evaluations",
                      flush=True)
    off, on = runs["monitor off"], runs["monitor on"]
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("wall_s", "loop_s", "pma_s")}
           for k, rs in runs.items()}
    print(f"\n{args.recipe} {' '.join(args.overrides)}: median of {args.repeats}\n")
    print("| run | wall s | training loop s | monitor s (its own timer) | runs (wall) |\n"
          "|---|---|---|---|---|")
    for k, rs in runs.items():
        print(f"| {k} | {med[k]['wall_s']:.1f} | {med[k]['loop_s']:.1f} | {med[k]['pma_s']:.1f} | "
              f"{', '.join(format(r['wall_s'], '.1f') for r in rs)} |")
    dw = med["monitor on"]["wall_s"] / med["monitor off"]["wall_s"] - 1
    dl = med["monitor on"]["loop_s"] / med["monitor off"]["loop_s"] - 1
    own = med["monitor on"]["pma_s"] / med["monitor on"]["wall_s"]
    print(f"\nmonitor cost: {dw:+.1%} of the run's wall time, {dl:+.1%} of the training loop; "
          f"its own timer: {own:.1%} of the wall time (goal <= 5%)")
    # paired: each repeat's on/off pair ran back to back, so slow drifts of the machine cancel
    for key, what in (("wall_s", "wall time"), ("loop_s", "training loop")):
        pairs = [b[key] / a[key] - 1 for a, b in zip(off, on)]
        if len(pairs) > 1:
            m, sd = statistics.fmean(pairs), statistics.stdev(pairs)
            print(f"paired {what}: on/off - 1 per repeat "
                  f"{', '.join(format(x, '+.1%') for x in pairs)}; mean {m:+.1%} +- {sd:.1%} "
                  f"(standard error {sd / len(pairs) ** 0.5:.1%})")
    print(f"last merged loss {on[-1]['pma_last']:.4f} vs last val loss {on[-1]['val_last']:.4f}")
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / "pma_monitor_overhead.json").write_text(
        json.dumps({"command": sys.argv, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
