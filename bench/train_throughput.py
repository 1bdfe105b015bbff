"""Throughput of moe_merge.train against a bare DeepSpeed loop, side by side in one run.

Both are started by the deepspeed launcher with the same recipe: same model, data, DeepSpeed
config (ZeRO stage, AutoEP) and checkpoint interval. The trainer adds what the recipe is for:
deterministic data indexing, LR schedule, metric reduction and logging (TensorBoard +
metrics.jsonl + progress bar), expert-load statistics, checkpoint sidecars. Validation is a
feature with its own cost; it is measured as a separate row.

Tokens/s is measured over the steps after the first ``--skip`` (start-up excluded), from the
trainer's metrics (interval tokens / interval time) and from the bare loop's step-end times.
Runs alternate (bare, recipe, bare, recipe, ...) to spread machine noise over both.

    .venv/bin/python bench/train_throughput.py [--steps 100] [--repeats 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch(module_or_script: list[str], recipe: str, overrides: list[str]) -> str:
    env = {**os.environ}
    import torch
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(29700 + os.getpid() % 200), *module_or_script, recipe, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def recipe_tps(run_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r]
    tokens = seconds = 0.0
    prev = None
    for r in rows:
        if prev is not None and prev >= skip:
            span = (r["step"] - prev) * (r["train/tokens"] / r["step"])
            tokens += span
            seconds += span / r["perf/tokens_per_s"]
        prev = r["step"]
    return tokens / seconds


def bare_tps(stdout: str, skip: int) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("BARE_LOOP "))
    data = json.loads(line[len("BARE_LOOP "):])
    t = data["step_end_times"]  # t[i]: end of step i + 1
    return (len(t) - skip) * data["tokens_per_step"] / (t[-1] - t[skip - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tests/recipes/moe_tiny.yaml",
                    help="default: the frozen tiny MoE recipe the documented numbers used")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--skip", type=int, default=10,
                    help="start-up steps left out (a multiple of logging.log_every, >= 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from moe_merge.config.recipe import load_recipe
    cfg = load_recipe(REPO / args.recipe, args.overrides)
    tokens = args.steps * cfg.tokens_per_step
    results: dict[str, list[float]] = {"bare": [], "recipe": [], "recipe+val": []}
    with tempfile.TemporaryDirectory(prefix="tput_") as tmp:
        for rep in range(args.repeats):
            for kind in results:
                out = Path(tmp) / f"{kind}{rep}"
                ov = [*args.overrides, f"train.max_tokens={tokens}", f"output_dir={out}",
                      "logging.progress=true", "train.resume=never"]
                if kind == "bare":
                    stdout = launch([str(REPO / "bench" / "bare_loop.py")], args.recipe, ov)
                    results[kind].append(bare_tps(stdout, args.skip))
                else:
                    val = [] if kind == "recipe+val" else ["logging.val_every=0"]
                    launch(["--module", "moe_merge.train"], args.recipe, ov + val)
                    results[kind].append(recipe_tps(out / cfg.name, args.skip))
                print(f"  {kind:11s} repeat {rep}: {results[kind][-1]:8.0f} tokens/s", flush=True)
    base = statistics.median(results["bare"])
    print(f"\n{args.recipe} {' '.join(args.overrides)}: {args.steps} steps, "
          f"{cfg.tokens_per_step} tokens/step, first {args.skip} left out, "
          f"median of {args.repeats}")
    print("| loop | tokens/s (median) | runs | ratio to bare |\n|---|---|---|---|")
    for kind, vals in results.items():
        med = statistics.median(vals)
        print(f"| {kind} | {med:.0f} | {', '.join(f'{v:.0f}' for v in vals)} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
