"""Metrics: DeepSpeed's TensorBoard monitor, metrics.jsonl and the rank-0 progress bar.

Scalars go through ``engine.monitor.write_events`` so the recipe's metrics land in the same event
files as DeepSpeed's own. MoE load histograms go to the same TensorBoard writer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

# Scalar names written by the trainer (tests check that they reach TensorBoard).
TRAIN_SCALARS = ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/tokens")
MOE_SCALARS = ("moe/aux_loss", "moe/load_entropy", "moe/load_max_over_mean")
VAL_SCALARS = ("val/loss", "val/ppl")
STABILITY_SCALARS = ("stability/spike", "stability/loss_over_trend", "stability/recovery",
                     "stability/resume_step", "stability/steps_to_trend")


def host_memory() -> dict[str, int]:
    """This process's resident set now (``rss``) and at its peak so far (``peak``), in bytes,
    from /proc/self/status; empty where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    kb = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
          if k in ("VmRSS", "VmHWM")}
    return {"rss": kb["VmRSS"], "peak": kb["VmHWM"]} if len(kb) == 2 else {}


def expert_load_stats(load_LE: torch.Tensor) -> dict[str, float]:
    """Statistics of per-layer expert token counts [L, E] (L layers, E experts).

    load_entropy: mean over layers of H(p) / log(E), 1 = perfectly balanced.
    load_max_over_mean: mean over layers of max_e(load) / mean_e(load), 1 = balanced.
    """
    load_LE = load_LE.double()
    totals_L = load_LE.sum(dim=1, keepdim=True).clamp_min(1)
    p_LE = load_LE / totals_L
    ent_L = -(p_LE * p_LE.clamp_min(1e-30).log()).sum(dim=1) / math.log(load_LE.shape[1])
    mom_L = load_LE.max(dim=1).values / load_LE.mean(dim=1).clamp_min(1e-30)
    return {"moe/load_entropy": ent_L.mean().item(), "moe/load_max_over_mean": mom_L.mean().item()}


class MetricsLogger:
    """Rank-0 sink for scalars: TensorBoard (through the engine's monitor) and metrics.jsonl."""

    def __init__(self, path: Path, engine, enabled: bool):
        self.enabled = enabled
        self.engine = engine
        self.path = path  # the run's metrics.jsonl
        self.attempt = 0

    def truncate_after(self, step: int) -> None:
        """Drop lines beyond ``step`` (a resume rewinds to its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        records = [(ln, json.loads(ln)) for ln in lines if ln.strip()]
        # stability events (spikes, recoveries) stay: they happened, whatever is replayed
        keep = [ln for ln, r in records if r.get("step", 0) <= step or "event" in r]
        if len(keep) != len(lines):
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, scalars: dict[str, float], event: str | None = None,
            extra: dict[str, Any] | None = None) -> None:
        """Scalars to TensorBoard and one metrics.jsonl line; ``event`` and ``extra`` (any JSON)
        go to metrics.jsonl only. After a spike recovery the line carries ``attempt``: steps
        are then executed again, and (step, attempt) orders the lines of the run."""
        if not self.enabled:
            return
        self.engine.monitor.write_events([(k, v, step) for k, v in scalars.items()])
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3), **scalars}
        if self.attempt:
            record["attempt"] = self.attempt
        if event:
            record["event"] = event
        if extra:
            record.update({k: v for k, v in extra.items() if k not in record})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def text(self, name: str, text: str, step: int) -> None:
        """A line of text in TensorBoard's Text tab (events such as spikes and recoveries)."""
        writer = self._writer()
        if self.enabled and writer is not None:
            writer.add_text(name, text, step)
            writer.flush()

    def _writer(self):
        tb = getattr(self.engine.monitor, "tb_monitor", None)
        return getattr(tb, "summary_writer", None) if tb is not None else None

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        writer = self._writer()
        if self.enabled and writer is not None:
            writer.add_histogram(name, values.float(), step)
            writer.flush()


class Throughput:
    """Tokens per second between log steps (perf_counter time)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart(0)

    def restart(self, step: int) -> None:
        """Count from ``step``, now (a start, or a recovery that moved the step back)."""
        self.step, self.t = step, time.perf_counter()

    def tokens_per_s(self, step: int) -> float:
        """Rate since the last call (or restart), which ``step`` then starts."""
        now = time.perf_counter()
        rate = (step - self.step) * self.tokens_per_step / (now - self.t)
        self.step, self.t = step, now
        return rate


class ProgressBar:
    """The rank-0 progress bar (tqdm) over optimizer steps; does nothing when ``enabled`` is
    False."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                            dynamic_ncols=True, mininterval=2.0)

    def show(self, scalars: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                 lr=f"{scalars['train/lr']:.2e}",
                                 tok_s=f"{scalars['perf/tokens_per_s']:.0f}", refresh=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def jump(self, step: int) -> None:
        """Show ``step`` (a recovery resumed there)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
