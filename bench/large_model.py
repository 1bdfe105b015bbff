"""The largest models this machine trains: a ~0.59B Qwen3-MoE (96% of it in 64 experts) under
ZeRO-3 + EP=2 and a ~0.42B dense Qwen3 under ZeRO-3, each on 2 CPU ranks.

Each case trains a few steps with the deepspeed launcher (``launch/train.sh``), writing
3 checkpoints, merges them (``moe-merge merge --last 3``), loads the merged folder with
transformers' ``from_pretrained`` and scores it on validation windows, then deletes the
checkpoints (several GiB each). Per-rank host memory is sampled from outside every 0.2 s
(``VmHWM`` of each rank process): the peak at the end of start-up (the moment the trainer
prints ``run dir``, before the first step) and the peak over the whole run, beside the memory
plan's prediction for the same recipe (``moe-merge dry-run``'s table). The goal: start-up is
never the peak, at most 1.1 x the rank's training-state bytes + 1.5 GiB.

``--checkout DIR`` trains with another checkout of this repository instead (e.g. a ``git
worktree`` of an older commit, with this checkout's ``.venv`` linked in): the same model, data
and engine config, for a before/after comparison. Recipe keys that tree does not know are left
out (``--drop``).

    .venv/bin/python bench/large_model.py [--cases moe,dense] [--steps 6] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPE = "recipes/moe_tiny.yaml"
TOKENS_PER_STEP = 512  # 2 ranks x micro batch 1 x 256 tokens

COMMON = ["data.seq_len=256", "parallel.micro_batch=1", "parallel.global_batch=2",
          "parallel.world_size=2", "parallel.zero_stage=3", "schedule.warmup_tokens=0",
          "logging.log_every=1", "logging.val_every=0", "logging.val_batches=2",
          "logging.progress=false", "checkpoint.keep_last=0",
          "model.activation_checkpointing=true", "model.attn_implementation=sdpa"]
CASES = {
    "moe": ["model.arch=qwen3_moe", "model.hidden_size=768", "model.num_layers=10",
            "model.num_heads=12", "model.num_kv_heads=4", "model.head_dim=64",
            "model.moe_intermediate_size=384", "model.num_experts=64", "model.top_k=2",
            "parallel.ep_size=2"],
    "dense": ["model.arch=qwen3", "model.hidden_size=1536", "model.num_layers=16",
              "model.num_heads=12", "model.num_kv_heads=4", "model.head_dim=128",
              "model.intermediate_size=4096", "parallel.ep_size=1"],
}
NEW_KEYS = ("model.activation_checkpointing", "model.attn_implementation")
GIB = 2**30


class RankSampler(threading.Thread):
    """Polls the ranks below ``root`` (processes running moe_merge.train with --local_rank):
    the latest VmHWM of each, and a snapshot of them taken by :meth:`mark`."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak, self.marks, self.stop = root, {}, {}, threading.Event()

    def ranks(self) -> dict[int, int]:
        import psutil

        out = {}
        try:
            kids = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for p in kids:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            rank = [a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")]
            if rank and "moe_merge.train" in cmd:
                out[p.pid] = int(rank[0])
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, rank in self.ranks().items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines()
                            if x.startswith("VmHWM:")), 0)
                self.peak[rank] = max(self.peak.get(rank, 0), hwm)
            time.sleep(0.2)

    def mark(self, name: str) -> None:
        self.marks[name] = dict(self.peak)


def train(tree: Path, overrides: list[str]) -> dict:
    """Launch ``tree``'s train.sh with 2 ranks; the per-rank peaks and the wall time."""
    env = {**os.environ, "NUM_RANKS": "2", "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen([str(tree / "launch" / "train.sh"), RECIPE, *overrides], cwd=tree,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    sampler = RankSampler(proc.pid)
    sampler.start()
    tail, started = [], None
    for line in proc.stdout:
        tail = [*tail[-40:], line.rstrip()]
        if started is None and "[moe_merge] run dir" in line:
            time.sleep(0.3)  # one more sample of every rank
            sampler.mark("startup")
            started = time.time() - t0
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"training failed ({rc}) in {tree}:\n" + "\n".join(tail))
    return {"startup_peak": sampler.marks.get("startup", {}), "peak": sampler.peak,
            "startup_s": started, "wall_s": time.time() - t0}


def plan(overrides: list[str]) -> dict:
    from moe_merge.config.deepspeed import build_ds_config
    from moe_merge.config.recipe import load_recipe
    from moe_merge.training import memory_plan as mp

    cfg = load_recipe(REPO / RECIPE, overrides)
    ds = build_ds_config(cfg, 2)
    lay = mp.Layout.of(cfg, 2, ds)
    shapes = mp.model_shapes(cfg, lay.persistence_threshold)  # the plan's own count
    mem = mp.plan(shapes, lay)
    return {"params": shapes.dense + shapes.expert, "expert_params": shapes.expert,
            "states": mem.model_states, "peak": mem.peak, "startup": mem.startup,
            "activations": mem.activations, "buffers": mem.buffers}


