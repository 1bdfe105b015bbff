"""The memory plan of --dry-run and parallel.device_memory: partitioned parts shrink as
1/world, the suggested changes do fit, and an impossible plan is one line, exit 2, before any
rank starts. (How close the plan is to measured CPU runs: bench/memory_plan_check.py.)"""

from __future__ import annotations

import dataclasses

import pytest
from support.runs import MOE_RECIPE, REPO, run_cli

from moe_merge.config.deepspeed import build_ds_config
from moe_merge.config.recipe import load_recipe, parse_size
from moe_merge.errors import ConfigError
from moe_merge.training import memory_plan as mp

PAPER = REPO / "recipes" / "paper"
MOE_13B = str(PAPER / "moe_1.3b_13b.yaml")


def shapes_and_layout(recipe: str, overrides=(), world: int | None = None):
    cfg = load_recipe(recipe, list(overrides))
    world = world or cfg.parallel.world_size or 2
    ds = build_ds_config(cfg, world)
    lay = mp.Layout.of(cfg, world, ds)
    return mp.model_shapes(cfg, lay.persistence_threshold), lay


def test_sizes():
    assert parse_size("80GB", "k") == 80 * 10**9
    assert parse_size("80GiB", "k") == 80 * 2**30
    assert parse_size("1.5 tb", "k") == int(1.5e12)
    assert parse_size("512MiB", "k") == 512 * 2**20 and parse_size("4096", "k") == 4096
    for bad in ("80 gigs", "", "-3GB", "0GB"):
        with pytest.raises(ConfigError, match="'k'"):
            parse_size(bad, "k")


def test_counts_are_the_models():
    from moe_merge.training.model import count_params

    cfg = load_recipe(MOE_13B, [])
    s, _ = shapes_and_layout(MOE_13B)
    counts = count_params(cfg.model, cfg.data.vocab_size)
    assert s.dense + s.expert == counts.total and s.expert == counts.expert
    assert 0 < s.small_dense < s.dense and s.largest_layer * cfg.model.num_layers < counts.total


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_partitioned_parts_shrink_as_one_over_the_world(stage):
    """Exact algebra: what ZeRO partitions (masters and moments; gradients from stage 2;
    parameters at stage 3) times the world size is the same at any world size."""
    engine = f"gpu_zero{stage}.json" if stage > 1 else "''"
    s, lay = shapes_and_layout(MOE_13B, [f"parallel.zero_stage={stage}",
                                         f"parallel.ds_config={engine}"])
    per = {w: mp.plan(s, dataclasses.replace(lay, world=w, ep_size=8)) for w in (8, 64, 512)}
    for w, mem in per.items():
        assert abs(mem.moments * w - per[8].moments * 8) <= 8 * w  # integer division only
        if stage >= 2:
            assert abs(mem.grads * w - per[8].grads * 8) <= 8 * w
    assert per[512].model_states < per[64].model_states < per[8].model_states
    if stage < 3:  # the module itself is whole on every rank: parameters do not shrink
        assert per[512].params == per[8].params


def test_checkpointing_and_smaller_micro_batches_need_less():
    s, lay = shapes_and_layout(MOE_13B, ["model.activation_checkpointing=false"])
    full = mp.plan(s, lay).activations
    ckpt = mp.plan(s, dataclasses.replace(lay, checkpointing=True)).activations
    half = mp.plan(s, dataclasses.replace(lay, micro_batch=lay.micro_batch // 2)).activations
    assert ckpt < full / 2 and half * 2 == full


def test_the_changes_offered_do_fit():
    s, lay = shapes_and_layout(MOE_13B, ["model.activation_checkpointing=false"])
    need = mp.plan(s, lay).peak
    device = int((need / 2 + mp.HEADROOM_FIXED) / (1 - mp.HEADROOM_FRACTION))
    verdict = mp.fit(s, lay, device, global_batch=1024)
    assert not verdict.fits and verdict.options
    assert verdict.options[0][0] == "model.activation_checkpointing=true"
    for change, mem in verdict.options:
        assert mem.peak <= verdict.usable < need, change
        changed = ["model.activation_checkpointing=false", *change.split()]
        cfg = load_recipe(MOE_13B, changed)  # each is a valid recipe
        again = mp.plan(*shapes_and_layout(MOE_13B, changed))
        assert again.peak == mem.peak and cfg.parallel.device_memory == ""
    assert mp.fit(s, lay, 4 * need, global_batch=1024).fits


def test_dry_run_shows_the_plan_and_the_verdict():
    proc = run_cli(["moe-merge", "dry-run", MOE_13B, "--device-memory", "80GB"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("parameters", "gradients", "fp32 masters", "Adam moments", "activations",
                "start-up peak", "activation checkpointing off: activations"):
        assert row in out, row
    assert "device memory     80GB: fits" in out
    proc = run_cli(["moe-merge", "dry-run", MOE_13B, "--device-memory", "20GB"])
    assert proc.returncode == 0 and "does NOT fit" in proc.stdout and \
        "parallel.micro_batch=" in proc.stdout


@pytest.mark.parametrize("how", ["dry-run", "launch"])
def test_an_impossible_plan_is_one_line_before_any_rank_starts(tmp_path, how):
    args = [MOE_13B, "parallel.device_memory=8GB", f"output_dir={tmp_path}"]
    if how == "dry-run":
        proc = run_cli(["moe-merge", "dry-run", *args])
    else:  # the launcher's own check, as ./launch/train.sh runs it before starting the ranks
        proc = run_cli(["bash", str(REPO / "launch" / "train.sh"), *args])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "'parallel.device_memory'" in err[0] and "at any micro batch" in \
        err[0] and MOE_13B in err[0], proc.stderr
    assert not any(tmp_path.iterdir())
    if how == "launch":
        assert "launcher" not in proc.stdout + proc.stderr  # no rank was started


def test_bad_device_memory_and_bf16_without_zero_name_the_key():
    with pytest.raises(ConfigError, match="'parallel.device_memory'"):
        load_recipe(MOE_RECIPE, ["parallel.device_memory=lots"])
    with pytest.raises(ConfigError, match="'parallel.precision'.*zero_stage 1, 2 or 3"):
        load_recipe(MOE_RECIPE, ["model.arch=qwen3", "parallel.ep_size=1",
                                 "parallel.zero_stage=0", "parallel.precision=bf16"])
