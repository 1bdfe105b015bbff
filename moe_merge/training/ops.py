"""Build DeepSpeed's JIT-compiled CPU ops once, before any ranks start.

DeepSpeed compiles its CPU ops (the shared-memory comm op that every CPU process group loads,
and FusedAdam) on first use, in every rank at once, guarded by a lock file in torch's extension
cache. A compile that is killed (OOM, Ctrl-C, CI time-out) leaves that lock behind and every
later launch waits on it forever. ``python -m moe_merge.training.ops`` builds the ops in one
process and clears a lock that is older than any compile takes.

Run by launch/setup_env.sh on machines without a GPU.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
STALE_LOCK_S = 20 * 60  # a compile here takes ~3 min; a lock this old has no owner


def build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def clear_stale_lock(name: str, now: float | None = None) -> bool:
    lock = build_dir(name) / "lock"
    try:
        age = (now or time.time()) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    print(f"[ops] removing stale build lock {lock} ({age / 60:.0f} min old, left by a killed "
          "compile)", file=sys.stderr)
    lock.unlink(missing_ok=True)
    return True


def prebuild() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for op in CPU_OPS:
        builder = acc.create_op_builder(op)
        if builder is None:
            continue
        clear_stale_lock(builder.NAME)
        t0 = time.time()
        builder.load(verbose=False)
        if time.time() - t0 > 10:
            print(f"[ops] compiled {builder.NAME} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    prebuild()
