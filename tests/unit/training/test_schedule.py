"""LR schedule math (pure functions)."""

from __future__ import annotations

import math

import pytest

from moe_merge.training.schedule import Schedule, decay_factor


def wsd(shape="linear", warmup=10, decay=20, total=100, peak=1.0, min_lr=0.1):
    return Schedule("wsd", peak, min_lr, total, warmup, decay, shape)


def test_warmup_is_linear_to_peak():
    s = wsd()
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_stable_phase_is_constant():
    s = wsd()
    assert {s.lr_at(i) for i in range(10, 80)} == {1.0}
    assert s.phase(5) == "warmup" and s.phase(50) == "stable" and s.phase(80) == "decay"


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_decay_reaches_min_monotonically(shape):
    s = wsd(shape)
    lrs = [s.lr_at(i) for i in range(80, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[0] < 1.0


def test_decay_shapes_midpoint():
    assert decay_factor(0.25, "linear") == pytest.approx(0.75)
    assert decay_factor(0.25, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert decay_factor(0.25, "1-sqrt") == pytest.approx(0.5)


def test_no_decay_means_constant_to_the_end():
    s = wsd(decay=0)
    assert s.lr_at(99) == 1.0 and s.decay_start == 100


def test_cosine_schedule():
    s = Schedule("cosine", 1.0, 0.0, 110, 10, 0, "cosine")
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(59) == pytest.approx(0.5)
    assert s.lr_at(109) == pytest.approx(0.0, abs=1e-12)


def test_from_recipe_converts_tokens_to_steps():
    from support.runs import REPO

    from moe_merge.config.recipe import load_recipe

    cfg = load_recipe(REPO / "tests" / "recipes" / "moe_tiny.yaml",
                      ["schedule.decay_tokens=4.096e4", "schedule.min_lr_ratio=0.1"])
    s = Schedule.from_recipe(cfg)
    assert s.warmup_steps == 20 and s.decay_steps == 10 and s.total_steps == 200
    assert s.lr_at(199) == pytest.approx(0.1 * cfg.train.lr)
