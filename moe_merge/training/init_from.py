"""``train.init_from``: start a run at step 0 from merged (or any saved) weights.

:func:`resolve_init` reads ``train.init_from`` (an HF merge output, a DeepSpeed merge output or a
plain checkpoint) and checks the optimizer-state policy against what it holds;
:func:`reset_optimizer_state` clears the moments a policy does not keep.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moe_merge.errors import ConfigError


@dataclass
class InitSource:
    path: Path
    format: str  # "hf" or "deepspeed"
    load_dir: Path | None = None  # deepspeed: the directory holding the tag
    tag: str | None = None
    manifest: dict | None = None  # merge_manifest.json of a merge output

    @property
    def merged(self) -> bool:
        return self.manifest is not None

    def record(self, policy: str) -> dict:
        m = self.manifest
        out = {"init_from": str(self.path.resolve()), "format": self.format, "tag": self.tag,
               "optimizer": policy, "merged": self.merged}
        if m is not None:
            out["merge"] = {"strategy": m.get("strategy"), "alpha": m.get("alpha"),
                            "steps": [i.get("step") for i in m.get("inputs", [])],
                            "weights": m.get("weights"),
                            "optimizer_state": m.get("optimizer_state"),
                            "inputs": [i.get("path") for i in m.get("inputs", [])]}
        return out


def _manifest(d: Path) -> dict | None:
    from moe_merge.checkpoint.safe_load import read_small
    from moe_merge.errors import CheckpointError

    f = d / "merge_manifest.json"
    if not os.path.lexists(f):
        return None
    try:
        m = json.loads(read_small(f, d))
    except CheckpointError as e:
        raise ConfigError(f"key 'train.init_from': {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise ConfigError(f"key 'train.init_from': {f}: not valid JSON ({why})") from None
    if not isinstance(m, dict) or not isinstance(m.get("inputs", []), list) \
            or not all(isinstance(i, dict) for i in m.get("inputs", [])):
        raise ConfigError(f"key 'train.init_from': {f}: not a merge manifest (an object with a "
                          "list of inputs)")
    return m


def resolve_init(path: str | Path, policy: str) -> InitSource:
    """What ``train.init_from`` points at, checked against ``train.init_optimizer``."""
    from moe_merge.checkpoint.discover import is_tag_dir
    from moe_merge.checkpoint.guard import latest_tag
    from moe_merge.errors import CheckpointError

    p = Path(path)
    key = "key 'train.init_from'"
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        if policy != "reset":
            raise ConfigError(f"key 'train.init_optimizer': {policy} needs optimizer state, and "
                              f"{p} is an HF model (weights only): use reset, or a merge written "
                              "with --format deepspeed")
        return InitSource(p, "hf", manifest=_manifest(p))
    if is_tag_dir(p):
        src = InitSource(p, "deepspeed", p.parent, p.name, _manifest(p.parent))
    else:
        base = p / "checkpoints" if (p / "checkpoints" / "latest").is_file() else p
        latest = base / "latest"
        if not latest.is_file():
            raise ConfigError(f"{key}: {p} is neither an HF model directory (config.json and "
                              "*.safetensors) nor a DeepSpeed checkpoint (a global_stepN/ "
                              "directory, or a directory or run with a 'latest' file)")
        try:
            tag = latest_tag(base)
        except CheckpointError as e:
            raise ConfigError(f"{key}: {e}") from None
        if not is_tag_dir(base / tag):
            raise ConfigError(f"{key}: {latest} names {tag}, which is not a checkpoint in {base}")
        src = InitSource(p, "deepspeed", base, tag, _manifest(base))
    held = src.manifest.get("optimizer_state") if src.manifest else "latest"
    if policy != "reset" and policy != held:
        what = (f"was merged with --optimizer-state {held}" if src.merged
                else "is a plain checkpoint (its moments are its own: 'latest')")
        raise ConfigError(f"key 'train.init_optimizer': {policy}, but {p} {what}; set "
                          f"train.init_optimizer={held} or reset, or merge again with "
                          f"--format deepspeed --optimizer-state {policy}")
    return src


def reset_optimizer_state(optimizer) -> int:
    """Zero Adam's moments and step counts in place (a fresh optimizer's state), through
    DeepSpeed's wrappers down to the torch optimizer. Returns the number of states reset."""
    import torch

    count, seen, opt = 0, set(), optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            for state in opt.state.values():
                for k, v in list(state.items()):
                    if torch.is_tensor(v):
                        v.zero_()
                    elif k == "step":
                        state[k] = 0
                count += 1
        opt = getattr(opt, "optimizer", None)
    return count
