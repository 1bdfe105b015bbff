"""Find checkpoint tags: CKPT is a run directory, a ``checkpoints/`` directory, or one tag.

What is found stays inside what was named: a run's ``checkpoints/`` that is a symlink leading
out of the run directory, or a tag that is a symlink leading out of the directory named, is
refused (name the target itself to read it). ``meta.json``, the sidecar moe_merge.train writes
beside each tag, is read as a small regular file inside its tag (at most
:data:`~moe_merge.checkpoint.safe_load.MAX_SMALL_FILE` bytes); its ``step`` must agree with the
tag's name, and a tag name's step has at most :data:`MAX_STEP_DIGITS` digits.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_merge.checkpoint.safe_load import LazyTensor, read_small, real_path
from moe_merge.errors import CheckpointError

TAG_RE = re.compile(r"^global_step([0-9]+)$")
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
MAX_STEP_DIGITS = 18  # a training step below 10**18
MAX_STEP = 10 ** MAX_STEP_DIGITS - 1


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


def show_value(value: Any) -> str:
    """A short one-line description of a value read from a checkpoint file, for an error."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:60]) + ("..." if len(value) > 60 else "")
    elif isinstance(value, LazyTensor):
        text = f"a {value.dtype} tensor of shape {list(value.shape)}"
    elif isinstance(value, (list, tuple)) and len(value) <= 8 \
            and all(v is None or isinstance(v, (bool, int, float)) for v in value):
        text = repr(value)
    elif isinstance(value, (list, tuple, dict, set)):
        text = f"a {type(value).__name__} of {len(value)} items"
    else:
        text = f"a {type(value).__name__}"
    return text[:200]


def is_int(value: Any) -> bool:
    """An integer (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def step_of_name(name: str, path: Path | str) -> int | None:
    """The step a tag named ``global_stepN`` is named for (None for other names)."""
    m = TAG_RE.match(name)
    if m is None:
        return None
    if len(m.group(1)) > MAX_STEP_DIGITS:
        raise CheckpointError(f"{path}: the tag name holds a step of {len(m.group(1))} digits, "
                              f"more than the {MAX_STEP_DIGITS} of any training step: refused")
    return int(m.group(1))


def is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(os.path.lexists(path / f) for f in MODEL_FILES)


def _inside(real: Path, top: Path) -> bool:
    return real == top or top in real.parents


def read_meta(tag_dir: Path) -> dict:
    """The tag's ``meta.json`` ({} without one): a JSON object in a small regular file."""
    f = Path(tag_dir) / "meta.json"
    if not os.path.lexists(f):
        return {}
    data = read_small(f, tag_dir)
    try:
        meta = json.loads(data)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, an integer of 5000 digits, nesting
        text = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: not valid JSON ({text})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: holds {show_value(meta)}, not a JSON object")
    return meta


def read_tag(path: Path) -> Tag:
    """One tag directory as a :class:`Tag`: its sidecar read and checked against its name."""
    path = Path(path)
    real = path.resolve()
    meta = read_meta(real)
    named = step_of_name(real.name, real)
    f = real / "meta.json"
    if "step" in meta:
        step = meta["step"]
        if not is_int(step) or not 0 <= step <= MAX_STEP:
            raise CheckpointError(f"{f}: key 'step' is {show_value(step)}, not a step number")
        if named is not None and step != named:
            raise CheckpointError(f"{real}: the tag is named for step {named}, but its meta.json "
                                  f"says step {step}: refused (a renamed or crafted checkpoint)")
    else:
        step = named if named is not None else -1  # else from the model-states file (reader)
    tokens = meta.get("tokens")
    if tokens is not None and (not is_int(tokens) or tokens < 0):
        raise CheckpointError(f"{f}: key 'tokens' is {show_value(tokens)}, not a token count")
    parent = path.parent
    run_dir = parent.parent if parent.name == "checkpoints" else None
    return Tag(real, step, run_dir.resolve() if run_dir else None, meta)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot list the directory ({e.strerror})") from None


def tag_dirs(raw: str | Path) -> list[Path]:
    """The tag directories of one CKPT argument (a run directory, its ``checkpoints/`` or one
    tag), none of them reached through a symlink that leaves the directory named."""
    path = Path(raw)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_tag_dir(path):
        return [path]
    no_tags = CheckpointError(f"{path}: no DeepSpeed checkpoint tags (global_stepN/ holding "
                              "mp_rank_00_model_states.pt) found")
    if not path.is_dir():
        raise no_tags
    top = Path(os.path.realpath(path))
    base = path
    ckpts = path / "checkpoints"
    if ckpts.is_symlink():
        real = Path(os.path.realpath(ckpts))
        if not _inside(real, top):
            raise CheckpointError(f"{ckpts}: a symlink to {real}, outside {path}: refused (to "
                                  f"read those checkpoints, name {real} itself)")
    if ckpts.is_dir():
        base = ckpts
    tags = []
    for name in _listdir(base):
        p = base / name
        if p.is_symlink():
            real = Path(os.path.realpath(p))
            if not _inside(real, top):
                if TAG_RE.match(name) or is_tag_dir(real):
                    raise CheckpointError(f"{p}: a symlink to {real}, outside {path}: refused "
                                          f"(to read that checkpoint, name {real} itself)")
                continue
        if is_tag_dir(p):
            tags.append(p)
    if not tags:
        raise no_tags
    return tags


def find_tags(inputs: list[str | Path]) -> list[Tag]:
    """All tags under the given paths, oldest first, each once."""
    found: dict[Path, Tag] = {}
    for raw in inputs:
        for p in tag_dirs(raw):
            t = read_tag(p)
            found[t.path] = t
    if not found:
        raise CheckpointError("no checkpoints given")
    tags = sorted(found.values(), key=lambda t: (t.step, t.name))
    seen: dict[int, Tag] = {}
    for t in tags:
        if t.step >= 0 and seen.setdefault(t.step, t) is not t:
            raise CheckpointError(f"two checkpoints at step {t.step}: {seen[t.step].path} and "
                                  f"{t.path}")
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
            real_path(t.run_dir / "hf", t.run_dir)  # a run's hf/ may not lead out of the run
            return t.run_dir / "hf"
    return None
