"""Merge strategies as pure functions: checkpoint selection and averaging weights.

Checkpoints are ordered oldest first (M_1 ... M_N), as in arXiv 2505.12082. Every strategy returns the
*effective* weights w_i with sum 1, so that the merged model is sum_i w_i * M_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moe_merge.errors import MergeError

STRATEGIES = ("sma", "wma", "ema")



def sma_weights(n: int) -> list[float]:
    """Simple moving average: w_i = 1/N."""
    _check_n(n)
    return [1.0 / n] * n


def wma_weights(n: int) -> list[float]:
    """Weighted moving average: w_i = i / sum_j j, newer checkpoints weigh more."""
    _check_n(n)
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]


def ema_weights(n: int, alpha: float) -> list[float]:
    """Exponential moving average by the recursion M^(1) = M_1, M^(i) = a M_i + (1 - a) M^(i-1).

    Unrolled: M_1 gets (1 - a)^(N-1), M_i (i >= 2) gets a (1 - a)^(N-i). These sum to 1 exactly
    (the paper's printed form a (1 - a)^(N-i) for all i does not).
    """
    _check_n(n)
    if not 0.0 < alpha <= 1.0:
        raise MergeError(f"--alpha must be in (0, 1], got {alpha}")
    return [(1.0 - alpha) ** (n - 1)] + [alpha * (1.0 - alpha) ** (n - i) for i in range(2, n + 1)]


def ema_recursive(values: Sequence[float], alpha: float) -> float:
    """The EMA recursion applied to scalars (a reference for the unrolled weights)."""
    acc = values[0]
    for v in values[1:]:
        acc = alpha * v + (1.0 - alpha) * acc
    return acc


def normalize(weights: Sequence[float]) -> list[float]:
    """Explicit weights scaled to sum 1; negative, non-finite or all-zero weights are refused."""
    if not weights:
        raise MergeError("--weights: no weights given")
    for w in weights:
        if not math.isfinite(w):
            raise MergeError(f"--weights: weight {w} is not finite")
        if w < 0:
            raise MergeError(f"--weights: weight {w} is negative")
    total = math.fsum(weights)
    if total == 0:
        raise MergeError("--weights: all weights are zero")
    return [w / total for w in weights]


def strategy_weights(strategy: str, n: int, alpha: float | None = None,
                     weights: Sequence[float] | None = None) -> list[float]:
    """Effective weights for ``n`` checkpoints, oldest first."""
    if weights is not None:
        if len(weights) != n:
            raise MergeError(f"--weights: {len(weights)} weights given for {n} checkpoints")
        return normalize(weights)
    if strategy == "sma":
        return sma_weights(n)
    if strategy == "wma":
        return wma_weights(n)
    if strategy == "ema":
        if alpha is None:
            raise MergeError("--strategy ema needs --alpha (the paper uses 0.1 or 0.2)")
        return ema_weights(n, alpha)
    raise MergeError(f"--strategy: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")


def select(steps: Sequence[int], last: int | None = None, every: int | None = None,
           tags: Sequence[int] | None = None) -> list[int]:
    """Choose checkpoints (by step, ascending input) to merge.

    ``tags``: exactly these steps. ``every`` K: every K-th checkpoint counted back from the
    newest (the merge interval V is K save intervals). ``last`` N: then keep the newest N.
    """
    steps = sorted(steps)
    if not steps:
        raise MergeError("no checkpoints found")
    if tags is not None:
        missing = [t for t in tags if t not in steps]
        if missing:
            raise MergeError(f"--tags: no checkpoint global_step{missing[0]} "
                             f"(have {', '.join(f'global_step{s}' for s in steps)})")
        steps = sorted(set(tags))
    if every is not None:
        if every < 1:
            raise MergeError(f"--every must be >= 1, got {every}")
        steps = steps[::-1][::every][::-1]
    if last is not None:
        if last < 1:
            raise MergeError(f"--last must be >= 1, got {last}")
        if last > len(steps):
            raise MergeError(f"--last {last}: only {len(steps)} checkpoints available"
                             + (f" at --every {every}" if every else ""))
        steps = steps[-last:]
    return steps


def _check_n(n: int) -> None:
    if n < 1:
        raise MergeError(f"need at least one checkpoint to merge, got {n}")
