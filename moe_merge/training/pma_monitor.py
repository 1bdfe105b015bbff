"""Live PMA monitor: at every checkpoint, the merge of the latest N checkpoints, evaluated in
process on the fixed validation batches, logged as ``pma/val_loss`` beside ``val/loss``.

Averaging is linear, so every rank merges the weights it holds, with no gathering: under ZeRO
0/1/2 each rank's module holds the full non-expert weights and its own experts (AutoEP), and the
merged values of exactly those tensors are what its forward pass needs. The monitor keeps, on
the host, a copy of each rank's module weights at every checkpoint in the window (for fp32
training these are the fp32 master values; for bf16 the bf16 module copies, so the merge then
averages rounded weights), writes the weighted sum into the module (the merger's own
arithmetic: for fp32 training, the weights ``moe-merge merge`` writes, bit for bit), runs the
validation pass, and writes the latest checkpoint's weights back (exactly: they are the newest
snapshot). The
optimizer's master weights and moments are never touched, so training continues bit for bit as
without the monitor.

Cost per checkpoint: one validation pass plus N weighted sums over the rank's weights in host
memory. Memory: ((N - 1) * interval + 1) host copies of the rank's module weights.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from moe_merge.config.recipe import PMAMonitorConfig
from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import weighted_sum

PMA_SCALARS = ("pma/val_loss", "pma/val_gap", "pma/n", "pma/first_step", "pma/seconds")


class PMAMonitor:
    def __init__(self, module: torch.nn.Module, cfg: PMAMonitorConfig):
        self.cfg = cfg
        # every interval-th checkpoint counted back from the newest, at most n of them
        self.selection = Selection(cfg.strategy, cfg.alpha, every=cfg.interval, last=cfg.n)
        self.params = list(module.parameters())
        self.keep = (cfg.n - 1) * cfg.interval + 1
        self.snapshots: deque[tuple[int, list[torch.Tensor]]] = deque(maxlen=self.keep)
        self.min_n = cfg.min_n or cfg.n

    def reset(self) -> None:
        """Forget the window: after a spike recovery the trajectory restarts at an older step."""
        self.snapshots.clear()

    @torch.no_grad()
    def snapshot(self, step: int) -> None:
        """Remember the module weights of the checkpoint just saved at ``step``."""
        self.snapshots.append((step, [p.detach().to("cpu", copy=True) for p in self.params]))

    @torch.no_grad()
    def evaluate(self, validate: Callable[[], float]) -> dict[str, float] | None:
        """Merge the window into the module, ``validate()`` it, restore the latest weights.
        ``None`` while the window holds fewer than ``min_n`` checkpoints."""
        by_step = dict(self.snapshots)
        chosen = self.selection.choose(list(by_step), allow_fewer=True)
        if len(chosen) < self.min_n:
            return None
        t0 = time.perf_counter()
        weights = self.selection.weights_for(len(chosen))
        snaps = [by_step[s] for s in chosen]
        latest = self.snapshots[-1][1]
        for i, p in enumerate(self.params):
            p.copy_(torch.from_numpy(weighted_sum([snap[i] for snap in snaps], weights)))
        try:
            loss = validate()
        finally:
            for p, t in zip(self.params, latest):
                p.copy_(t)
        return {"pma/val_loss": loss, "pma/n": float(len(chosen)),
                "pma/first_step": float(chosen[0]), "pma/seconds": time.perf_counter() - t0}
