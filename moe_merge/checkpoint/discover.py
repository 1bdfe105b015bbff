"""Find checkpoint tags: CKPT is a run directory, a ``checkpoints/`` directory, or one tag."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from moe_merge.checkpoint.safe_load import CheckpointError

TAG_RE = re.compile(r"^global_step(\d+)$")
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


@dataclass(frozen=True)
class Tag:
    path: Path
    step: int
    run_dir: Path | None  # the run directory (with hf/, recipe.yaml) when there is one
    meta: dict  # the sidecar (meta.json) written by moe_merge.train, or {}

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokens(self) -> int | None:
        return self.meta.get("tokens")


def is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in MODEL_FILES)


def _meta(path: Path) -> dict:
    f = path / "meta.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e.msg})") from None


def _tag(path: Path) -> Tag:
    meta = _meta(path)
    if "step" in meta:
        step = int(meta["step"])
    elif m := TAG_RE.match(path.name):
        step = int(m.group(1))
    else:
        step = -1  # resolved from the model-states file by the reader
    parent = path.parent
    run_dir = parent.parent if parent.name == "checkpoints" else None
    return Tag(path.resolve(), step, run_dir.resolve() if run_dir else None, meta)


def find_tags(inputs: list[str | Path]) -> list[Tag]:
    """All tags under the given paths, oldest first, each once."""
    found: dict[Path, Tag] = {}
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if is_tag_dir(path):
            tags = [path]
        else:
            base = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            tags = [p for p in base.iterdir() if is_tag_dir(p)] if base.is_dir() else []
            if not tags:
                raise CheckpointError(f"{path}: no DeepSpeed checkpoint tags (global_stepN/ holding "
                                      "mp_rank_00_model_states.pt) found")
        for p in tags:
            t = _tag(p)
            found[t.path] = t
    if not found:
        raise CheckpointError("no checkpoints given")
    tags = sorted(found.values(), key=lambda t: (t.step, t.name))
    steps = [t.step for t in tags if t.step >= 0]
    if len(steps) != len(set(steps)):
        dup = next(s for s in steps if steps.count(s) > 1)
        paths = [str(t.path) for t in tags if t.step == dup]
        raise CheckpointError(f"two checkpoints at step {dup}: {paths[0]} and {paths[1]}")
    return tags


def hf_dir_for(tags: list[Tag], hf_config: str | Path | None) -> Path | None:
    """The HF config directory: --hf-config, else the newest tag's run ``hf/``."""
    if hf_config is not None:
        p = Path(hf_config)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: --hf-config must be a directory holding config.json")
        return p
    for t in reversed(tags):
        if t.run_dir is not None and (t.run_dir / "hf" / "config.json").is_file():
            return t.run_dir / "hf"
    return None
