"""Which checkpoints a merge takes, and with what weights: one value, passed whole.

The command line (:meth:`Selection.from_args`), the recipe (the live monitor, spike recovery)
and the studies build a :class:`Selection`; :func:`moe_merge.merge.merger.plan`,
:func:`~moe_merge.merge.merger.merge` and :func:`moe_merge.evals.analyze.analyze` take it as is.
"""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from moe_merge.errors import MergeError
from moe_merge.merge.strategies import (
    STRATEGIES,
    check_alpha,
    check_weights,
    strategy,
    strategy_weights,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Selection:
    """Checkpoints by ``tags`` (steps), then every ``every``-th counted back from the newest
    (the merge interval V is ``every`` save intervals), then the newest ``last``; weighted by
    ``strategy`` (``alpha`` for EMA) or by explicit ``weights``, oldest first.

    Checked when made (a MergeError naming the option). ``alpha`` is kept only where it is
    used (EMA without explicit weights), ``weights`` as a tuple of floats and ``tags`` as the
    sorted tuple of distinct steps they name (``global_step200`` or ``200``)."""

    strategy: str = "sma"
    alpha: float | None = None
    weights: Sequence[float] | None = None
    last: int | None = None
    every: int | None = None
    tags: Sequence[str | int] | None = None

    def __post_init__(self) -> None:
        s = strategy(self.strategy)
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            check_weights(weights)
            object.__setattr__(self, "weights", weights)
        if s.param is None or self.weights is not None:
            object.__setattr__(self, "alpha", None)
        elif self.alpha is None:
            raise MergeError(f"--strategy {s.name} needs --{s.param} (the paper uses 0.1 or 0.2)")
        else:
            check_alpha(self.alpha)
        for key in ("last", "every"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                                  or v < 1):
                raise MergeError(f"--{key} must be >= 1, got {v}")
        if self.tags is not None:
            steps = tuple(sorted(set(_steps_of(self.tags))))
            if not steps:
                raise MergeError("--tags: no tags given")
            object.__setattr__(self, "tags", steps)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selection:
        """The selection given by the options of :func:`add_arguments`."""
        return cls(args.strategy, args.alpha, args.weights, args.last, args.every,
                   args.tags or None)

    @property
    def kind(self) -> str:
        """The strategy's name, or ``weights`` when explicit weights are given."""
        return "weights" if self.weights is not None else self.strategy

    def describe(self) -> str:
        """A few words for a log line: ``sma``, ``ema alpha=0.2``, ``explicit``."""
        if self.weights is not None:
            return "explicit"
        return self.strategy + (f" alpha={self.alpha}" if self.alpha is not None else "")

    def choose(self, items: Sequence[T], *, allow_fewer: bool = False) -> list[T]:
        """The chosen ones of ``items`` (steps, or objects with a ``.step`` such as tags),
        oldest first. ``allow_fewer``: with fewer than ``last`` available, take them all (and
        nothing from nothing) instead of refusing."""
        by_step: dict[int, T] = {}
        for x in items:
            step = getattr(x, "step", x)
            if step in by_step:
                raise MergeError(f"two checkpoints at step {step}")
            by_step[step] = x
        steps = sorted(by_step)
        if not steps:
            if allow_fewer:
                return []
            raise MergeError("no checkpoints found")
        if self.tags is not None:
            missing = [t for t in self.tags if t not in by_step]
            if missing:
                raise MergeError(f"--tags: no checkpoint global_step{missing[0]} "
                                 f"(have {', '.join(f'global_step{s}' for s in steps)})")
            steps = list(self.tags)
        if self.every is not None:
            steps = steps[::-1][::self.every][::-1]
        if self.last is not None:
            if self.last > len(steps) and not allow_fewer:
                raise MergeError(f"--last {self.last}: only {len(steps)} checkpoints available"
                                 + (f" at --every {self.every}" if self.every else ""))
            steps = steps[-self.last:]
        return [by_step[s] for s in steps]

    def weights_for(self, n: int) -> list[float]:
        """The effective weights of ``n`` chosen checkpoints, oldest first (sum 1)."""
        return strategy_weights(self.strategy, n, self.alpha, self.weights)


def _steps_of(tags: Sequence[str | int] | str) -> list[int]:
    """Steps from tags like ``global_step200`` or step numbers (a string: comma-separated)."""
    from moe_merge.checkpoint.discover import MAX_STEP_DIGITS

    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t.strip()]
    steps = []
    for t in tags:
        s = str(t).strip()
        s = s[len("global_step"):] if s.startswith("global_step") else s
        if not (s.isascii() and s.isdigit() and len(s) <= MAX_STEP_DIGITS):
            raise MergeError(f"--tags: {str(t)[:40]!r} is not a tag like global_step200 or a "
                             "step number")
        steps.append(int(s))
    return steps


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :meth:`Selection.from_args` reads: --strategy, --alpha, --weights, --last,
    --every, --tags."""
    parser.add_argument("--strategy", default="sma", choices=list(STRATEGIES),
                        help="; ".join(f"{s.name}: {s.help}" for s in STRATEGIES.values())
                        + " (default sma)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="EMA smoothing (paper: 0.1, 0.2)")
    parser.add_argument("--weights", type=_floats, default=None,
                        help="explicit weights w1,...,wN for the selected checkpoints, oldest "
                             "first (normalised to sum 1)")
    parser.add_argument("--last", type=int, default=None, help="the newest N checkpoints")
    parser.add_argument("--every", type=int, default=None,
                        help="every K-th checkpoint counted back from the newest (interval V = "
                             "K save intervals)")
    parser.add_argument("--tags", default=None,
                        help="comma-separated tags, e.g. global_step20,global_step40")
