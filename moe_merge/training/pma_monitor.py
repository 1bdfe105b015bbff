"""Live PMA monitor: at every checkpoint, the merge of the latest N checkpoints, evaluated in
process on the fixed validation batches, logged as ``pma/val_loss`` beside ``val/loss``.

Averaging is linear, so every rank merges the weights it holds, with no gathering (see
:mod:`moe_merge.live`): under ZeRO 0/1/2 the full non-expert weights and its own experts
(AutoEP), under ZeRO-3 its partition of each parameter. The monitor keeps, on the host, a copy
of those weights at every checkpoint in the window (for fp32 training the fp32 master values;
for bf16 the bf16 module copies, so the merge then averages rounded weights), writes the
weighted sum into the module (the merger's own arithmetic), runs the validation pass, and
writes the latest checkpoint's weights back (exactly: they are the newest snapshot). The
optimizer's master weights and moments are never touched, so training continues bit for bit
as without the monitor.

Cost per checkpoint: one validation pass plus N weighted sums over the rank's weights in host
memory. Memory: ((N - 1) * interval + 1) host copies of the rank's module weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_merge.config.recipe import PMAMonitorConfig
from moe_merge.live import LivePMA

PMA_SCALARS = ("pma/val_loss", "pma/val_gap", "pma/n", "pma/first_step", "pma/seconds")


class PMAMonitor:
    """:class:`~moe_merge.live.LivePMA` configured by the recipe's ``pma_monitor``."""

    def __init__(self, module: torch.nn.Module, cfg: PMAMonitorConfig):
        self.cfg = cfg
        self.live = LivePMA(module, n=cfg.n, strategy=cfg.strategy, alpha=cfg.alpha,
                            interval=cfg.interval, min_n=cfg.min_n)

    def reset(self) -> None:
        """Forget the window: after a spike recovery the trajectory restarts at an older step."""
        self.live.reset()

    def snapshot(self, step: int) -> None:
        """Remember the module weights of the checkpoint just saved at ``step``."""
        self.live.update(step)

    def evaluate(self, validate: Callable[[], float]) -> dict[str, float] | None:
        """Merge the window into the module, ``validate()`` it, restore the latest weights.
        ``None`` while the window holds fewer than ``min_n`` checkpoints."""
        got = self.live.evaluate(validate)
        if got is None:
            return None
        return {"pma/val_loss": got["pma/loss"], "pma/n": got["pma/n"],
                "pma/first_step": got["pma/first_step"], "pma/seconds": got["pma/seconds"]}
