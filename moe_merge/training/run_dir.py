"""The run directory, around DeepSpeed's own save/load_checkpoint.

``<output_dir>/<name>/`` holds recipe.yaml, ds_config.json, hf/ (the model config and tokenizer
files: what makes a run describe itself), checkpoints/ (DeepSpeed's ``global_stepN/`` tags and
``latest``, plus a JSON sidecar per tag), tb/ (TensorBoard) and metrics.jsonl. :class:`RunDir`
names those paths and keeps the tags: sidecars, keep-last-k pruning, atomic writes. Every load
handed to DeepSpeed goes through :func:`moe_merge.checkpoint.guard.check_tag` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_merge.checkpoint.guard import latest_tag
from moe_merge.errors import ConfigError

SIDECAR = "meta.json"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    """The tag DeepSpeed saves the checkpoint of ``step`` under."""
    return f"global_step{step}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every global_stepN directory in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(found)


@dataclass
class Progress:
    """Where a run is: optimizer steps taken, and the steps of batches that spike recoveries
    skipped (``stability.skip_batches``). Every checkpoint records it in its client state."""
    step: int = 0
    data_offset: int = 0

    def client_state(self) -> dict[str, Any]:
        """The client state ``engine.save_checkpoint`` stores with the tag."""
        return {"moe_merge": {"step": self.step, "data_offset": self.data_offset}}

    @classmethod
    def from_client_state(cls, client: Any, key: str, path: Path) -> Progress:
        """The progress a loaded checkpoint (``path``, named by recipe ``key``) recorded."""
        try:
            state = client["moe_merge"]
            step, offset = state["step"], state.get("data_offset", 0)
            if type(step) is not int or type(offset) is not int or step < 0 or offset < 0:
                raise TypeError
        except (TypeError, KeyError, AttributeError):
            raise ConfigError(f"key '{key}': {path}: no moe_merge step and data offset (>= 0) "
                              "in its client state") from None
        return cls(step, offset)


class RunDir:
    """One run directory: its paths, its checkpoint tags and their sidecars."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.recipe = self.root / "recipe.yaml"
        self.ds_config = self.root / "ds_config.json"
        self.hf = self.root / "hf"
        self.checkpoints = self.root / "checkpoints"
        self.tb = self.root / "tb"
        self.metrics = self.root / "metrics.jsonl"

    def tag_dir(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    def tags(self) -> list[tuple[int, Path]]:
        """(step, dir) of every checkpoint tag, oldest first."""
        return list_tags(self.checkpoints)

    def steps(self) -> list[int]:
        """Steps of the checkpoint tags, oldest first."""
        return [s for s, _ in self.tags()]

    def latest(self) -> str | None:
        """The tag ``checkpoints/latest`` names (None without it); checked by
        :func:`~moe_merge.checkpoint.guard.latest_tag`."""
        return latest_tag(self.checkpoints)

    def recovery_dir(self, spike_step: int, attempt: int) -> Path:
        """Where a pma recovery writes its merge (kept: the manifest records what was merged)."""
        return self.root / "recovery" / f"spike{spike_step}_attempt{attempt}"

    def write(self, name: str, text: str) -> Path:
        """``text`` written atomically to the file ``name`` of the run directory."""
        write_atomic(self.root / name, text)
        return self.root / name

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write(name, json.dumps(obj, indent=1))

    def describe(self, recipe_yaml: str, ds_config: dict, hf_config,
                 tokenizer_dir: Path | None) -> None:
        """recipe.yaml, ds_config.json and hf/ (``hf_config.save_pretrained`` and the tokenizer
        files), each replaced whole."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.recipe, recipe_yaml)
        write_atomic(self.ds_config, json.dumps(ds_config, indent=2))
        tmp = self.root / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_config.save_pretrained(str(tmp))
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in tokenizer_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(self.hf, ignore_errors=True)
        os.replace(tmp, self.hf)

    def write_sidecar(self, step: int, info: dict[str, Any]) -> Path:
        """The tag's ``meta.json``: its step and ``info`` (tokens, lr, phase, losses, time)."""
        path = self.tag_dir(step) / SIDECAR
        write_atomic(path, json.dumps({"step": step, **info}, indent=1, sort_keys=True) + "\n")
        return path

    def sidecar(self, step: int) -> dict[str, Any] | None:
        path = self.tag_dir(step) / SIDECAR
        return json.loads(path.read_text()) if path.exists() else None

    def prune(self, keep_last: int) -> list[Path]:
        """Delete all but the newest ``keep_last`` tags (0: keep all), never the one ``latest``
        names."""
        if keep_last <= 0:
            return []
        latest = self.latest()
        removed = []
        for _, path in self.tags()[:-keep_last]:
            if path.name == latest:
                continue
            shutil.rmtree(path)
            removed.append(path)
        return removed
