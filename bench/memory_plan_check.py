"""The memory plan of ``--dry-run`` against measured per-rank peaks of real CPU runs.

On CPU the device is the host, so a rank's peak resident set above its resident set after the
imports (``mem/peak_above_imports_mib`` and ``mem/startup_peak_above_imports_mib`` in the run's
metrics, the largest over the ranks) is what the plan predicts: model states + buckets +
activations, and the start-up peak. The runtime's own fixed cost (the engine, gloo, the data
loader) is measured once with a model 1000x smaller and reported beside; "net" subtracts it.
Each case trains 2 steps on 2 ranks with checkpoints off, micro batch 1 of 128 tokens and the
engine's buckets set small (``SMALL_BUCKETS``): activations and buffers are small, the model
states dominate.

    .venv/bin/python bench/memory_plan_check.py [--cases dense_z2,moe_ep2_z3] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPE = REPO / "tests" / "recipes" / "moe_tiny.yaml"

COMMON = ["data.seq_len=128", "parallel.micro_batch=1", "train.max_tokens=512",
          "schedule.warmup_tokens=0", "checkpoint.every_tokens=0", "checkpoint.save_final=false",
          "logging.log_every=1", "logging.val_every=0", "logging.val_batches=2",
          "logging.progress=false", "logging.tensorboard=false", "parallel.world_size=0"]
DENSE = ["model.arch=qwen3", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
         "model.num_kv_heads=4", "model.head_dim=64", "model.intermediate_size=2048",
         "parallel.ep_size=1"]
MOE = ["model.arch=qwen3_moe", "model.hidden_size=512", "model.num_layers=8",
       "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=64",
       "model.moe_intermediate_size=256", "model.num_experts=16", "model.top_k=2"]
RUNTIME = ["model.arch=qwen3", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=1",
           "model.num_kv_heads=1", "model.head_dim=32", "model.intermediate_size=32",
           "parallel.ep_size=1", "parallel.zero_stage=2"]


SMALL_BUCKETS = {"reduce_bucket_size": 1e6, "allgather_bucket_size": 1e6,
                 "stage3_prefetch_bucket_size": 1e6, "stage3_max_live_parameters": 4e6,
                 "stage3_max_reuse_distance": 0}


def engine_configs(where: Path) -> str:
    """parallel.ds_config overrides: the bundled zero<stage>.json with small buckets."""
    from moe_merge.config.deepspeed import BUNDLED

    for stage in range(4):
        ds = json.loads((BUNDLED / f"zero{stage}.json").read_text())
        if stage:
            ds["zero_optimization"].update(SMALL_BUCKETS)
        (where / f"zero{stage}.json").write_text(json.dumps(ds))
    return str(where)


def with_engine(overrides: list[str], where: str) -> list[str]:
    stage = [o for o in overrides if o.startswith("parallel.zero_stage=")][-1].split("=")[1]
    return [*overrides, f"parallel.ds_config={where}/zero{stage}.json"]


def cases(ranks: int) -> dict[str, list[str]]:
    out = {f"dense_z{z}": [*DENSE, f"parallel.zero_stage={z}"] for z in (0, 1, 2, 3)}
    out.update({f"dense_bf16_z{z}": [*DENSE, f"parallel.zero_stage={z}",
                                     "parallel.precision=bf16"] for z in (1, 2, 3)})
    out["moe_ep1_z2"] = [*MOE, "parallel.ep_size=1", "parallel.zero_stage=2"]
    out.update({f"moe_ep{ranks}_z{z}": [*MOE, f"parallel.ep_size={ranks}",
                                         f"parallel.zero_stage={z}"] for z in (1, 2, 3)})
    out[f"moe_bf16_ep{ranks}_z2"] = [*MOE, f"parallel.ep_size={ranks}", "parallel.zero_stage=2",
                                     "parallel.precision=bf16"]
    return out


def measure(overrides: list[str], ranks: int, cache: Path, common: list[str] = COMMON) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(REPO / "launch" / "train.sh"), str(RECIPE), *common, *overrides,
               f"parallel.global_batch={ranks}", f"output_dir={tmp}", "name=r",
               f"data.cache_dir={cache}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "NUM_RANKS": str(ranks)}, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise SystemExit(f"launch failed ({proc.returncode}): {' '.join(overrides)}\n{tail}")
        rows = [json.loads(x) for x in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "mem/peak_above_imports_mib" in r][-1]


def predict(overrides: list[str], ranks: int, common: list[str] = COMMON):
    from moe_merge.config.deepspeed import build_ds_config
    from moe_merge.config.recipe import load_recipe
    from moe_merge.training import memory_plan as mp

    cfg = load_recipe(RECIPE, [*common, *overrides, f"parallel.global_batch={ranks}"])
    ds = build_ds_config(cfg, ranks)
    lay = mp.Layout.of(cfg, ranks, ds)
    return mp.plan(mp.model_shapes(cfg, lay.persistence_threshold), lay)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    todo = cases(args.ranks)
    if args.cases:
        todo = {k: todo[k] for k in args.cases.split(",")}
    cache = Path(tempfile.mkdtemp(prefix="memplan_cache_"))
    where = engine_configs(cache)
    todo = {k: with_engine(v, where) for k, v in todo.items()}
    measure(with_engine(RUNTIME, where), args.ranks, cache)  # builds the data cache: not counted
    base = measure(with_engine(RUNTIME, where), args.ranks, cache)
    fixed = base["mem/peak_above_imports_mib"]
    print(f"runtime's fixed cost (a 0.2M-parameter model): {fixed:.0f} MiB peak above imports, "
          f"{base['mem/startup_peak_above_imports_mib']:.0f} MiB at start-up\n")
    print(f"{'case':<18}{'states':>8}{'+rest':>7}{'plan':>8}{'meas.':>8}{'net':>8}"
          f"{'net/plan':>9}{'start plan':>11}{'start net':>10}{'ratio':>7}   (MiB per rank)")
    worst = 0.0
    for name, overrides in todo.items():
        mem = predict(overrides, args.ranks)
        got = measure(overrides, args.ranks, cache)
        peak, start = got["mem/peak_above_imports_mib"], got["mem/startup_peak_above_imports_mib"]
        plan_peak = (mem.model_states + mem.buffers + mem.activations) / 2**20
        net, start_net = peak - fixed, start - base["mem/startup_peak_above_imports_mib"]
        ratio = net / plan_peak
        worst = max(worst, abs(ratio - 1))
        rest = (mem.buffers + mem.activations) / 2**20
        print(f"{name:<18}{mem.model_states / 2**20:8.0f}{rest:7.0f}{plan_peak:8.0f}{peak:8.0f}"
              f"{net:8.0f}"
              f"{ratio:9.2f}{mem.startup / 2**20:11.0f}{start_net:10.0f}"
              f"{start_net / (mem.startup / 2**20):7.2f}", flush=True)
    print(f"\nlargest |net / plan - 1| of the training peak: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
