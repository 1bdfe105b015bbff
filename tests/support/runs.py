"""The test runs: tiny recipes, the runs shared by the tests, and the launches that train them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# A model small enough that a 2-rank CPU launch trains a few steps in seconds.
TINY_MOE = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=32", "model.moe_intermediate_size=64", "model.num_experts=4",
    "data.seq_len=64", "parallel.micro_batch=2", "parallel.global_batch=4",
    "schedule.warmup_tokens=512", "checkpoint.every_tokens=512", "train.max_tokens=2048",
    "logging.log_every=1", "logging.val_every=4", "logging.val_batches=2",
    "logging.progress=false",
]
TINY_DENSE = [o for o in TINY_MOE if "expert" not in o] + ["model.intermediate_size=128"]
MOE_RECIPE = str(REPO / "tests" / "recipes" / "moe_tiny.yaml")
DENSE_RECIPE = str(REPO / "tests" / "recipes" / "dense_tiny.yaml")
DECAY = ["schedule.decay_tokens=512", "schedule.min_lr_ratio=0.1"]  # last 2 of 8 steps decay

# Runs shared by the training and the merge tests: trained once per session, on first use.
# 8 steps of 256 tokens, a checkpoint every 2 steps (global_step2 ... global_step8).
RUNS = {
    **{f"moe_z{z}": (MOE_RECIPE, [*TINY_MOE, *DECAY, f"parallel.zero_stage={z}"]) for z in (1, 2, 3)},
    **{f"dense_z{z}": (DENSE_RECIPE, [*TINY_DENSE, *DECAY, f"parallel.zero_stage={z}"])
       for z in (1, 2, 3)},
    "mixtral_z2": (MOE_RECIPE, [*TINY_MOE, "model.arch=mixtral"]),
    "moe_ep1_z2": (MOE_RECIPE, [*TINY_MOE, "parallel.ep_size=1"]),
    "moe_bf16_z2": (MOE_RECIPE, [*TINY_MOE, "parallel.precision=bf16"]),
    "llama_z0": (DENSE_RECIPE, [*TINY_DENSE, "model.arch=llama", "parallel.zero_stage=0"]),
    # moe_z2 with the live PMA monitor: merges of the latest 3 checkpoints at steps 6 and 8
    "moe_pma_z2": (MOE_RECIPE, [*TINY_MOE, *DECAY, "parallel.zero_stage=2",
                                "pma_monitor.enabled=true", "pma_monitor.n=3"]),
}


def launch_native(out: Path, zero: int, *extra: str) -> Path:
    before = _shm_segments()
    proc = run_cli([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(_free_port()), str(Path(__file__).with_name("native_moe_train.py")),
                    "--out", str(out), "--zero", str(zero), *extra])
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"native MoE launch failed ({proc.returncode}):\n{tail}")
    assert not _shm_segments() - before, "launch left shared memory behind"
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, stdin=subprocess.DEVNULL)


def launch(recipe: str, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Train through launch/train.sh, i.e. the deepspeed launcher with 2 CPU ranks (gloo).

    Also checks that the launch left no DeepSpeed shared-memory segment behind in /dev/shm.
    """
    before = _shm_segments()
    proc = run_cli(["bash", str(REPO / "launch" / "train.sh"), recipe, *overrides],
                   timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"launch failed ({proc.returncode}):\n{tail}")
    left = _shm_segments() - before
    assert not left, f"launch left shared memory behind: {sorted(left)}"
    return proc


def _shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def tb_tags(tb_dir: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, histos = set(), set()
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        histos |= set(acc.Tags()["histograms"])
    return scalars, histos
