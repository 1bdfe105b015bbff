"""The annealing scaling law of Tissue et al. 2024 (arXiv 2408.11029), as pure functions.

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

S1 is the forward area, the sum of the learning rates of steps 0..s; S2 the annealing area, the
sum of the momenta m_i = lam * m_(i-1) + (eta_(i-1) - eta_i) (m_0 = 0, lam ~ 0.999), which grows
while the LR decays. L0, A, alpha and C are fitted to observed (step, loss) points of one or more
runs with known LR schedules; the fitted law then predicts the loss of any other schedule, e.g.
an annealing branch from a fork point, without training it.

The fit: for a fixed alpha the law is linear in (L0, A, C), so each alpha gets an exact least-
squares solve (with A, C >= 0); alpha itself is found by a grid over [1e-3, 3] (log-spaced)
refined by golden-section search. No scipy needed, and no starting guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LAMBDA = 0.999


@dataclass(frozen=True)
class LawParams:
    L0: float
    A: float
    alpha: float
    C: float
    lam: float = LAMBDA
    rmse: float = float("nan")  # of the fit, on the points it was fitted to

    def to_dict(self) -> dict:
        return asdict(self)


def areas(lrs: Sequence[float], lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each step: ``S1[s] = sum_{i<=s} lr_i``, ``S2[s] = sum_{i<=s} m_i``."""
    eta = np.asarray(lrs, dtype=np.float64)
    if eta.ndim != 1 or len(eta) == 0:
        raise ValueError("lrs: need a non-empty 1-D sequence of learning rates")
    s1 = np.cumsum(eta)
    m = np.zeros_like(eta)
    for i in range(1, len(eta)):
        m[i] = lam * m[i - 1] + (eta[i - 1] - eta[i])
    return s1, np.cumsum(m)


def predict(p: LawParams, lrs: Sequence[float], steps: Sequence[int] | None = None) -> np.ndarray:
    """Loss predicted after each step in ``steps`` (default: every step) of schedule ``lrs``."""
    s1, s2 = areas(lrs, p.lam)
    idx = np.arange(len(s1)) if steps is None else np.asarray(steps, dtype=np.int64)
    return p.L0 + p.A * s1[idx] ** (-p.alpha) - p.C * s2[idx]


def _design(s1: np.ndarray, s2: np.ndarray, alpha: float) -> np.ndarray:
    return np.stack([np.ones_like(s1), s1 ** (-alpha), -s2], axis=1)


def _solve(s1, s2, y, alpha) -> tuple[np.ndarray, float]:
    """Least squares for (L0, A, C) at fixed alpha with A >= 0 and C >= 0 (the law's signs:
    loss falls with the forward area and with annealing), by trying each active set."""
    X = _design(s1, s2, alpha)
    best, best_err = None, math.inf
    for free in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        sub, *_ = np.linalg.lstsq(X[:, free], y, rcond=None)
        coef = np.zeros(3)
        coef[list(free)] = sub
        if coef[1] < 0 or coef[2] < 0:
            continue
        r = X @ coef - y
        err = float(r @ r)
        if err < best_err:
            best, best_err = coef, err
    return best, best_err


def fit(curves: Sequence[tuple[Sequence[float], Sequence[int], Sequence[float]]],
        lam: float = LAMBDA) -> LawParams:
    """Fit the law to observed losses.

    ``curves``: one ``(lrs, steps, losses)`` per run: the run's LR at every step from 0, and the
    loss observed after each step in ``steps``. Several runs (e.g. the constant-LR trunk and one
    short decay) share the parameters. Steps must be >= 1 so that S1 > 0.
    """
    s1s, s2s, ys = [], [], []
    for lrs, steps, losses in curves:
        s1, s2 = areas(lrs, lam)
        idx = np.asarray(steps, dtype=np.int64)
        if len(idx) != len(losses):
            raise ValueError("fit: steps and losses differ in length")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(s1)):
            raise ValueError("fit: a step lies outside its LR schedule")
        s1s.append(s1[idx])
        s2s.append(s2[idx])
        ys.append(np.asarray(losses, dtype=np.float64))
    s1, s2, y = np.concatenate(s1s), np.concatenate(s2s), np.concatenate(ys)
    if len(y) < 4:
        raise ValueError(f"fit: need at least 4 observed losses, got {len(y)}")
    if not np.all(np.isfinite(y)) or np.any(s1 <= 0):
        raise ValueError("fit: losses must be finite and the LR area positive at every point")

    def sse(a: float) -> float:
        return _solve(s1, s2, y, a)[1]

    grid = np.exp(np.linspace(math.log(1e-3), math.log(3.0), 121))
    errs = [sse(a) for a in grid]
    k = int(np.argmin(errs))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2  # golden-section search on [lo, hi]
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = sse(a), sse(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = sse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = sse(b)
    alpha = a if fa < fb else b
    coef, err = _solve(s1, s2, y, alpha)
    return LawParams(L0=float(coef[0]), A=float(coef[1]), alpha=float(alpha), C=float(coef[2]),
                     lam=lam, rmse=math.sqrt(err / len(y)))
