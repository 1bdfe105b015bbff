"""Merge strategies as pure functions: the averaging weights, and the weighted sum itself.

Checkpoints are ordered oldest first (M_1 ... M_N), as in arXiv 2505.12082. Every strategy
returns the *effective* weights w_i with sum 1, so that the merged model is sum_i w_i * M_i,
which :func:`weighted_sum` (and the streaming merger, through :func:`axpy`) computes in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_merge.errors import MergeError

if TYPE_CHECKING:  # numpy is imported where a sum is computed: the strategy table stays light
    import numpy as np


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
    check_alpha(alpha)
    return [(1.0 - alpha) ** (n - 1)] + [alpha * (1.0 - alpha) ** (n - i) for i in range(2, n + 1)]


@dataclass(frozen=True)
class Strategy:
    """A named strategy: its weight function and the parameter it takes, if any."""

    name: str
    weights: Callable[..., list[float]]
    param: str | None
    help: str


# What a DeepSpeed-format merge, PMA-init and the spike recovery's merge do with the optimizer
# state: start Adam afresh, keep the newest checkpoint's moments, or merge the moments too.
OPTIMIZER_POLICIES = ("reset", "latest", "merged")

STRATEGIES: dict[str, Strategy] = {
    "sma": Strategy("sma", sma_weights, None, "equal weights"),
    "wma": Strategy("wma", wma_weights, None, "weight i / sum(j), newer weigh more"),
    "ema": Strategy("ema", ema_weights, "alpha",
                    "the recursion with --alpha, started at the oldest checkpoint"),
}


def strategy(name: str) -> Strategy:
    """The strategy called ``name``, or a one-line MergeError listing them."""
    if name not in STRATEGIES:
        raise MergeError(f"--strategy: unknown strategy {name!r} (choose from "
                         f"{', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def check_alpha(alpha: float) -> None:
    """Refuse an EMA coefficient outside (0, 1]."""
    if not 0.0 < alpha <= 1.0:
        raise MergeError(f"--alpha must be in (0, 1], got {alpha}")


def ema_recursive(values: Sequence[float], alpha: float) -> float:
    """The EMA recursion applied to scalars (a reference for the unrolled weights)."""
    acc = values[0]
    for v in values[1:]:
        acc = alpha * v + (1.0 - alpha) * acc
    return acc


def check_weights(weights: Sequence[float]) -> None:
    """Refuse explicit weights that are missing, negative, non-finite or all zero."""
    if not weights:
        raise MergeError("--weights: no weights given")
    for w in weights:
        if not math.isfinite(w):
            raise MergeError(f"--weights: weight {w} is not finite")
        if w < 0:
            raise MergeError(f"--weights: weight {w} is negative")
    if math.fsum(weights) == 0:
        raise MergeError("--weights: all weights are zero")


def normalize(weights: Sequence[float]) -> list[float]:
    """Explicit weights scaled to sum 1; negative, non-finite or all-zero weights are refused."""
    check_weights(weights)
    total = math.fsum(weights)
    return [w / total for w in weights]


def strategy_weights(name: str, n: int, alpha: float | None = None,
                     weights: Sequence[float] | None = None) -> list[float]:
    """Effective weights for ``n`` checkpoints, oldest first."""
    if weights is not None:
        if len(weights) != n:
            raise MergeError(f"--weights: {len(weights)} weights given for {n} checkpoints")
        return normalize(weights)
    s = strategy(name)
    if s.param is None:
        return s.weights(n)
    if alpha is None:
        raise MergeError(f"--strategy {name} needs --{s.param} (the paper uses 0.1 or 0.2)")
    return s.weights(n, alpha)


def axpy(acc: np.ndarray, x: np.ndarray, w: float, wide: np.ndarray) -> None:
    """``acc += w * x`` in float64 (``x`` float32 or float64, flat), ``wide`` a float64 scratch
    buffer: ``x`` widened, multiplied by ``w``, then added, a piece of ``len(wide)`` at a time.
    The one place a weighted sum is computed, so every merge rounds alike."""
    import numpy as np

    step = len(wide)
    with np.errstate(all="ignore"):  # a non-finite result is found by the caller's sum
        for i in range(0, len(x), step):
            t = wide[:min(step, len(x) - i)]
            np.copyto(t, x[i:i + len(t)])  # widened first: the product is a float64 one
            if w != 1.0:
                np.multiply(t, w, out=t)
            dst = acc[i:i + len(t)]
            np.add(dst, t, out=dst)


SCRATCH = 1 << 18  # elements of float64 scratch per piece of weighted_sum (2 MiB)


def weighted_sum(values: Iterable, weights: Sequence[float]) -> np.ndarray:
    """``sum_i weights[i] * values[i]`` as a float64 array of their common shape, added in
    order with :func:`axpy` (the merger's arithmetic). ``values``: numpy arrays or CPU torch
    tensors of one shape (bf16 and fp16 are widened exactly), taken one at a time, so a
    generator that reads each when asked keeps one input in memory."""
    import numpy as np

    acc = wide = shape = None
    for v, w in zip(values, weights, strict=True):
        x = _flat_float(v)
        if acc is None:
            shape = tuple(v.shape)
            acc = np.zeros(x.size, dtype=np.float64)
            wide = np.empty(min(SCRATCH, max(x.size, 1)), dtype=np.float64)
        elif tuple(v.shape) != shape:
            raise MergeError(f"weighted sum: a value of shape {tuple(v.shape)}, the first's is "
                             f"{shape}")
        axpy(acc, x, w, wide)
        v = x = None  # released before the next value is made
    if acc is None:
        raise MergeError("weighted sum of nothing")
    return acc.reshape(shape)


def _flat_float(v) -> np.ndarray:
    """``v`` (numpy array or torch tensor) as a flat float32 or float64 numpy array, without a
    copy when it already is one."""
    import numpy as np

    if not isinstance(v, np.ndarray):  # a torch tensor
        import torch

        v = v.detach()
        if v.dtype not in (torch.float32, torch.float64):
            v = v.to(torch.float32)  # bf16 and fp16 widen exactly
        v = v.cpu().numpy()
    elif v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float32)
    return v.reshape(-1)


def _check_n(n: int) -> None:
    if n < 1:
        raise MergeError(f"need at least one checkpoint to merge, got {n}")