def merge_and_load(run: Path, out: Path) -> dict:
    """moe-merge merge --last 3, then transformers' from_pretrained and a validation score."""
    t0 = time.time()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "moe-merge"), "merge", str(run),
                           "--last", "3", "--out", str(out), "--quiet"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed: {proc.stderr[-2000:]}")
    merge_s = time.time() - t0
    code = ("import sys, time, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            "t = time.time()\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "n = sum(p.numel() for p in m.parameters())\n"
            "ids = torch.randint(0, m.config.vocab_size, (1, 128), generator="
            "torch.Generator().manual_seed(0))\n"
            "with torch.no_grad():\n"
            "    loss = m(input_ids=ids, labels=ids).loss.item()\n"
            "print(n, loss, time.time() - t)\n")
    load = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code, str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if load.returncode != 0:
        raise SystemExit(f"transformers load failed: {load.stderr[-2000:]}")
    n, loss, load_s = load.stdout.split()
    if math.isnan(float(loss)):
        raise SystemExit(f"the merged model's loss is NaN: {out}")
    return {"merge_s": merge_s, "load_s": float(load_s), "loaded_params": int(n),
            "random_token_loss": float(loss),
            "merged_gib": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / GIB}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="moe,dense")
    ap.add_argument("--steps", type=int, default=6, help="training steps (3 checkpoints)")
    ap.add_argument("--checkout", type=Path, default=REPO,
                    help="the repository checkout that trains (default: this one)")
    ap.add_argument("--drop", default="",
                    help="comma-separated recipe keys to leave out (for an older checkout: "
                    + ",".join(NEW_KEYS) + ")")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "large_model")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    tree = args.checkout.resolve()
    drop = tuple(k for k in args.drop.split(",") if k)
    every = args.steps // 3 * TOKENS_PER_STEP
    results = {}
    for case in args.cases.split(","):
        work = args.out / f"{case}_{tree.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        overrides = [*COMMON, *CASES[case], f"train.max_tokens={args.steps * TOKENS_PER_STEP}",
                     f"checkpoint.every_tokens={every}", f"output_dir={work}", "name=run",
                     f"data.cache_dir={args.out / 'cache'}"]
        predicted = plan(overrides)
        used = [o for o in overrides if not o.startswith(tuple(k + "=" for k in drop))]
        print(f"{case}: {predicted['params'] / 1e9:.3f}B parameters, training with {tree}",
              flush=True)
        got = train(tree, used)
        row = {"case": case, "checkout": str(tree), "plan": predicted, **got}
        rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        mem = [r for r in rows if "mem/peak_above_imports_mib" in r]  # the trainer's own, if any
        if mem:
            row["above_imports_mib"] = {"startup": mem[-1]["mem/startup_peak_above_imports_mib"],
                                        "peak": mem[-1]["mem/peak_above_imports_mib"]}
        tags = sorted((work / "run" / "checkpoints").glob("global_step*"))
        row["checkpoints"] = [t.name for t in tags]
        row["checkpoint_gib"] = sum(f.stat().st_size for t in tags for f in t.rglob("*")
                                    if f.is_file()) / GIB
        if len(tags) >= 3:
            row.update(merge_and_load(work / "run", work / "merged"))
        if not args.keep:
            shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
            shutil.rmtree(work / "merged", ignore_errors=True)
        results[case] = row
        report(row)
        saved = args.out / f"results_{tree.name}.json"  # cases run before are kept
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        saved.write_text(json.dumps({**old, **results}, indent=1))
    return 0


def report(row: dict) -> None:
    p = row["plan"]
    start = max(row["startup_peak"].values(), default=0)
    peak = max(row["peak"].values(), default=0)
    goal = 1.1 * p["states"] + 1.5 * GIB
    print(f"  plan per rank: states {p['states'] / GIB:.2f} GiB, peak {p['peak'] / GIB:.2f} GiB, "
          f"start-up {p['startup'] / GIB:.2f} GiB")
    print(f"  measured per rank (max over ranks): start-up {start / GIB:.2f} GiB "
          f"(goal <= {goal / GIB:.2f}: {'met' if start <= goal else 'NOT met'}), "
          f"peak {peak / GIB:.2f} GiB, start-up the peak: {start >= peak}")
    print(f"  wall {row['wall_s']:.0f} s (start-up {row['startup_s'] or 0:.0f} s), "
          f"{len(row['checkpoints'])} checkpoints, {row['checkpoint_gib']:.1f} GiB", flush=True)
    if "above_imports_mib" in row:
        a = row["above_imports_mib"]
        print(f"  the trainer's count above the imports: start-up {a['startup'] / 1024:.2f} GiB "
              f"({a['startup'] / 1024 / (p['startup'] / GIB):.2f}x plan), peak "
              f"{a['peak'] / 1024:.2f} GiB ({a['peak'] / 1024 / (p['peak'] / GIB):.2f}x plan)")
    if "merge_s" in row:
        print(f"  merge {row['merge_s']:.0f} s -> {row['merged_gib']:.2f} GiB, transformers load "
              f"{row['load_s']:.0f} s ({row['loaded_params'] / 1e9:.3f}B parameters, "
              f"loss on random tokens {row['random_token_loss']:.3f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
