"""Build DeepSpeed's JIT-compiled CPU ops once, before any ranks start.

DeepSpeed compiles its CPU ops (the shared-memory comm op that every CPU process group loads,
and FusedAdam) on first use, in every rank at once, guarded by a lock file in torch's extension
cache. A compile that is killed (OOM, Ctrl-C, CI time-out) leaves that lock behind and every
later launch waits on it forever. ``python -m moe_merge.training.ops`` builds the ops in one
process and clears a lock that is older than any compile takes.

Run by launch/setup_env.sh on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
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


def cpu_key(version: str = "", proc: Path = Path("/proc/cpuinfo")) -> str | None:
    """What py-cpuinfo's answer depends on here: its version, the machine and the CPU's identity
    and flags in /proc/cpuinfo (not its clock), hashed; None where there is no /proc/cpuinfo."""
    try:
        text = proc.read_text()
    except OSError:
        return None
    fields = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features",
              "CPU implementer", "CPU part", "isa")
    lines = sorted({line.strip() for line in text.splitlines()
                    if line.split(":", 1)[0].strip() in fields})
    if not any(line.split(":", 1)[0].strip() in ("flags", "Features", "isa") for line in lines):
        return None  # py-cpuinfo would take the flags from elsewhere: nothing here tells CPUs apart
    text = "\n".join([version, platform.machine(), *lines])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _valid_cpu_info(info) -> bool:
    """The fields DeepSpeed reads are there, with their types, and the rest is JSON."""
    try:
        json.dumps(info)
    except (TypeError, ValueError):
        return False
    return (isinstance(info, dict) and isinstance(info.get("arch"), str)
            and isinstance(info.get("flags"), list)
            and all(isinstance(f, str) for f in info["flags"]))


def _read_cpu_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if _valid_cpu_info(info) else None


def cache_cpu_info(cache_dir: Path | None = None) -> None:
    """Answer py-cpuinfo's ``get_cpu_info()`` from a cache in this process, and across launches
    from a file beside the compiled ops keyed by the CPU's identity and flags.

    DeepSpeed's CPU op builders ask it for the ``-march`` and SIMD flags every time an op is
    loaded, and each answer starts a probe process: about 1.2 s per call on 2 cores, twice for
    FusedAdam, in every rank. The file holds py-cpuinfo's own answer for a CPU with these flags
    (a different CPU has another key); an unreadable or malformed one is probed again.
    """
    try:
        import cpuinfo
    except ImportError:
        return
    if getattr(cpuinfo.get_cpu_info, "moe_merge_cached", False):
        return
    probe = cpuinfo.get_cpu_info
    key = cpu_key(getattr(cpuinfo, "CPUINFO_VERSION_STRING", ""))
    if cache_dir is None:
        from torch.utils.cpp_extension import get_default_build_root

        cache_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    path = cache_dir / f"cpuinfo-{key}.json" if key else None

    @functools.cache
    def answer() -> dict:
        info = _read_cpu_info(path) if path is not None else None
        if info is None:
            info = probe()
            if path is not None and _valid_cpu_info(info):
                _write_atomically(path, json.dumps(info))
        return info

    def get_cpu_info() -> dict:
        return copy.deepcopy(answer())  # each caller its own, as from a probe

    get_cpu_info.moe_merge_cached = True
    cpuinfo.get_cpu_info = get_cpu_info


def _write_atomically(path: Path, text: str) -> None:
    """A cache file appears whole or not at all; a cache that cannot be written is skipped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        os.fchmod(fd, 0o644)  # readable by the other users of a shared cache, like the ops
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def prebuild() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    cache_cpu_info()
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
