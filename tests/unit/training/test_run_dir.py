"""Run-directory bookkeeping: sidecars, tag discovery, keep-last-k pruning, load statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_merge.training import run_dir as ckpt
from moe_merge.training.metrics import expert_load_stats


def make_tags(root, steps, latest):
    for s in steps:
        (root / f"global_step{s}").mkdir(parents=True)
        ckpt.write_sidecar(root, s, {"tokens": s * 10, "lr": 1e-3, "train_loss": 1.0})
    (root / "latest").write_text(f"global_step{latest}")


def test_sidecar_round_trip_and_tag_listing(tmp_path):
    make_tags(tmp_path, [10, 2, 30], latest=30)
    (tmp_path / "global_stepX").mkdir()  # not a tag
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [2, 10, 30]
    meta = ckpt.read_sidecar(tmp_path / "global_step10")
    assert meta == {"step": 10, "tokens": 100, "lr": 1e-3, "train_loss": 1.0}
    assert ckpt.step_of_tag_dir(tmp_path / "global_step30") == 30
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temp files


def test_keep_last_k_prunes_oldest_and_never_latest(tmp_path):
    make_tags(tmp_path, [1, 2, 3, 4, 5], latest=5)
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["global_step1", "global_step2", "global_step3"]
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [4, 5]
    assert ckpt.prune(tmp_path, keep_last=0) == []  # 0 keeps all


def test_prune_keeps_latest_even_if_older(tmp_path):
    make_tags(tmp_path, [1, 2, 3], latest=1)
    ckpt.prune(tmp_path, keep_last=1)
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [1, 3]


def test_expert_load_stats():
    balanced = expert_load_stats(torch.full((2, 8), 5.0))
    assert balanced["moe/load_entropy"] == pytest.approx(1.0)
    assert balanced["moe/load_max_over_mean"] == pytest.approx(1.0)
    starved = torch.tensor([[10.0, 0, 0, 0], [5.0, 5.0, 0, 0]])
    s = expert_load_stats(starved)
    assert s["moe/load_entropy"] == pytest.approx((0 + math.log(2) / math.log(4)) / 2)
    assert s["moe/load_max_over_mean"] == pytest.approx((4 + 2) / 2)


def test_metrics_truncate_after_resume(tmp_path):
    from moe_merge.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 8)))
    MetricsLogger(tmp_path, engine=None, enabled=True).truncate_after(5)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
