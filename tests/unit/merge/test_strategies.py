"""Merge strategies and checkpoint selection as pure functions; shard planning; sizes."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moe_merge.errors import MergeError
from moe_merge.merge.strategies import (
    ema_recursive,
    ema_weights,
    normalize,
    select,
    sma_weights,
    strategy_weights,
    wma_weights,
)
from moe_merge.merge.writer import parse_size, plan_shards


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 15])
@pytest.mark.parametrize("strategy, alpha", [("sma", None), ("wma", None), ("ema", 0.1),
                                             ("ema", 0.2), ("ema", 1.0)])
def test_weights_sum_to_one_and_are_positive(n, strategy, alpha):
    w = strategy_weights(strategy, n, alpha)
    assert len(w) == n and math.isclose(math.fsum(w), 1.0, rel_tol=0, abs_tol=1e-12)
    assert all(x >= 0 for x in w)


def test_sma_and_wma_formulas():
    assert sma_weights(4) == [0.25] * 4
    assert wma_weights(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert wma_weights(3)[-1] > wma_weights(3)[0]  # newer weighs more


@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_ema_unrolled_weights_equal_the_recursion(alpha, n):
    rng = random.Random(n)
    values = [rng.uniform(-3, 3) for _ in range(n)]
    unrolled = sum(w * v for w, v in zip(ema_weights(n, alpha), values))
    assert unrolled == pytest.approx(ema_recursive(values, alpha), rel=1e-12, abs=1e-12)
    # And the weights are the recursion applied to the unit vectors.
    for i in range(n):
        unit = [1.0 if j == i else 0.0 for j in range(n)]
        assert ema_weights(n, alpha)[i] == pytest.approx(ema_recursive(unit, alpha), abs=1e-15)


def test_ema_paper_example_oldest_gets_the_remainder():
    # N = 3, alpha = 0.2: M1 (1-a)^2 = 0.64, M2 a(1-a) = 0.16, M3 a = 0.2
    assert ema_weights(3, 0.2) == pytest.approx([0.64, 0.16, 0.2])


@pytest.mark.parametrize("bad, msg", [
    ([1.0, -0.5], "negative"), ([0.0, 0.0], "all weights are zero"), ([1.0, float("nan")],
                                                                        "not finite"), ([], "no weights")])
def test_explicit_weights_are_checked(bad, msg):
    with pytest.raises(MergeError, match=msg):
        normalize(bad)


def test_explicit_weights_are_normalised_and_counted():
    assert strategy_weights("sma", 3, weights=[1, 1, 2]) == [0.25, 0.25, 0.5]
    with pytest.raises(MergeError, match="3 weights given for 2 checkpoints"):
        strategy_weights("sma", 2, weights=[1, 1, 1])
    with pytest.raises(MergeError, match="needs --alpha"):
        strategy_weights("ema", 3)
    with pytest.raises(MergeError, match="--alpha must be in"):
        strategy_weights("ema", 3, alpha=1.5)


def test_selection_last_every_tags():
    steps = [20, 40, 60, 80, 100, 120, 140]
    assert select(steps, last=3) == [100, 120, 140]
    assert select(steps, every=2) == [20, 60, 100, 140]  # counted back from the newest
    assert select(steps, every=2, last=3) == [60, 100, 140]
    assert select(steps, tags=[40, 20]) == [20, 40]
    assert select(steps) == steps
    with pytest.raises(MergeError, match="--last 8: only 7 checkpoints available"):
        select(steps, last=8)
    with pytest.raises(MergeError, match="only 4 checkpoints available at --every 2"):
        select(steps, every=2, last=5)
    with pytest.raises(MergeError, match="no checkpoint global_step50"):
        select(steps, tags=[50])
    with pytest.raises(MergeError, match="--last must be >= 1"):
        select(steps, last=0)


def test_shard_plan_respects_the_size_and_keeps_order():
    specs = [(f"t{i}", (10, 10), torch.float32) for i in range(10)]  # 400 bytes each
    shards = plan_shards(specs, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert [n for s in shards for n in s] == [f"t{i}" for i in range(10)]
    assert plan_shards([("big", (1000,), torch.float32)], 100) == [["big"]]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5 gb") == 1_500_000_000
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(MergeError, match="--max-shard-size"):
            parse_size(bad)


def test_hf_names_are_cached_per_config_and_equal_a_fresh_build(tmp_path, monkeypatch):
    from transformers import Qwen3MoeConfig

    from moe_merge.checkpoint import names

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg_dir = tmp_path / "hf"
    Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   num_experts=4, num_experts_per_tok=2).save_pretrained(cfg_dir)
    fresh = names._hf_expected(cfg_dir)
    assert "model.layers.1.mlp.experts.gate_up_proj" in fresh[0]
    assert names.hf_expected(cfg_dir) == fresh  # computed, then stored
    assert len(list((tmp_path / "cache" / "moe-merge" / "hf_names").glob("*.json"))) == 1
    monkeypatch.setattr(names, "_hf_expected", lambda d: pytest.fail("cache not used"))
    assert names.hf_expected(cfg_dir) == fresh
    (cfg_dir / "config.json").write_text((cfg_dir / "config.json").read_text().replace(
        '"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(pytest.fail.Exception):  # another config is another key
        names.hf_expected(cfg_dir)
