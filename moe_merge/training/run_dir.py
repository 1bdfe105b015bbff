"""Run-directory bookkeeping around DeepSpeed's own save/load_checkpoint.

DeepSpeed writes the checkpoint itself (``checkpoints/global_stepN/`` + ``latest``); this module
adds the per-tag JSON sidecar, keep-last-k pruning, and the files that make a run describe itself.
Every load handed to DeepSpeed goes through :func:`moe_merge.checkpoint.guard.check_tag` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from moe_merge.checkpoint.guard import latest_tag

SIDECAR = "meta.json"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_sidecar(ckpt_dir: Path, step: int, info: dict[str, Any]) -> Path:
    path = ckpt_dir / tag_for(step) / SIDECAR
    write_atomic(path, json.dumps({"step": step, **info}, indent=1, sort_keys=True) + "\n")
    return path


def read_sidecar(tag_dir: Path) -> dict[str, Any] | None:
    path = Path(tag_dir) / SIDECAR
    return json.loads(path.read_text()) if path.exists() else None


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every global_stepN directory, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found)


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` tags (never the one ``latest`` names)."""
    if keep_last <= 0:
        return []
    latest = latest_tag(ckpt_dir)
    tags = list_tags(ckpt_dir)
    removed = []
    for _, path in tags[:-keep_last]:
        if path.name == latest:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def step_of_tag_dir(tag_dir: Path) -> int:
    """The step a global_stepN directory was saved at (sidecar first, then its name)."""
    meta = read_sidecar(tag_dir)
    if meta is not None:
        return int(meta["step"])
    m = TAG_RE.match(Path(tag_dir).name)
    if m is None:
        raise ValueError(f"{tag_dir}: not a global_stepN checkpoint directory")
    return int(m.group(1))


