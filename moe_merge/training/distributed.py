"""Process-group start-up shared by the trainer and the benchmarks."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch


def dist_env() -> None:
    """Let a plain ``python -m moe_merge.train`` run as a one-rank job."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 16  # bytes: larger blocks are mapped and unmapped whole
TRIM_THRESHOLD = 1 << 20


def compact_host_allocator() -> bool:
    """Fix glibc's mmap threshold, so that freed large host blocks go back to the system.

    glibc raises its mmap threshold up to 32 MiB after the first large blocks are freed; from
    then on the transient buffers of ZeRO-3's gathers and reductions come from the heap and stay
    resident after they are freed. On CPU this more than doubled a ZeRO-3 rank's resident set
    (121M dense model, 8 ranks: peak 1,780 -> 865 MiB). ``MOE_MERGE_HOST_MALLOC=default``
    keeps glibc's own behaviour. True if glibc took the setting.
    """
    if os.environ.get("MOE_MERGE_HOST_MALLOC", "compact") != "compact":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def shm_segment(rank: int) -> Path:
    """The POSIX shared-memory segment DeepSpeed's CPU comm op creates for ``rank``.

    ``deepspeed/ops/csrc/cpu/comm/shm.cpp`` names it
    ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`` and never unlinks
    it, so every single-node CPU launch would leave ~66 MiB per rank in /dev/shm (RAM).
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    return Path("/dev/shm") / name


def init_distributed(on_cpu: bool) -> None:
    """``deepspeed.init_distributed`` (gloo on CPU), then drop the names of the shm segments.

    Once every rank has mapped every other rank's segment (done inside init, and a barrier
    makes sure all ranks got there), the names are no longer needed: unlinking them now lets
    the kernel free the memory when the processes exit, however they exit.
    """
    import deepspeed

    dist_env()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    if on_cpu:
        torch.distributed.barrier()
        shm_segment(torch.distributed.get_rank()).unlink(missing_ok=True)
