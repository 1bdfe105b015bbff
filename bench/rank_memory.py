"""Per-rank host memory against the world size under ZeRO-3: the partitioned part falls as 1/world.

The same model trains 2 steps on 2, 4 and 8 CPU ranks of this host (micro batch 1 x 32 tokens,
small engine buckets, activation checkpointing; the ranks share the cores). For each world size
it reports the largest rank's peak resident set above its resident set after the imports, the
runtime's fixed cost at that world size (the same launch with a 0.2M-parameter model), the
difference ("net": what the model costs a rank) and the memory plan's model states per rank.
If the partitioned part falls as 1/world, net x world stays flat while net falls.

    .venv/bin/python bench/rank_memory.py [--ranks 2,4,8] [--models dense,moe]

Models: a dense Qwen3 of 119M and a Qwen3-MoE of 162M with 32 experts (EP = the world size),
the two models of tests/integration/test_rank_memory.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_plan_check import RUNTIME, measure, predict  # noqa: E402

COMMON = ["parallel.world_size=0", "parallel.micro_batch=1", "data.seq_len=32",
          "train.max_tokens=512", "schedule.warmup_tokens=0", "checkpoint.every_tokens=0",
          "checkpoint.save_final=false", "logging.log_every=1", "logging.val_every=0",
          "logging.val_batches=8", "logging.progress=false", "logging.tensorboard=false",
          "model.activation_checkpointing=true", "parallel.zero_stage=3"]
ENGINE = {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
          "reduce_bucket_size": 2e6, "stage3_prefetch_bucket_size": 1e6,
          "stage3_max_live_parameters": 2e6, "stage3_param_persistence_threshold": 1e4,
          "stage3_max_reuse_distance": 0, "sub_group_size": 2e6}
MODELS = {
    "dense": ["model.arch=qwen3", "model.hidden_size=768", "model.num_layers=13",
              "model.num_heads=12", "model.num_kv_heads=4", "model.head_dim=64",
              "model.intermediate_size=3072", "parallel.ep_size=1"],
    "moe": ["model.arch=qwen3_moe", "model.hidden_size=512", "model.num_layers=8",
            "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=64",
            "model.moe_intermediate_size=384", "model.num_experts=32", "model.top_k=2"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--models", default="dense,moe")
    args = ap.parse_args()
    worlds = [int(r) for r in args.ranks.split(",")]
    cache = Path(tempfile.mkdtemp(prefix="rank_memory_cache_"))
    engine = cache / "zero3_small.json"
    engine.write_text(json.dumps({"zero_optimization": ENGINE, "steps_per_print": 10**9}))
    common = [*COMMON, f"parallel.ds_config={engine}"]
    runtime = [*RUNTIME, "parallel.zero_stage=3"]
    measure(runtime, 2, cache, common)  # builds the data cache: not counted
    rows = {}
    for world in worlds:
        fixed = measure(runtime, world, cache, common)["mem/peak_above_imports_mib"]
        for name in args.models.split(","):
            model = MODELS[name] + ([f"parallel.ep_size={world}"] if name == "moe" else [])
            plan = predict(model, world, common)
            got = measure(model, world, cache, common)
            peak = got["mem/peak_above_imports_mib"]
            rows[name, world] = (plan.model_states / 2**20, peak, fixed, peak - fixed,
                                 got["mem/startup_peak_above_imports_mib"])
            print(f"measured {name} on {world} ranks: peak {peak:.0f} MiB above imports, "
                  f"runtime {fixed:.0f}", flush=True)
    print(f"\n{'model':<7}{'ranks':>6}{'plan states':>12}{'x ranks':>9}{'peak':>7}{'start-up':>9}"
          f"{'runtime':>8}{'net':>6}{'net x ranks':>12}   (MiB per rank)")
    for (name, world), (states, peak, fixed, net, start) in rows.items():
        print(f"{name:<7}{world:>6}{states:12.0f}{states * world:9.0f}{peak:7.0f}{start:9.0f}"
              f"{fixed:8.0f}{net:6.0f}{net * world:12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
