"""Start a training run through the deepspeed launcher from Python (what launch/train.sh does):
one rank per GPU with nccl, or ``parallel.world_size`` (default 2) CPU ranks with gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from moe_merge.errors import LaunchError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(recipe: str | Path, overrides: list[str], log: Path, world_size: int = 0,
          ok_codes: tuple[int, ...] | None = None):
    """Run ``moe_merge.train RECIPE overrides`` on this node; its output goes to ``log``.
    Returns the wall time in seconds; raises :class:`LaunchError` if it fails. With
    ``ok_codes`` (exit codes that are outcomes, e.g. 3: a loss spike the run could not get
    past), returns (seconds, exit code) and raises only for other codes."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = dict(os.environ)
    if gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    n = world_size or gpus or 2
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(n),
           "--master_port", str(_free_port()), "--module", "moe_merge.train", str(recipe),
           *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    code = run_logged(cmd, log, env)
    if code not in (ok_codes or (0,)):
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])[-400:]
        raise LaunchError(f"training launch failed (exit {code}), log {log}: {tail}")
    seconds = time.perf_counter() - t0
    return seconds if ok_codes is None else (seconds, code)


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run ``cmd`` (the launcher) with its output in ``log``; its exit code."""
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL).returncode
