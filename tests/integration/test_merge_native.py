"""Checkpoints of a program built on DeepSpeed's native ``deepspeed.moe.layer.MoE`` (per-expert
files, expert-data-parallel optimizer partitions), against the oracle the issue names: the
DeepSpeed engine's own module parameters after ``engine.load_checkpoint`` (fp32 runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.merging import cli, copy_tag, safetensors_out
from support.runs import launch_native

from moe_merge.checkpoint.reader import DSCheckpoint
from moe_merge.merge.merger import OutputOptions, merge

EXPERT = "blocks.1.moe.deepspeed_moe.experts.deepspeed_experts.3.0.weight"  # on EP rank 1


def oracle(run: Path, step: int) -> dict[str, torch.Tensor]:
    """What the engine holds after load_checkpoint: rank 0's parameters + each rank's experts."""
    return safetensors_out(run / "oracle" / f"global_step{step}")


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_native_moe_gather_equals_the_engine_after_load_checkpoint(zero, native_moe):
    run = native_moe(zero)
    for step in (1, 4):
        want = oracle(run, step)
        c = DSCheckpoint(run / "checkpoints" / f"global_step{step}")
        assert (c.zero_stage, c.dp_size, c.ep_size, c.num_experts) == (zero, 2, 2, 4)
        assert c.has_master == (zero > 0)
        assert set(c.params) == set(want) and EXPERT in want
        for name, t in want.items():
            assert torch.equal(c.read(name), t), name
            assert torch.equal(c.read(name, source="module"), t), name
        counts = c.param_counts()
        assert counts["expert"] == 2 * 4 * (2 * 32 * 64 + 64 + 32)
        assert counts["total"] == sum(t.numel() for t in want.values())


def test_native_moe_merges_across_zero_stages(native_moe, tmp_path):
    """ZeRO-1 and ZeRO-2 checkpoints (different partitions) average to the exact midpoint."""
    z1, z2 = native_moe(1), native_moe(2)
    tags = [z1 / "checkpoints" / "global_step4",
            copy_tag(z2 / "checkpoints" / "global_step3", tmp_path, "global_step5")]
    m = merge(tags, tmp_path / "out", output=OutputOptions(fmt="safetensors"), progress=False)
    assert [i["zero_stage"] for i in m["inputs"]] == [1, 2]
    got, a, b = safetensors_out(tmp_path / "out"), oracle(z1, 4), oracle(z2, 3)
    assert set(got) == set(a)
    for name in a:
        assert torch.equal(got[name], ((a[name].double() + b[name].double()) / 2).float()), name


def test_native_moe_cli_and_deepspeed_output_loaded_by_the_engine(native_moe, tmp_path):
    """inspect reports the layout; --format deepspeed output is loaded by a fresh engine
    (engine.load_checkpoint) holding exactly the merged weights, experts included."""
    run = native_moe(2)
    proc = cli("inspect", run, "--json")
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)["tags"][-1]
    assert (t["zero_stage"], t["ep_size"], t["num_experts"], t["moe_kind"]) == (2, 2, 4, "native")
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "hf")
    assert proc.returncode == 2 and "--hf-config" in proc.stderr  # not an HF architecture
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "ds", "--format", "deepspeed",
               "--optimizer-state", "reset", "--quiet")
    assert proc.returncode == 0, proc.stderr
    a, b = oracle(run, 3), oracle(run, 4)
    want = {n: ((a[n].double() + b[n].double()) / 2).float() for n in a}
    loaded = launch_native(tmp_path / "reload", 2, "--load", str(tmp_path / "ds"))
    got = oracle(loaded, 4)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    c = DSCheckpoint(tmp_path / "ds" / "global_step4")
    assert torch.equal(c.read(EXPERT, state="exp_avg"), torch.zeros_like(want[EXPERT]))
