"""Helpers of the merge tests: the CLI, tags, reading outputs, copies of tags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from moe_merge.checkpoint.reader import DSCheckpoint
from support.runs import PY, run_cli


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli([PY, "-m", "moe_merge", *map(str, args)], timeout=timeout)


def tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"global_step{step}"


def read_all(tag_dir: Path, **kw) -> dict[str, torch.Tensor]:
    c = DSCheckpoint(tag_dir, **kw)
    return {n: c.read(n) for n in c.params}


def safetensors_out(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def copy_tag(src: Path, dst_root: Path, name: str) -> Path:
    """A copy of the tag ``src`` as ``dst_root/name`` (global_stepN): its meta.json dropped and
    the step its model states store set to N, as a checkpoint saved at step N would hold."""
    dst = dst_root / name
    shutil.copytree(src, dst)
    (dst / "meta.json").unlink(missing_ok=True)  # the step then comes from the directory name
    step = int(name[len("global_step"):])
    for f in sorted(dst.glob("*model_states.pt")):
        if f.name.startswith(("mp_rank_", "zero_pp_rank_")):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            if sd.get("global_steps") != step:
                sd["global_steps"] = step
                torch.save(sd, f)
    return dst
