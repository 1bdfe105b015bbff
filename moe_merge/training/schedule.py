"""Learning-rate schedules as pure functions of the optimizer step.

``lr_at(step)`` is the LR used by optimizer step ``step`` (0-based). Token amounts in the recipe
are turned into step counts with the recipe's tokens per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_merge.config.recipe import RecipeConfig, ScheduleConfig


def decay_factor(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise ValueError(f"unknown decay shape {shape!r}")


@dataclass(frozen=True)
class Schedule:
    kind: str
    peak_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    decay_steps: int
    decay_shape: str

    @classmethod
    def from_recipe(cls, cfg: RecipeConfig) -> "Schedule":
        s: ScheduleConfig = cfg.schedule
        tps = cfg.tokens_per_step
        return cls(
            kind=s.kind,
            peak_lr=cfg.train.lr,
            min_lr=cfg.train.lr * s.min_lr_ratio,
            total_steps=cfg.total_steps,
            warmup_steps=round(s.warmup_tokens / tps),
            decay_steps=round(s.decay_tokens / tps) if s.kind == "wsd" else 0,
            decay_shape=s.decay_shape,
        )

    @property
    def decay_start(self) -> int:
        """First step of the WSD decay (== total_steps when there is none)."""
        return self.total_steps - self.decay_steps

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            f = decay_factor((step - self.warmup_steps + 1) / span, "cosine")
        elif step < self.decay_start:
            return self.peak_lr
        else:
            f = decay_factor((step - self.decay_start + 1) / self.decay_steps, self.decay_shape)
        return self.min_lr + (self.peak_lr - self.min_lr) * f

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return "warmup"
        if self.kind == "wsd" and step < self.decay_start:
            return "stable"
        return "decay"
