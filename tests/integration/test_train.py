"""2-rank gloo runs: train, save, log, resume, fork (the launcher path itself: test_launch.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from support.runs import (
    MOE_RECIPE,
    REPO,
    RUNS,
    TINY_MOE,
    launch,
    read_metrics,
    tb_tags,
    train_losses,
)

from moe_merge.training.metrics import MOE_SCALARS, TRAIN_SCALARS, VAL_SCALARS


def check_run(run_dir: Path, moe: bool, zero_stage: int) -> None:
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step8"
    for step in (2, 4, 6, 8):
        tag = ckpts / f"global_step{step}"
        meta = json.loads((tag / "meta.json").read_text())
        assert meta["step"] == step and meta["tokens"] == step * 256
        assert math.isfinite(meta["train_loss"]) and meta["lr"] > 0
        files = {p.name for p in tag.iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files, files
        if zero_stage == 3:
            assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in files
        else:
            assert "mp_rank_00_model_states.pt" in files
        if moe and zero_stage < 3:  # AutoEP writes one file per global expert
            assert "layer_1_expert_3_mp_rank_00_model_states.pt" in files
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "ds_config.json").exists()
    hf = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf["model_type"] == ("qwen3_moe" if moe else "qwen3")
    assert (run_dir / "hf" / "tokenizer.json").exists()
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1] - 0.3, losses  # it learns
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "val/loss" in m] == [4, 8]
    scalars, histos = tb_tags(run_dir / "tb")
    want = set(TRAIN_SCALARS) | set(VAL_SCALARS) | (set(MOE_SCALARS) if moe else set())
    assert want <= scalars, want - scalars
    if moe:
        assert "moe/expert_load" in histos
        entropy = [m["moe/load_entropy"] for m in metrics if "moe/load_entropy" in m]
        assert all(0 < e <= 1 for e in entropy)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_moe_expert_parallel_trains_and_saves(zero_stage, trained):
    check_run(trained(f"moe_z{zero_stage}"), moe=True, zero_stage=zero_stage)


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_dense_trains_and_saves(zero_stage, trained):
    check_run(trained(f"dense_z{zero_stage}"), moe=False, zero_stage=zero_stage)


def test_resume_reproduces_the_uninterrupted_losses(trained, tmp_path, data_cache):
    """Interrupt at step 5 (not a checkpoint boundary of the every-2 interval), resume, compare
    every step's loss and the final validation loss with the uninterrupted run (moe_z2)."""
    recipe, overrides = RUNS["moe_z2"]
    common = [*overrides, "name=cut", f"output_dir={tmp_path}", f"data.cache_dir={data_cache}"]
    launch(recipe, [*common, "train.stop_after_steps=5"])
    cut = tmp_path / "cut"
    assert (cut / "checkpoints" / "latest").read_text().strip() == "global_step5"
    assert max(train_losses(cut)) == 5
    launch(recipe, common)  # train.resume=auto
    whole = train_losses(trained("moe_z2"))
    resumed = train_losses(cut)
    assert sorted(resumed) == list(range(1, 9))
    # Same data order, LR and optimizer state: equal up to float rounding of the reduction order
    # (an ulp of fp32 has been seen on one step; weights stay equal, later steps match exactly).
    assert resumed == pytest.approx(whole, rel=1e-6, abs=0)
    val = [m["val/loss"] for m in read_metrics(cut) if m["step"] == 8 and "val/loss" in m]
    val_whole = [m["val/loss"] for m in read_metrics(trained("moe_z2"))
                 if m["step"] == 8 and "val/loss" in m]
    assert val and val == pytest.approx(val_whole, rel=1e-6)


def test_resume_refuses_a_changed_model(trained, tmp_path, data_cache):
    """Resuming a copy of moe_z2 through launch/train.sh with another model stops in one line."""
    from support.runs import run_cli

    recipe, overrides = RUNS["moe_z2"]
    shutil.copytree(trained("moe_z2"), tmp_path / "moe_z2")
    proc = run_cli(["bash", str(REPO / "launch" / "train.sh"), recipe, *overrides, "name=moe_z2",
                    f"output_dir={tmp_path}", f"data.cache_dir={data_cache}",
                    "model.num_layers=3"])
    assert proc.returncode != 0
    assert "model" in proc.stderr and "differs from the run being resumed" in proc.stderr


def test_fork_starts_an_annealing_branch_from_a_checkpoint(trained, tmp_path, data_cache):
    """A branch forked at step 4 with its own decay: its first step sees the parent's weights
    after step 4 (same loss as the parent's step 5), then follows its own schedule."""
    parent = trained("moe_z2")  # its own decay starts at step 7: steps 1-5 see the same LR
    fork_from = parent / "checkpoints" / "global_step4"
    common = [*TINY_MOE, f"data.cache_dir={data_cache}"]
    launch(MOE_RECIPE, [*common, f"output_dir={tmp_path}", "name=branch",
                        f"train.fork_from={fork_from}", "schedule.decay_tokens=1024",
                        "schedule.decay_shape=cosine"])
    branch = tmp_path / "branch"
    losses = train_losses(branch)
    assert sorted(losses) == [5, 6, 7, 8]
    assert losses[5] == train_losses(parent)[5]
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(branch) if "train/lr" in m}
    assert lrs[5] > lrs[6] > lrs[7] > lrs[8]
    assert json.loads((branch / "fork.json").read_text())["step"] == 4
    meta = json.loads((branch / "checkpoints" / "global_step8" / "meta.json").read_text())
    assert meta["phase"] == "decay" and meta["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind, model_type", [
    ("mixtral_z2", "mixtral"),     # AutoEP Mixtral preset
    ("moe_ep1_z2", "qwen3_moe"),   # all experts on every rank
    ("moe_bf16_z2", "qwen3_moe"),  # bf16, fp32 master weights
    ("llama_z0", "llama"),         # plain data parallel
])
def test_other_architectures_and_settings_train(kind, model_type, trained):
    run_dir = trained(kind)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.3, losses
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert json.loads((run_dir / "hf" / "config.json").read_text())["model_type"] == model_type
    assert ds["bf16"]["enabled"] == (kind == "moe_bf16_z2")
    assert (run_dir / "checkpoints" / "global_step8" / "meta.json").exists()
