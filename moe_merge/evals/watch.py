"""``moe-merge watch``: follow a training run from beside it and score the merge of its latest
checkpoints each time one lands.

The watcher reads only what the run writes to disk, so it costs the training ranks nothing; it
runs in another process, on another machine that sees the run directory, or after the run.
For each whole checkpoint (a tag still being written is never read: see
:func:`~moe_merge.checkpoint.discover.find_tags`), oldest first, it merges the window that ends
at that checkpoint (the ``merge`` options: ``--last N --every K --strategy ...``), scores it on
the run's validation batches (or ``--data``), and the newest checkpoint alone unless
``--no-latest``, and, with ``--tasks``, on lm-eval-harness tasks; then appends one JSON line to
``OUT/watch.jsonl`` and the same numbers to TensorBoard (``OUT/tb``: ``pma/val_loss``,
``latest/val_loss``, ``pma/val_gap``, ``pma/<task>/<metric>``).

``watch.jsonl`` is the watcher's memory: started again, it skips the checkpoints it holds a line
for (a line cut short by a kill is dropped). It stops on SIGINT / SIGTERM (after the checkpoint
in hand), when the run's last step has been scored (the step count of our recipe's token
budget, or ``max_steps`` of a transformers Trainer's ``trainer_state.json``), or after
``--idle-exit`` seconds without a new checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moe_merge.checkpoint.discover import Tag, find_tags, trainer_state
from moe_merge.errors import CheckpointError, MergeError
from moe_merge.merge.selection import Selection

LOG = "watch.jsonl"


def read_log(path: Path) -> list[dict]:
    """The records of ``watch.jsonl``; a last line cut short (the watcher was killed while
    writing it) is cut off the file, so the next record starts on a line of its own."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    out = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MergeError(f"{path}: line {n} is not JSON: not a watch log (use another "
                             "--out)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise MergeError(f"{path}: line {n} has no step: not a watch log (use another --out)")
        out.append(rec)
    return out


def final_step(run: Path, tags: list[Tag]) -> int | None:
    """The step the run ends at, when the run says: our recipe's token budget over its tokens
    per step, or a transformers Trainer's ``max_steps``."""
    recipe = run / "recipe.yaml"
    if recipe.is_file():
        from moe_merge.config.recipe import load_recipe

        cfg = load_recipe(recipe)
        return math.ceil(cfg.train.max_tokens / cfg.tokens_per_step)
    folder = tags[-1].folder if tags else None
    if folder is not None and (folder / "trainer_state.json").is_file():
        steps = trainer_state(folder).get("max_steps")
        if isinstance(steps, int) and steps > 0:
            return steps
    return None


class Watcher:
    def __init__(self, run: str | Path, out: str | Path, selection: Selection,
                 recipe: str | Path | None = None, data: str | None = None,
                 overrides: list[str] | None = None, hf_config: str | Path | None = None,
                 latest: bool = True, tasks: list[str] | None = None, task_options=None,
                 poll: float = 30.0, idle_exit: float | None = None,
                 echo: Callable[[str], None] = print):
        self.run, self.out = Path(run), Path(out)
        if not self.run.is_dir():
            raise MergeError(f"{self.run}: not a directory")
        self.selection, self.latest = selection, latest
        self.recipe, self.data, self.overrides = recipe, data, list(overrides or [])
        self.hf_config, self.tasks, self.task_options = hf_config, tasks or [], task_options
        self.poll, self.idle_exit, self.echo = poll, idle_exit, echo
        self.stop = False
        self.windows = None
        self.cfg = self.recipe_path = None
        self._warned: set[str] = set()

    def _warn(self, text: str) -> None:
        if text not in self._warned:  # said once per tag, not at every poll
            self._warned.add(text)
            self.echo(text)

    def _eval_setup(self, tag: Tag) -> None:
        from moe_merge.config.recipe import load_recipe
        from moe_merge.evals.loss import DEFAULTS, default_recipe, recipe_for

        path = Path(self.recipe) if self.recipe else recipe_for(tag.path)
        if path is None and self.data is None:
            raise MergeError(f"{self.run}: cannot find the run's recipe.yaml for its validation "
                             "batches; pass --recipe RECIPE, or --data FILE")
        if path is None:
            self.recipe_path, self.cfg = DEFAULTS, default_recipe(self.overrides)
        else:
            self.recipe_path, self.cfg = path, load_recipe(path, self.overrides)

    def _score(self, model: Path) -> float:
        """The loss of an HF directory or a checkpoint (gathered) on the watcher's windows
        (built on first use, with the first model's tokenizer for ``--data``)."""
        from moe_merge.evals.loss import eval_windows, score

        if self.windows is None:
            self.windows = eval_windows(self.cfg, self.data, model if self.data else None)
        return score(model, self.cfg, self.recipe_path, data=self.data,
                     hf_config=self.hf_config, windows=self.windows)["loss"]

    def step(self, tags: list[Tag], upto: Tag, tb) -> dict | None:
        """Merge and score the window ending at ``upto``; None if it is not full yet."""
        from moe_merge.merge.merger import OutputOptions, merge

        before = [t for t in tags if t.step <= upto.step]
        chosen = self.selection.choose(before, allow_fewer=True)
        want = self.selection.last
        if len(chosen) < 2 or (want is not None and len(chosen) < want):
            return None
        t0 = time.time()
        if self.cfg is None:
            self._eval_setup(upto)
        work = self.out / ".work"
        work.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            merged = Path(tmp) / "merged"
            merge([t.path for t in chosen], merged,
                  Selection(self.selection.strategy, self.selection.alpha,
                            self.selection.weights, last=len(chosen)),
                  OutputOptions(hf_config=self.hf_config), progress=False,
                  echo=lambda s: None)
            rec = {"step": upto.step, "tokens": upto.tokens, "checkpoint": str(upto.path),
                   "window": [t.step for t in chosen],
                   "weights": self.selection.weights_for(len(chosen)),
                   "strategy": self.selection.describe()}
            rec["val_loss"] = self._score(merged)
            if self.latest:  # the checkpoint alone, gathered as moe-merge eval gathers it
                rec["latest_val_loss"] = self._score(upto.path)
                rec["val_gap"] = rec["latest_val_loss"] - rec["val_loss"]
            if self.tasks:
                from moe_merge.evals.downstream import run_tasks

                rec["tasks"] = run_tasks(merged, self.tasks, self.task_options)["scores"]
        rec["seconds"] = round(time.time() - t0, 3)
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._append(rec)
        if tb is not None:
            tb.add_scalar("pma/val_loss", rec["val_loss"], upto.step)
            if self.latest:
                tb.add_scalar("latest/val_loss", rec["latest_val_loss"], upto.step)
                tb.add_scalar("pma/val_gap", rec["val_gap"], upto.step)
            for task, metrics in rec.get("tasks", {}).items():
                for name, value in metrics.items():
                    tb.add_scalar(f"pma/{task}/{name}", value, upto.step)
            tb.flush()
        return rec

    def _append(self, rec: dict) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def watch(self) -> int:
        """Follow the run until it ends or the watcher is asked to stop; the records written."""
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        done = {r["step"] for r in read_log(self.out / LOG)}
        old = {s: signal.signal(s, self._ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        tb = SummaryWriter(str(self.out / "tb"))
        written, last_new, end = 0, time.monotonic(), None
        try:
            while not self.stop:
                try:
                    tags = find_tags([self.run], warn=self._warn)
                except CheckpointError as e:
                    if "no DeepSpeed checkpoint tags" not in str(e) and "no whole" not in str(e):
                        raise
                    tags = []  # nothing saved yet
                end = end if end is not None else final_step(self.run, tags)
                for t in tags:
                    if self.stop:
                        break
                    if t.step in done:
                        continue
                    rec = self.step(tags, t, tb)
                    done.add(t.step)
                    last_new = time.monotonic()
                    if rec is not None:
                        written += 1
                        gap = f", gap {rec['val_gap']:+.4f}" if "val_gap" in rec else ""
                        self.echo(f"step {t.step}: merged {rec['window']} val loss "
                                  f"{rec['val_loss']:.4f}{gap} ({rec['seconds']:.1f} s)")
                if end is not None and tags and tags[-1].step >= end and tags[-1].step in done:
                    self.echo(f"the run has reached its last step ({end}): done")
                    break
                if self.idle_exit is not None and time.monotonic() - last_new > self.idle_exit:
                    self.echo(f"no new checkpoint for {self.idle_exit:g} s: done")
                    break
                self._sleep(self.poll)
        finally:
            tb.close()
            for s, h in old.items():
                signal.signal(s, h)
            work = self.out / ".work"
            if work.is_dir() and not any(work.iterdir()):
                work.rmdir()
        return written

    def _ask_stop(self, signum, frame) -> None:
        self.echo(f"{signal.Signals(signum).name}: stopping after the checkpoint in hand")
        self.stop = True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop and time.monotonic() < end:
            time.sleep(max(0.0, min(0.2, end - time.monotonic())))
