"""One warm interpreter that forks the processes the tests start (ranks, CLI commands).

A 2-rank launch through ``launch/train.sh`` is five interpreters in a chain (bash, the recipe
check, the deepspeed runner, its ``launch.py``, the ranks), four of them importing torch. This
server imports torch, DeepSpeed, transformers and moe-merge once, runs no tensor op (so no
thread pool exists when it forks), and then, per request, forks one child per rank that sets the
environment the deepspeed launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
CROSS_RANK/SIZE, LOCAL_SIZE and ``--local_rank=R`` before the arguments) and runs the module or
script as ``__main__``, exactly as ``python -m`` would. Like the launcher, when one rank fails the
others are killed, and the launch's exit code is the first failing rank's.

The tests check that this is the same launch: tests/integration/test_launch.py trains a run
through ``launch/train.sh`` and the deepspeed launcher and compares it, loss for loss and byte
for byte, with the same run started here.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
  request: {"module" | "script": str, "argv": [str], "ranks": int (0: one plain process),
            "env": {str: str}, "cwd": str, "stdout": path, "stderr": path, "port": int,
            "timeout": seconds}
  reply:   {"code": int, "timed_out": bool}
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback


def warm_up() -> None:
    """Import what the launched programs import (no tensor op runs here)."""
    import deepspeed  # noqa: F401, I001 (the launched programs' import order, Muon last)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (  # noqa: F401
        LlamaForCausalLM,
        MixtralForCausalLM,
        Qwen3ForCausalLM,
        Qwen3MoeForCausalLM,
    )

    # DeepSpeed's ZeRO optimizer check imports Muon, whose torch.compile decorators import inductor
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401

    # not the entry points themselves (moe_merge.train, moe_merge.cli): they run as __main__
    import moe_merge.config.recipe  # noqa: F401
    import moe_merge.evals.loss  # noqa: F401
    import moe_merge.merge.merger  # noqa: F401
    import moe_merge.training.trainer  # noqa: F401
    from moe_merge.training.ops import cache_cpu_info

    cache_cpu_info()  # FusedAdam asks py-cpuinfo at every load: answered once, for all forks
    import cpuinfo

    cpuinfo.get_cpu_info()

    assert not {"moe_merge.train", "moe_merge.cli", "moe_merge.__main__"} & set(sys.modules)


def child(req: dict, rank: int | None) -> None:
    """In the forked child: become the launched process and never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        env = dict(req["env"])
        argv = list(req["argv"])
        if rank is not None:  # what deepspeed/launcher/launch.py sets for each local rank
            n = req["ranks"]
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                       LOCAL_SIZE=str(n), CROSS_RANK="0", CROSS_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(req["port"]))
            argv.insert(0, f"--local_rank={rank}")  # where launch.py puts it: before the args
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if "module" in req:
                sys.path[0] = os.getcwd()  # as ``python -m`` does
                sys.argv = [req["module"], *argv]
                runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [req["script"], *argv]
                sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
                runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve_one(req: dict) -> dict:
    ranks = req.get("ranks", 0)
    pids = []
    for rank in (range(ranks) if ranks else [None]):
        pid = os.fork()
        if pid == 0:
            child(req, rank)
        pids.append(pid)
    deadline = time.monotonic() + req.get("timeout", 600)
    codes: dict[int, int] = {}
    first_failure = None
    timed_out = False
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                timed_out = True
                _kill([p for p in pids if p not in codes])
            time.sleep(0.02)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and first_failure is None:
            first_failure = codes[pid]
            _kill([p for p in pids if p not in codes])  # as the deepspeed launcher does
    code = first_failure if first_failure is not None else 0
    return {"code": -9 if timed_out and code == 0 else code, "timed_out": timed_out}


def _kill(pids: list[int]) -> None:
    for p in pids:
        try:
            os.killpg(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    warm_up()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the server go to its stderr, not into the replies
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        replies.write(json.dumps(serve_one(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
