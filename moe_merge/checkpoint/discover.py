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
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moe_merge.checkpoint.guard import latest_tag
from moe_merge.checkpoint.safe_load import LazyTensor, read_small, real_path
from moe_merge.errors import CheckpointError, IncompleteCheckpoint

TAG_RE = re.compile(r"^global_step([0-9]+)$")
# checkpoint folders: the transformers Trainer's checkpoint-N, Accelerate's checkpoint_K
FOLDER_RE = re.compile(r"^checkpoint[-_]([0-9]+)$")
TRAINER_STATE = "trainer_state.json"  # the transformers Trainer's, in each checkpoint folder
WRITERS = ("moe-merge", "transformers Trainer", "Accelerate", "DeepSpeed")
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
MAX_STEP_DIGITS = 18  # a training step below 10**18
MAX_STEP = 10 ** MAX_STEP_DIGITS - 1


@dataclass(frozen=True)
class Tag:
    path: Path
    step: int
    run_dir: Path | None  # the run directory (with hf/, recipe.yaml) when there is one
    meta: dict  # the sidecar (meta.json) written by moe_merge.train, or {}
    folder: Path | None = None  # another trainer's checkpoint folder holding the tag
    writer: str = "DeepSpeed"  # which program wrote it: one of WRITERS

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


def read_json_object(f: Path, root: Path) -> dict:
    """A JSON object in a small regular file ``f`` inside ``root``."""
    data = read_small(f, root)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, an integer of 5000 digits, nesting
        text = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: not valid JSON ({text})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f}: holds {show_value(obj)}, not a JSON object")
    return obj


def read_meta(tag_dir: Path) -> dict:
    """The tag's ``meta.json`` ({} without one): a JSON object in a small regular file."""
    f = Path(tag_dir) / "meta.json"
    if not os.path.lexists(f):
        return {}
    return read_json_object(f, tag_dir)


def read_tag(path: Path, folder: Path | None = None) -> Tag:
    """One tag directory as a :class:`Tag`: its sidecar read and checked against its name; in
    a transformers Trainer checkpoint folder, its ``trainer_state.json`` too."""
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
    if folder is None and _is_folder(parent):
        folder = parent
    writer = "DeepSpeed"
    if meta or (run_dir is not None and (run_dir / "recipe.yaml").is_file()):
        writer = "moe-merge"
    elif folder is not None and os.path.lexists(folder / TRAINER_STATE):
        writer = "transformers Trainer"
        state = trainer_state(folder)
        if named is not None and state.get("global_step") not in (None, named):
            raise CheckpointError(f"{folder / TRAINER_STATE}: key 'global_step' is "
                                  f"{show_value(state['global_step'])}, but the tag is "
                                  f"{real.name}: refused (a renamed or mixed-up checkpoint)")
        seen = state.get("num_input_tokens_seen")
        if tokens is None and is_int(seen) and seen > 0:
            tokens = seen
            meta = {**meta, "tokens": seen}
    elif folder is not None and (real.name == "pytorch_model"
                                 or any(n.startswith("random_states_")
                                        for n in _listdir(folder))):
        writer = "Accelerate"
    return Tag(real, step, run_dir.resolve() if run_dir else None, meta,
               folder.resolve() if folder is not None else None, writer)


def trainer_state(folder: Path) -> dict:
    """A transformers Trainer's ``trainer_state.json`` (a JSON object in a small regular file
    of ``folder``)."""
    return read_json_object(Path(folder) / TRAINER_STATE, folder)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot list the directory ({e.strerror})") from None


@dataclass(frozen=True)
class Found:
    """A tag directory found under a CKPT argument."""

    path: Path
    explicit: bool  # named by the user: the tag itself, or a checkpoint folder holding only it
    folder: Path | None  # another trainer's checkpoint folder holding it (checkpoint-N/)


def _child_tags(base: Path, top: Path, named: Path) -> list[Path]:
    """The tag directories directly inside ``base``; a symlink among them that leads out of
    ``top`` (the real path of the argument ``named``) is refused."""
    tags = []
    for name in _listdir(base):
        p = base / name
        if p.is_symlink():
            real = Path(os.path.realpath(p))
            if not _inside(real, top):
                if TAG_RE.match(name) or is_tag_dir(real):
                    raise CheckpointError(f"{p}: a symlink to {real}, outside {named}: refused "
                                          f"(to read that checkpoint, name {real} itself)")
                continue
        if is_tag_dir(p):
            tags.append(p)
    return tags


def _trainer_folders(base: Path, top: Path) -> list[Path]:
    """The checkpoint folders of another trainer directly inside ``base``: directories
    (not symlinks leading out of ``top``) named as the transformers Trainer
    (``checkpoint-N``) or Accelerate (``checkpoint_K``) name them, or holding a
    ``trainer_state.json``."""
    out = []
    for name in _listdir(base):
        p = base / name
        if p.is_symlink() and not _inside(Path(os.path.realpath(p)), top):
            continue
        if p.is_dir() and (FOLDER_RE.match(name) or os.path.lexists(p / TRAINER_STATE)):
            out.append(p)
    return out


