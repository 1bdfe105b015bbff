"""Activation checkpointing inside DeepSpeed: a ZeRO-3 run with AutoEP EP=2 (parameters
gathered again for the recompute, experts exchanged again) trains to the same losses as the same
run without it."""

from __future__ import annotations

import pytest
from support.runs import DECAY, MOE_RECIPE, TINY_MOE, launch, read_metrics


def test_zero3_ep2_checkpointed_run_has_the_same_losses(tmp_path, trained, data_cache):
    reference = trained("moe_z3")  # the same recipe without checkpointing
    launch(MOE_RECIPE, [*TINY_MOE, *DECAY, "parallel.zero_stage=3", "name=ckpt",
                        f"output_dir={tmp_path}", f"data.cache_dir={data_cache}",
                        "model.activation_checkpointing=true"])
    want = [m for m in read_metrics(reference) if "train/loss" in m or "val/loss" in m]
    got = [m for m in read_metrics(tmp_path / "ckpt") if "train/loss" in m or "val/loss" in m]
    assert [m["step"] for m in got] == [m["step"] for m in want] and len(got) >= 8
    for w, g in zip(want, got):
        for key in ("train/loss", "val/loss", "train/grad_norm"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-6), (w["step"], key)
