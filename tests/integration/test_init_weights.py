"""Initial weights are a function of (seed, parameter name), whatever the parallel layout: the
gathered global_step0 of runs with different ZeRO stages and expert-parallel sizes are the same
bits, and a ZeRO-3 run draws them inside deepspeed.zero.Init (each rank only its partitions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.merging import safetensors_out
from support.runs import DENSE_RECIPE, MOE_RECIPE, TINY_DENSE, TINY_MOE, launch, run_cli

ONE_STEP = ["checkpoint.save_initial=true", "checkpoint.every_tokens=0", "train.max_tokens=256",
            "schedule.warmup_tokens=0", "logging.val_every=0"]


def initial_weights(tmp: Path, name: str, recipe: str, overrides: list[str]) -> dict:
    """global_step0 of a 1-step run, gathered by moe-merge into logical tensors."""
    launch(recipe, [*overrides, *ONE_STEP, f"output_dir={tmp}", f"name={name}"])
    out = tmp / f"{name}_step0"
    proc = run_cli(["moe-merge", "merge", str(tmp / name), "--tags", "0", "--format",
                    "safetensors", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return safetensors_out(out)


def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", [
    ["parallel.zero_stage=3", "parallel.ep_size=2"],
    ["parallel.zero_stage=2", "parallel.ep_size=2"],
], ids=["z3_ep2", "z2_ep2"])
def test_moe_initial_weights_do_not_depend_on_the_layout(tmp_path, layout):
    reference = initial_weights(tmp_path, "z1_ep1", MOE_RECIPE,
                                [*TINY_MOE, "parallel.zero_stage=1", "parallel.ep_size=1"])
    other = initial_weights(tmp_path, "other", MOE_RECIPE, [*TINY_MOE, *layout])
    assert_same_bits(reference, other)
    experts = [k for k in reference if ".mlp.experts." in k]
    assert experts and all(torch.isfinite(reference[k]).all() for k in reference)
    for k in experts:  # drawn, not left as the zeros or garbage of an unfilled partition
        assert abs(reference[k].std().item() - 0.02) < 0.002, k


def test_dense_zero3_initial_weights_equal_zero0(tmp_path):
    reference = initial_weights(tmp_path, "z0", DENSE_RECIPE,
                                [*TINY_DENSE, "parallel.zero_stage=0"])
    z3 = initial_weights(tmp_path, "z3", DENSE_RECIPE, [*TINY_DENSE, "parallel.zero_stage=3"])
    assert_same_bits(reference, z3)
