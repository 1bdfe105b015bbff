"""Merge strategies as pure functions, the one weighted sum; shard planning; sizes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from moe_merge.errors import MergeError
from moe_merge.merge.strategies import (
    STRATEGIES,
    axpy,
    ema_recursive,
    ema_weights,
    normalize,
    sma_weights,
    strategy_weights,
    weighted_sum,
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
    ([1.0, -0.5], "negative"), ([0.0, 0.0], "all weights are zero"),
    ([1.0, float("nan")], "not finite"), ([], "no weights")])
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


def test_the_table_lists_every_strategy_with_its_parameter():
    assert list(STRATEGIES) == ["sma", "wma", "ema"]
    assert {k: s.param for k, s in STRATEGIES.items()} == {"sma": None, "wma": None,
                                                          "ema": "alpha"}
    assert STRATEGIES["ema"].weights(3, 0.2) == ema_weights(3, 0.2)
    with pytest.raises(MergeError, match="unknown strategy 'median' \\(choose from sma, wma"):
        strategy_weights("median", 3)


def _reference_sum(values, weights):
    """The merger's arithmetic written out: widen, multiply, add, in input order."""
    acc = np.zeros(values[0].size)
    for v, w in zip(values, weights):
        t = v.reshape(-1).astype(np.float64)
        if w != 1.0:
            t = t * w
        acc = acc + t
    return acc


def test_weighted_sum_is_the_merger_arithmetic_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((3, 5, 7)).astype(np.float32) for _ in range(4)]
    weights = wma_weights(4)
    want = _reference_sum(values, weights)
    got = weighted_sum(values, weights)
    assert got.dtype == np.float64 and got.shape == (3, 5, 7)
    assert np.array_equal(got.reshape(-1), want)  # bit for bit
    tensors = [torch.from_numpy(v) for v in values]
    assert np.array_equal(weighted_sum(iter(tensors), weights), got)  # a generator works too
    # torch's own add_(alpha=) fuses the multiply-add and rounds differently: not used
    acc = torch.zeros(3, 5, 7, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc.add_(t, alpha=w)
    assert not np.array_equal(acc.numpy(), got)


def test_weighted_sum_pieces_and_dtypes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000).astype(np.float32)
    acc = np.zeros(1000)
    axpy(acc, x, 0.3, np.empty(7))  # 7-element pieces, the last one short
    assert np.array_equal(acc, _reference_sum([x], [0.3]))
    bf16 = torch.from_numpy(x).to(torch.bfloat16)  # widened exactly before the sum
    assert np.array_equal(weighted_sum([bf16, bf16], [0.5, 0.5]),
                          weighted_sum([bf16.float().numpy()] * 2, [0.5, 0.5]))
    same = weighted_sum([x] * 3, sma_weights(3))  # N copies merge to themselves
    assert np.array_equal(same.astype(np.float32), x)
    with pytest.raises(MergeError, match="shape"):
        weighted_sum([x, x[:10]], [0.5, 0.5])
    with pytest.raises(MergeError, match="nothing"):
        weighted_sum([], [])
    with pytest.raises(ValueError):
        weighted_sum([x, x], [1.0])


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
