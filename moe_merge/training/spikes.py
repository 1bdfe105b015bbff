"""Loss spikes: detection and recovery plans (:mod:`moe_merge.training.recovery` acts on them).

- :class:`SpikeDetector` watches the global loss and gradient norm of every optimizer step. A
  step is a spike when its loss is above ``loss_factor`` x the running trend of the loss, when
  its gradient norm is above ``grad_norm_factor`` x the trend of the gradient norm, or when
  either is not finite. The trends are bias-corrected EMAs of the steps outside spikes, so a
  spike never drags its own yardstick up. Consecutive spike steps form one event, which ends at
  the first step back within the factors of the trend it started from.
- :func:`recovery_plan` picks the checkpoints a recovery reloads: the newest pre-spike one
  (rollback) or the last N before the spike, merged (pma); each retry for the same spike steps
  one checkpoint further back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass
class Spike:
    """One spike event: its first step and why it fired."""
    step: int
    kind: str  # "nonfinite", "loss" or "grad_norm"
    loss: float
    grad_norm: float
    loss_trend: float | None
    grad_norm_trend: float | None

    @property
    def loss_ratio(self) -> float | None:
        return self.loss / self.loss_trend if self.loss_trend else None

    @property
    def grad_norm_ratio(self) -> float | None:
        return self.grad_norm / self.grad_norm_trend if self.grad_norm_trend else None

    def describe(self) -> str:
        if self.kind == "nonfinite":
            return (f"non-finite loss or gradient norm (loss {self.loss}, "
                    f"grad norm {self.grad_norm})")
        if self.kind == "loss":
            return (f"loss {self.loss:.4f} = {self.loss_ratio:.2f} x its trend "
                    f"{self.loss_trend:.4f}")
        return (f"gradient norm {self.grad_norm:.4g} = {self.grad_norm_ratio:.1f} x its trend "
                f"{self.grad_norm_trend:.4g}")

    def scalars(self) -> dict[str, float]:
        out = {"stability/spike": 1.0, "stability/spike_nonfinite": float(self.kind == "nonfinite")}
        if self.loss_ratio is not None and math.isfinite(self.loss):
            out["stability/loss_over_trend"] = self.loss_ratio
        if self.grad_norm_ratio is not None and math.isfinite(self.grad_norm):
            out["stability/grad_norm_over_trend"] = self.grad_norm_ratio
        return out


@dataclass
class _EMA:
    beta: float
    value: float = 0.0
    n: int = 0

    def add(self, x: float) -> None:
        self.value = self.beta * self.value + (1 - self.beta) * x
        self.n += 1

    @property
    def trend(self) -> float | None:
        return self.value / (1 - self.beta ** self.n) if self.n else None


@dataclass
class SpikeDetector:
    loss_factor: float = 1.3
    grad_norm_factor: float = 10.0
    beta: float = 0.9
    min_steps: int = 20
    loss: _EMA = field(init=False)
    grad_norm: _EMA = field(init=False)
    event: Spike | None = field(init=False, default=None)
    """The spike event in progress (None when the run is on trend)."""
    event_steps: int = field(init=False, default=0)
    """Steps the event has lasted (a recovery ends it: ``restart``)."""

    def __post_init__(self):
        self.loss = _EMA(self.beta)
        self.grad_norm = _EMA(self.beta)

    @classmethod
    def from_config(cls, st) -> "SpikeDetector":
        return cls(st.loss_factor, st.grad_norm_factor, st.trend_beta, st.min_steps)

    def _fires(self, loss: float, grad_norm: float | None) -> str | None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return "nonfinite"
        if self.loss.n < self.min_steps:
            return None
        if loss > self.loss_factor * self.loss.trend:
            return "loss"
        if self.grad_norm_factor and grad_norm is not None and self.grad_norm.n and \
                grad_norm > self.grad_norm_factor * self.grad_norm.trend:
            return "grad_norm"
        return None

    def update(self, step: int, loss: float, grad_norm: float | None
               ) -> tuple[Spike | None, int | None]:
        """Feed one step (``grad_norm`` None: not available, e.g. DeepSpeed without ZeRO, only
        the loss is judged). Returns (the new event if this step starts one, the event's length
        in steps if this step ends one). A step inside an event returns (None, None)."""
        kind = self._fires(loss, grad_norm)
        if kind is not None:
            if self.event is not None:
                self.event_steps += 1
                return None, None
            self.event = Spike(step, kind, loss, math.nan if grad_norm is None else grad_norm,
                               self.loss.trend, self.grad_norm.trend)
            self.event_steps = 1
            return self.event, None
        self.loss.add(loss)
        if grad_norm is not None:
            self.grad_norm.add(grad_norm)
        if self.event is not None:
            length, self.event = self.event_steps, None
            return None, length
        return None, None

    def restart(self, trends: tuple[_EMA, _EMA] | None = None) -> None:
        """After a reload the event is over (its steps were discarded): the next spike, a
        replayed one included, starts a new event. ``trends``: the ones saved with the
        checkpoint reloaded (``trends()``), so replayed steps are not counted twice."""
        self.event, self.event_steps = None, 0
        if trends is not None:
            self.loss, self.grad_norm = (replace(t) for t in trends)

    def trends(self) -> tuple[_EMA, _EMA]:
        return replace(self.loss), replace(self.grad_norm)


@dataclass
class RetryCount:
    """Recoveries for one spike. A spike at or before the step of the spike the last recovery
    was for is a retry of it, and chooses among the checkpoints older than the one the last
    recovery resumed from (each retry goes one checkpoint further back); a spike past that
    step is a new one (the run got past the old), with a fresh count. The spike step of a new
    count is always later than the last one's, so recoveries cannot loop forever."""
    bound: int = -1
    retries: int = 0
    floor: int | None = None

    def next(self, spike_step: int) -> int:
        """The retry index of a recovery for a spike at ``spike_step`` (0: a new spike)."""
        if spike_step <= self.bound:
            self.retries += 1
        else:
            self.bound, self.retries, self.floor = spike_step, 0, None
        return self.retries

    def candidates(self, steps: list[int], spike_step: int) -> list[int]:
        """The checkpoint steps this recovery may reload, oldest first."""
        limit = spike_step if self.floor is None else min(spike_step, self.floor)
        return sorted(s for s in steps if s < limit)

    def resumed(self, step: int) -> None:
        self.floor = step


def recovery_plan(candidates: list[int], action: str, n: int) -> list[int]:
    """Checkpoint steps (oldest first) a recovery reloads: the newest candidate (rollback) or
    the newest ``n`` (pma, merged)."""
    c = sorted(candidates)
    return c[-1:] if action == "rollback" else c[-n:]
