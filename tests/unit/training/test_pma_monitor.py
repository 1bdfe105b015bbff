"""The live PMA monitor: its window, its scalars, that it leaves training untouched, and that its
in-process merge equals `moe-merge merge` + `moe-merge eval` of the same checkpoints."""

from __future__ import annotations

import pytest

from moe_merge.config.recipe import load_recipe
from moe_merge.errors import ConfigError
from moe_merge.training.pma_monitor import window

MOE_RECIPE = "recipes/moe_tiny.yaml"


def test_window_takes_every_kth_checkpoint_back_from_the_newest():
    steps = [20, 40, 60, 80, 100, 120, 140]
    assert window(steps, 3, 1) == [100, 120, 140]
    assert window(steps, 3, 2) == [60, 100, 140]
    assert window(steps, 10, 3) == [20, 80, 140]
    assert window([20], 4, 1) == [20]


@pytest.mark.parametrize("override, key", [
    ("pma_monitor.n=1", "pma_monitor.n"),
    ("pma_monitor.strategy=median", "pma_monitor.strategy"),
    ("pma_monitor.interval=0", "pma_monitor.interval"),
    ("pma_monitor.min_n=1", "pma_monitor.min_n"),
    ("parallel.zero_stage=3", "pma_monitor.enabled"),
    ("checkpoint.every_tokens=0", "pma_monitor.enabled"),
])
def test_bad_monitor_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_recipe(MOE_RECIPE, ["pma_monitor.enabled=true", override])


