"""The live PMA monitor without a launch: its window, its weighted sum (the merger's), that the
latest weights come back, and its settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_merge.config.recipe import PMAMonitorConfig, load_recipe
from moe_merge.errors import ConfigError
from moe_merge.merge.strategies import ema_weights, weighted_sum
from moe_merge.training.pma_monitor import PMAMonitor

MOE_RECIPE = "recipes/moe_tiny.yaml"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monitor_merges_its_window_and_restores_the_latest_weights(dtype):
    """Every 2nd checkpoint back from the newest, at most 3, from 2 on: merged with the
    merger's weighted sum, validated, then the latest weights are back bit for bit."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3).to(dtype)
    cfg = PMAMonitorConfig(enabled=True, strategy="ema", alpha=0.3, n=3, interval=2, min_n=2)
    mon = PMAMonitor(module, cfg)
    snaps, results = {}, {}
    merged = {}

    def validate() -> float:
        merged[step] = [p.detach().clone() for p in module.parameters()]
        return float(step)

    for step in range(10, 80, 10):  # checkpoints 10 ... 70
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape).to(dtype))
        mon.snapshot(step)
        snaps[step] = [p.detach().clone() for p in module.parameters()]
        results[step] = mon.evaluate(validate)
        for p, want in zip(module.parameters(), snaps[step]):
            assert torch.equal(p, want)
    assert results[10] is None and results[20] is None  # windows [10] and [20]: below min_n
    assert sorted(merged) == [30, 40, 50, 60, 70]
    assert (results[30]["pma/n"], results[30]["pma/first_step"]) == (2, 10)
    assert (results[70]["pma/n"], results[70]["pma/first_step"]) == (3, 30)
    assert results[70]["pma/val_loss"] == 70.0 and np.isfinite(results[70]["pma/seconds"])
    kept = [s for s, _ in mon.live.snapshots]
    assert kept == [30, 40, 50, 60, 70]  # (n - 1) * interval + 1 kept
    for step, window in ((30, (10, 30)), (70, (30, 50, 70))):
        w = ema_weights(len(window), 0.3)
        for i, got in enumerate(merged[step]):
            want = weighted_sum([snaps[s][i] for s in window], w)
            assert got.dtype == dtype and torch.equal(got, torch.from_numpy(want).to(dtype))
        assert not torch.equal(merged[step][0], snaps[step][0])


@pytest.mark.parametrize("override, key", [
    ("pma_monitor.n=1", "pma_monitor.n"),
    ("pma_monitor.strategy=median", "pma_monitor.strategy"),
    ("pma_monitor.interval=0", "pma_monitor.interval"),
    ("pma_monitor.min_n=1", "pma_monitor.min_n"),
    ("checkpoint.every_tokens=0", "pma_monitor.enabled"),
])
def test_bad_monitor_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_recipe(MOE_RECIPE, ["pma_monitor.enabled=true", override])


