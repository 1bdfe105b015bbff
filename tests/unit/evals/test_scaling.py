"""The Tissue et al. annealing law: areas by hand, and the fit recovering known parameters."""

from __future__ import annotations

import numpy as np
import pytest

from moe_merge.evals.scaling import LawParams, areas, fit, predict


def wsd(n: int, warmup: int, decay_from: int, peak: float = 1e-3, shape: str = "1-sqrt"):
    lrs = []
    for s in range(n):
        if s < warmup:
            lrs.append(peak * (s + 1) / warmup)
        elif s < decay_from:
            lrs.append(peak)
        else:
            p = (s - decay_from + 1) / (n - decay_from)
            lrs.append(peak * (1 - np.sqrt(p) if shape == "1-sqrt" else 1 - p))
    return lrs


def test_areas_follow_the_definition():
    lrs = [1.0, 1.0, 0.5, 0.25]
    s1, s2 = areas(lrs, lam=0.5)
    assert s1.tolist() == [1.0, 2.0, 2.5, 2.75]
    m = [0.0, 0.0, 0.5, 0.5 * 0.5 + 0.25]  # m_i = lam m_(i-1) + (eta_(i-1) - eta_i)
    assert s2.tolist() == pytest.approx(np.cumsum(m).tolist())


def test_fit_recovers_known_parameters_from_a_trunk_and_one_decay():
    true = LawParams(L0=2.1, A=0.9, alpha=0.45, C=60.0)
    trunk = wsd(3000, 100, 3000)  # warmup then constant
    decay = wsd(1500, 100, 1200)  # the same run with a short 1-sqrt decay from step 1200
    steps_t = list(range(50, 3000, 25))
    steps_d = list(range(1200, 1500, 10))
    curves = [(trunk, steps_t, predict(true, trunk, steps_t)),
              (decay, steps_d, predict(true, decay, steps_d))]
    got = fit(curves)
    assert got.alpha == pytest.approx(true.alpha, rel=1e-4)
    assert got.L0 == pytest.approx(true.L0, rel=1e-4)
    assert got.A == pytest.approx(true.A, rel=1e-4)
    assert got.C == pytest.approx(true.C, rel=1e-4)
    assert got.rmse < 1e-8
    # ... and predicts an unseen branch: a linear decay from step 2000
    branch = wsd(2600, 100, 2000, shape="linear")
    np.testing.assert_allclose(predict(got, branch), predict(true, branch), rtol=1e-5)


def test_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    true = LawParams(L0=3.0, A=1.5, alpha=0.3, C=40.0)
    trunk, decay = wsd(2000, 50, 2000), wsd(1000, 50, 800)
    st, sd = list(range(20, 2000, 10)), list(range(800, 1000, 5))
    noisy = [(lr, s, predict(true, lr, s) + rng.normal(0, 0.01, len(s)))
             for lr, s in ((trunk, st), (decay, sd))]
    got = fit(noisy)
    assert abs(got.alpha - true.alpha) < 0.05
    assert got.rmse == pytest.approx(0.01, rel=0.2)


def test_fit_refuses_too_few_or_bad_points():
    lrs = wsd(100, 10, 100)
    with pytest.raises(ValueError, match="at least 4"):
        fit([(lrs, [10, 20, 30], [3.0, 2.9, 2.8])])
    with pytest.raises(ValueError, match="outside"):
        fit([(lrs, [10, 20, 30, 200], [3.0, 2.9, 2.8, 2.7])])
    with pytest.raises(ValueError, match="finite"):
        fit([(lrs, [10, 20, 30, 40], [3.0, float("nan"), 2.8, 2.7])])