def scan(raw: str | Path) -> list[Found]:
    """The tag directories of one CKPT argument, none of them reached through a symlink that
    leaves the directory named. CKPT is a tag; a directory of tags (a DeepSpeed save
    directory, a checkpoint folder of the transformers Trainer or of Accelerate); a run
    directory whose ``checkpoints/`` holds them; or a directory of checkpoint folders (a
    Trainer ``output_dir``, an Accelerate ``project_dir`` with its ``checkpoints/``). A
    Trainer checkpoint folder without a DeepSpeed tag (``save_only_model``) is refused."""
    path = Path(raw)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_tag_dir(path):
        return [Found(path, True, None)]
    no_tags = CheckpointError(f"{path}: no DeepSpeed checkpoint tags (global_stepN/ holding "
                              "mp_rank_00_model_states.pt, or checkpoint folders of the "
                              "transformers Trainer or Accelerate holding them) found")
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
    tags = _child_tags(base, top, path)
    if tags:
        alone = base == path and len(tags) == 1
        return [Found(t, alone, path if _is_folder(path) else None) for t in tags]
    found = []
    for folder in _trainer_folders(base, top):
        inner = _child_tags(folder, top, path)
        if not inner and os.path.lexists(folder / TRAINER_STATE):
            raise CheckpointError(f"{folder}: a transformers Trainer checkpoint without its "
                                  "DeepSpeed tag (global_stepN/; saved with save_only_model?): "
                                  "nothing to merge from it")
        found += [Found(t, False, folder) for t in inner]
    if not found:
        raise no_tags
    return found


def _is_folder(path: Path) -> bool:
    """A checkpoint folder of another trainer: ``checkpoint-N``/``checkpoint_K`` or one with
    a ``trainer_state.json``."""
    return bool(FOLDER_RE.match(path.name)) or os.path.lexists(path / TRAINER_STATE)


def tag_dirs(raw: str | Path) -> list[Path]:
    """The tag directories of one CKPT argument (see :func:`scan`)."""
    return [f.path for f in scan(raw)]


def unfinished(tag_dir: Path, folder: Path | None) -> tuple[str | None, int | None]:
    """Why a tag found by listing a directory is not (yet) a whole checkpoint (None if it is),
    and the step its model states store when they were read.

    DeepSpeed writes ``latest`` beside the tags after a tag's files: a tag newer than the one
    ``latest`` names is still being written, and so is a tag in another trainer's checkpoint
    folder that has no ``latest`` yet. A tag that misses one of its files (as its model states
    describe them) is not whole either."""
    latest = latest_tag(tag_dir.parent)
    if latest is None:
        if folder is not None:
            return f"no {folder / 'latest'} yet: still being written", None
    elif latest != tag_dir.name:
        step, newest = step_of_name(tag_dir.name, tag_dir), step_of_name(latest, tag_dir.parent)
        if step is not None and newest is not None and step > newest:
            return (f"newer than the tag {tag_dir.parent / 'latest'} names ({latest}): still "
                    "being written"), None
    from moe_merge.checkpoint.reader import DSCheckpoint

    try:
        r = DSCheckpoint(tag_dir, verify=False)
    except IncompleteCheckpoint as e:
        return str(e), None
    except CheckpointError:
        return None, None  # refused when it is read, if it is chosen
    try:
        return None, r.step
    finally:
        r.close()


def find_tags(inputs: list[str | Path], warn: Callable[[str], None] | None = None) -> list[Tag]:
    """All tags under the given paths, oldest first, each once. A tag found by listing a
    directory that is not whole (:func:`unfinished`) is left out with a warning; a tag named
    itself is read as it is. Steps stored only in the model states (Accelerate's
    ``pytorch_model`` tags) are read from there."""
    warn = warn or (lambda s: print(s, file=sys.stderr, flush=True))
    found: dict[Path, Tag] = {}
    for raw in inputs:
        for f in scan(raw):
            stored = None
            if not f.explicit:
                why, stored = unfinished(f.path, f.folder)
                if why:
                    warn(f"warning: skipped {f.path}: {why}")
                    continue
            t = read_tag(f.path, f.folder)
            if t.step < 0:
                t = replace(t, step=stored if stored is not None else stored_step(t.path))
            found[t.path] = t
    if not found:
        raise CheckpointError(f"no whole checkpoints in {', '.join(map(str, inputs))}"
                              if inputs else "no checkpoints given")
    tags = sorted(found.values(), key=lambda t: (t.step, t.name))
    seen: dict[int, Tag] = {}
    for t in tags:
        if seen.setdefault(t.step, t) is not t:
            raise CheckpointError(f"two checkpoints at step {t.step}: {seen[t.step].path} and "
                                  f"{t.path}")
    return tags


def stored_step(tag_dir: Path) -> int:
    """The step the tag's model states store (``global_steps``)."""
    from moe_merge.checkpoint.reader import DSCheckpoint

    r = DSCheckpoint(tag_dir, verify=False)
    try:
        return r.step
    finally:
        r.close()


def hf_dir_for(tags: list[Tag], hf_config: str | Path | None) -> Path | None:
    """The HF config directory: --hf-config, else the newest tag's run ``hf/``, else the
    newest checkpoint folder of another trainer holding a ``config.json`` (the transformers
    Trainer saves one in each), else the directory above Accelerate's ``checkpoints/``."""
    if hf_config is not None:
        p = Path(hf_config)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: --hf-config must be a directory holding config.json")
        return p
    for t in reversed(tags):
        if t.run_dir is not None and (t.run_dir / "hf" / "config.json").is_file():
            real_path(t.run_dir / "hf", t.run_dir)  # a run's hf/ may not lead out of the run
            return t.run_dir / "hf"
        if t.folder is None:
            continue
        above = t.folder.parent.parent if t.folder.parent.name == "checkpoints" else None
        for d in (t.folder, above):
            if d is not None and os.path.lexists(d / "config.json"):
                real_path(d / "config.json", d)  # a regular entry, not a link out
                return d
    return None
