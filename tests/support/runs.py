"""The test runs: tiny recipes, the runs shared by the tests, and the launches that train them."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    **{f"moe_z{z}": (MOE_RECIPE, [*TINY_MOE, *DECAY, f"parallel.zero_stage={z}"])
       for z in (1, 2, 3)},
    **{f"dense_z{z}": (DENSE_RECIPE, [*TINY_DENSE, *DECAY, f"parallel.zero_stage={z}"])
       for z in (1, 2, 3)},
    "mixtral_z2": (MOE_RECIPE, [*TINY_MOE, "model.arch=mixtral"]),
    "moe_ep1_z2": (MOE_RECIPE, [*TINY_MOE, "parallel.ep_size=1"]),
    "moe_bf16_z2": (MOE_RECIPE, [*TINY_MOE, "parallel.precision=bf16"]),
    "llama_z0": (DENSE_RECIPE, [*TINY_DENSE, "model.arch=llama", "parallel.zero_stage=0"]),
    # moe_z2 with the live PMA monitor: merges of the latest 3 checkpoints at steps 6 and 8
    **{f"moe_pma_z{z}": (MOE_RECIPE, [*TINY_MOE, *DECAY, f"parallel.zero_stage={z}",
                                     "pma_monitor.enabled=true", "pma_monitor.n=3"])
       for z in (2, 3)},
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


def launch_foreign(out: Path, trainer: str, zero: int, *extra: str) -> Path:
    """A run of tests/support/other_trainers.py: the transformers Trainer (``hf``) or an
    Accelerate loop (``accelerate``) with DeepSpeed on 2 CPU ranks, writing their layouts."""
    before = _shm_segments()
    proc = run_cli([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(_free_port()), str(Path(__file__).with_name("other_trainers.py")),
                    "--trainer", trainer, "--zero", str(zero), "--out", str(out), *extra])
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{trainer} launch failed ({proc.returncode}):\n{tail}")
    assert not _shm_segments() - before, "launch left shared memory behind"
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command as a test would from a shell, with DS_ACCELERATOR=cpu.

    moe-merge commands (``moe-merge``, ``python -m moe_merge[.cli|.train]``) and deepspeed
    launches of a module or script are forked from the warm interpreter of support/zygote.py
    (no interpreter start-up, no launcher chain); anything else runs as a subprocess.
    ``MOE_MERGE_TEST_ZYGOTE=0`` runs everything as subprocesses."""
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    routed = _route([str(a) for a in args])
    if routed is not None and os.environ.get("MOE_MERGE_TEST_ZYGOTE", "1") != "0":
        return zygote().run(args, env=full_env, cwd=cwd, timeout=timeout, **routed)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, stdin=subprocess.DEVNULL)


def _route(args: list[str]) -> dict | None:
    """What the zygote should run for ``args`` (None: not a command it runs)."""
    prog = Path(args[0]).name
    if args[0] == PY and args[1:2] == ["-m"] and args[2] in ("moe_merge", "moe_merge.cli",
                                                             "moe_merge.train"):
        return {"module": args[2], "argv": args[3:], "ranks": 0}
    if prog == "moe-merge":
        return {"module": "moe_merge", "argv": args[1:], "ranks": 0}
    if prog == "deepspeed" and args[1:2] == ["--num_gpus"] and args[3:4] == ["--master_port"]:
        ranks, port, rest = int(args[2]), int(args[4]), args[5:]
        if rest[:1] == ["--module"]:
            return {"module": rest[1], "argv": rest[2:], "ranks": ranks, "port": port}
        return {"script": rest[0], "argv": rest[1:], "ranks": ranks, "port": port}
    return None


def launch(recipe: str, overrides: list[str], timeout: int = 600,
           launcher: bool = False) -> subprocess.CompletedProcess:
    """Train ``recipe`` with 2 CPU ranks (gloo), as ``launch/train.sh`` does.

    The ranks are forked from the warm interpreter (see :func:`run_cli`); ``launcher=True`` goes
    through ``launch/train.sh`` and the deepspeed launcher instead (the same run: see
    tests/integration/test_launch.py). Also checks that the launch left no DeepSpeed
    shared-memory segment behind in /dev/shm."""
    before = _shm_segments()
    if launcher:
        cmd = ["bash", str(REPO / "launch" / "train.sh"), recipe, *overrides]
    else:
        from moe_merge.config.recipe import load_recipe

        ranks = load_recipe(recipe, overrides).parallel.world_size or 2
        cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), "--module", "moe_merge.train", recipe, *overrides]
    proc = run_cli(cmd, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"launch failed ({proc.returncode}):\n{tail}")
    left = _shm_segments() - before
    assert not left, f"launch left shared memory behind: {sorted(left)}"
    return proc


class Zygote:
    """Client of support/zygote.py: one server per test session, started on first use."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.work = Path(tempfile.mkdtemp(prefix="moe_merge_zygote_"))
        self.count = 0

    def _start(self) -> None:
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        log = open(self.work / "server.log", "w")
        self.proc = subprocess.Popen([PY, str(Path(__file__).with_name("zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env, cwd=REPO)
        ready = self.proc.stdout.readline()
        if not ready:
            log = (self.work / "server.log").read_text()
            raise RuntimeError(f"the zygote did not start: {log[-2000:]}")
        atexit.register(self.close)

    def run(self, args, *, env: dict, cwd: Path, timeout: int, module: str | None = None,
            script: str | None = None, argv: list[str], ranks: int = 0,
            port: int | None = None) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.count += 1
        out, err = self.work / f"{self.count}.out", self.work / f"{self.count}.err"
        req = {"argv": argv, "ranks": ranks, "env": env, "cwd": str(cwd), "stdout": str(out),
               "stderr": str(err), "port": port or _free_port(), "timeout": timeout}
        req["module" if module else "script"] = module or script
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the zygote died: {(self.work / 'server.log').read_text()[-2000:]}")
        reply = json.loads(reply)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
        return subprocess.CompletedProcess(args, reply["code"], stdout, stderr)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)


_ZYGOTE: Zygote | None = None


def zygote() -> Zygote:
    global _ZYGOTE
    if _ZYGOTE is None:
        _ZYGOTE = Zygote()
    return _ZYGOTE


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


def forked_run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """``moe_merge.training.launch.run_logged`` with the ranks forked from the zygote."""
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
    proc = run_cli(cmd, env=env, timeout=1200)
    with open(log, "a") as f:
        f.write(proc.stdout + proc.stderr)
    return proc.returncode


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """``moe-merge ARGS`` run in this process (what a study does besides its launches: merges,
    evaluations, reports), output captured."""
    import contextlib
    import io

    from moe_merge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["moe-merge", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())
