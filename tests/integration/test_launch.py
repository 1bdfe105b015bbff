"""The launch scripts: recipe validation before any rank starts, and that the tests' forked
launches (tests/support/zygote.py) are the same runs as ``launch/train.sh`` starts."""

from __future__ import annotations

import pytest
import torch
from support.merging import read_all
from support.runs import MOE_RECIPE, REPO, RUNS, launch, read_metrics, run_cli

TINY = REPO / "tests" / "recipes" / "moe_tiny.yaml"


def test_launcher_wrapper_validates_before_launching(tmp_path):
    proc = run_cli(["bash", str(REPO / "launch" / "train.sh"), str(TINY),
                    f"output_dir={tmp_path}", "model.arch=gpt5"])
    assert proc.returncode == 2
    assert "model.arch" in proc.stderr
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr  # no rank was started


@pytest.mark.distributed
def test_train_sh_and_the_forked_launch_train_the_same_run(trained, tmp_path, data_cache):
    """launch/train.sh -> deepspeed launcher -> launch.py -> ranks, against the ranks forked by
    the zygote (how every other test trains): the same losses and the same saved weights."""
    recipe, overrides = RUNS["moe_z2"]
    assert recipe == MOE_RECIPE
    proc = launch(recipe, [*overrides, "name=moe_z2", f"output_dir={tmp_path}",
                           f"data.cache_dir={data_cache}"], launcher=True)
    assert "deepspeed.launcher.launch" in proc.stdout + proc.stderr  # the real launcher ran
    ref, run = trained("moe_z2"), tmp_path / "moe_z2"

    def curves(d):
        return [(m["step"], m.get("train/loss"), m.get("val/loss")) for m in read_metrics(d)]

    assert curves(run) == curves(ref) and len(curves(ref)) >= 8
    tags = sorted(p.name for p in (ref / "checkpoints").glob("global_step*"))
    assert tags == sorted(p.name for p in (run / "checkpoints").glob("global_step*"))
    for tag in tags:
        a, b = read_all(ref / "checkpoints" / tag), read_all(run / "checkpoints" / tag)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), tag
