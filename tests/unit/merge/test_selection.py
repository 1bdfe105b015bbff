"""Selection: one value for which checkpoints a merge takes and with what weights."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from moe_merge.checkpoint.discover import Tag
from moe_merge.errors import MergeError
from moe_merge.merge.selection import Selection, add_arguments
from moe_merge.merge.strategies import STRATEGIES, ema_weights, wma_weights

STEPS = [20, 40, 60, 80, 100, 120, 140]


def test_last_every_tags():
    assert Selection(last=3).choose(STEPS) == [100, 120, 140]
    assert Selection(every=2).choose(STEPS) == [20, 60, 100, 140]  # counted back from the newest
    assert Selection(every=2, last=3).choose(STEPS) == [60, 100, 140]
    assert Selection(tags=[40, 20]).choose(STEPS) == [20, 40]
    assert Selection(tags=["global_step40", "20", 40]).tags == (20, 40)
    assert Selection(tags="global_step20,global_step40,").tags == (20, 40)
    assert Selection().choose(list(reversed(STEPS))) == STEPS
    with pytest.raises(MergeError, match="--last 8: only 7 checkpoints available$"):
        Selection(last=8).choose(STEPS)
    with pytest.raises(MergeError, match="only 4 checkpoints available at --every 2"):
        Selection(every=2, last=5).choose(STEPS)
    with pytest.raises(MergeError, match="no checkpoint global_step50 \\(have global_step20, "):
        Selection(tags=[50]).choose(STEPS)
    with pytest.raises(MergeError, match="no checkpoints found"):
        Selection().choose([])
    with pytest.raises(MergeError, match="two checkpoints at step 20"):
        Selection().choose([20, 20])


def test_allow_fewer_takes_what_there_is():
    """The window of a merge along training: at most ``last``, fewer early on."""
    window = Selection(every=2, last=3)
    assert window.choose(STEPS, allow_fewer=True) == [60, 100, 140]
    assert Selection(every=3, last=10).choose(STEPS, allow_fewer=True) == [20, 80, 140]
    assert window.choose([20], allow_fewer=True) == [20]
    assert window.choose([], allow_fewer=True) == []


def test_choose_keeps_the_objects_it_is_given():
    tags = [Tag(Path(f"/r/checkpoints/global_step{s}"), s, None, {}) for s in (30, 10, 20)]
    chosen = Selection(last=2).choose(tags)
    assert [t.step for t in chosen] == [20, 30] and chosen[0] is tags[2]


@pytest.mark.parametrize("kwargs, msg", [
    ({"strategy": "median"}, "--strategy: unknown strategy 'median' \\(choose from sma, wma, "
                             "ema\\)"),
    ({"strategy": "ema"}, "--strategy ema needs --alpha"),
    ({"strategy": "ema", "alpha": 1.5}, "--alpha must be in \\(0, 1\\], got 1.5"),
    ({"last": 0}, "--last must be >= 1, got 0"),
    ({"every": -1}, "--every must be >= 1, got -1"),
    ({"last": 2.5}, "--last must be >= 1, got 2.5"),
    ({"weights": [1.0, -0.5]}, "--weights: weight -0.5 is negative"),
    ({"weights": [0, 0]}, "--weights: all weights are zero"),
    ({"weights": []}, "--weights: no weights given"),
    ({"tags": ["step7"]}, "--tags: 'step7' is not a tag like global_step200"),
    ({"tags": ","}, "--tags: no tags given"),
])
def test_bad_options_are_refused_when_made(kwargs, msg):
    with pytest.raises(MergeError, match=msg) as e:
        Selection(**kwargs)
    assert "\n" not in str(e.value)


def test_weights_for():
    assert Selection().weights_for(4) == [0.25] * 4
    assert Selection("wma").weights_for(3) == wma_weights(3)
    assert Selection("ema", alpha=0.2).weights_for(3) == ema_weights(3, 0.2)
    assert Selection(weights=[1, 1, 2]).weights_for(3) == [0.25, 0.25, 0.5]
    with pytest.raises(MergeError, match="3 weights given for 2 checkpoints"):
        Selection(weights=[1, 1, 1]).weights_for(2)


def test_alpha_is_kept_only_where_it_is_used():
    """A recipe carries an alpha for every strategy: an SMA with it is the plain SMA."""
    assert Selection("sma", alpha=0.2) == Selection("sma")
    assert Selection("ema", alpha=0.2, weights=[1, 2]).alpha is None  # explicit weights win
    ema = Selection("ema", alpha=0.2)
    assert (ema.kind, ema.alpha, ema.describe()) == ("ema", 0.2, "ema alpha=0.2")
    explicit = Selection(weights=(1, 3))
    assert (explicit.kind, explicit.weights, explicit.describe()) == ("weights", (1.0, 3.0),
                                                                      "explicit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ema.last = 3


def test_from_args_reads_the_options_add_arguments_declares():
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    action = next(a for a in ap._actions if a.dest == "strategy")
    assert action.choices == list(STRATEGIES)
    args = ap.parse_args(["--strategy", "ema", "--alpha", "0.1", "--every", "2", "--last", "3"])
    assert Selection.from_args(args) == Selection("ema", alpha=0.1, every=2, last=3)
    args = ap.parse_args(["--weights", "1,2,3", "--tags", "global_step8,9,10"])
    assert Selection.from_args(args) == Selection(weights=[1, 2, 3], tags=[8, 9, 10])
    assert Selection.from_args(ap.parse_args(["--tags", ""])) == Selection()
    with pytest.raises(SystemExit):
        ap.parse_args(["--weights", "1,x"])


def test_the_cli_and_the_recipes_list_the_table():
    from moe_merge.cli import build_parser
    from moe_merge.config.recipe import load_recipe
    from moe_merge.errors import ConfigError

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("merge", "analyze"):
        parser = sub.choices[command]
        assert next(a for a in parser._actions if a.dest == "strategy").choices == list(STRATEGIES)
    for key in ("pma_monitor.strategy", "stability.pma_strategy"):
        with pytest.raises(ConfigError, match=f"key '{key}'.*not one of sma, wma, ema"):
            load_recipe("recipes/moe_tiny.yaml", ["pma_monitor.enabled=true", f"{key}=median"])
