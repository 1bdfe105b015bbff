"""Run-directory bookkeeping: paths, sidecars, tag discovery, keep-last-k pruning, checkpoint
client state, load statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_merge.errors import CheckpointError, ConfigError
from moe_merge.training.metrics import expert_load_stats
from moe_merge.training.run_dir import Progress, RunDir, list_tags


def make_tags(run: RunDir, steps, latest) -> RunDir:
    for s in steps:
        run.tag_dir(s).mkdir(parents=True)
        run.write_sidecar(s, {"tokens": s * 10, "lr": 1e-3, "train_loss": 1.0})
    (run.checkpoints / "latest").write_text(f"global_step{latest}")
    return run


def test_sidecar_round_trip_and_tag_listing(tmp_path):
    run = make_tags(RunDir(tmp_path), [10, 2, 30], latest=30)
    (run.checkpoints / "global_stepX").mkdir()  # not a tag
    (run.checkpoints / "global_step7").write_text("")  # a file, not a tag
    assert run.steps() == [2, 10, 30] == [s for s, _ in list_tags(tmp_path / "checkpoints")]
    assert run.tags()[0] == (2, tmp_path / "checkpoints" / "global_step2")
    assert run.sidecar(10) == {"step": 10, "tokens": 100, "lr": 1e-3, "train_loss": 1.0}
    assert run.sidecar(7) is None
    assert run.latest() == "global_step30"
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temp files
    assert RunDir(tmp_path / "new").steps() == [] and RunDir(tmp_path / "new").latest() is None
    (run.checkpoints / "latest").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="not one directory name"):
        run.latest()


def test_paths_and_the_files_that_describe_a_run(tmp_path):
    class Config:  # what the trainer hands over: a transformers config
        def save_pretrained(self, d):
            Path(d).mkdir()
            (Path(d) / "config.json").write_text('{"model_type": "x"}')

    run = RunDir(tmp_path / "r")
    assert (run.recipe, run.ds_config, run.hf, run.checkpoints, run.tb, run.metrics) == tuple(
        tmp_path / "r" / n for n in ("recipe.yaml", "ds_config.json", "hf", "checkpoints", "tb",
                                     "metrics.jsonl"))
    assert run.recovery_dir(5, 2) == tmp_path / "r" / "recovery" / "spike5_attempt2"
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (run.root / "hf").mkdir(parents=True)
    (run.root / "hf" / "stale.txt").write_text("")  # hf/ is replaced whole
    run.describe("seed: 1\n", {"train_batch_size": 4}, Config(), tok)
    assert run.recipe.read_text() == "seed: 1\n"
    assert json.loads(run.ds_config.read_text()) == {"train_batch_size": 4}
    assert sorted(p.name for p in run.hf.iterdir()) == ["config.json", "tokenizer.json"]
    assert json.loads(run.write_json("fork.json", {"step": 4}).read_text()) == {"step": 4}
    assert sorted(p.name for p in run.root.iterdir()) == ["ds_config.json", "fork.json", "hf",
                                                           "recipe.yaml"]


def test_keep_last_k_prunes_oldest_and_never_latest(tmp_path):
    run = make_tags(RunDir(tmp_path), [1, 2, 3, 4, 5], latest=5)
    removed = run.prune(keep_last=2)
    assert [p.name for p in removed] == ["global_step1", "global_step2", "global_step3"]
    assert run.steps() == [4, 5]
    assert run.prune(keep_last=0) == []  # 0 keeps all


def test_prune_keeps_latest_even_if_older(tmp_path):
    run = make_tags(RunDir(tmp_path), [1, 2, 3], latest=1)
    run.prune(keep_last=1)
    assert run.steps() == [1, 3]


def test_progress_round_trips_through_the_client_state(tmp_path):
    p = Progress(12, 3)
    assert p.client_state() == {"moe_merge": {"step": 12, "data_offset": 3}}
    assert Progress.from_client_state(p.client_state(), "train.resume", tmp_path) == p
    old = {"moe_merge": {"step": 4}}  # written before data offsets existed
    assert Progress.from_client_state(old, "train.resume", tmp_path) == Progress(4, 0)
    for bad in (None, {}, {"moe_merge": {"step": -1}}, {"moe_merge": {"step": 2.0}},
                {"moe_merge": {"step": True}}, {"moe_merge": {"step": 2, "data_offset": "1"}}):
        with pytest.raises(ConfigError, match=f"key 'train.fork_from': {tmp_path}: no moe_merge"):
            Progress.from_client_state(bad, "train.fork_from", tmp_path)


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
    MetricsLogger(path, engine=None, enabled=True).truncate_after(5)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
