"""Warmup stability: the spike detector on synthetic curves, recovery plans, train.init_from
(PMA-init) with each optimizer policy, and in-process spike recovery in 2-rank runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support.runs import (
    DECAY,
    MOE_RECIPE,
    TINY_MOE,
    launch,
    read_metrics,
    run_cli,
    train_losses,
)

# ---- 2-rank runs ----------------------------------------------------------------------------
MOE_Z2 = [*TINY_MOE, *DECAY, "parallel.zero_stage=2"]  # conftest RUNS["moe_z2"]


def params_and_moments(tag_dir: Path, fresh: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Master weights and Adam moments of every parameter. ``fresh``: an optimizer that has not
    stepped yet, which holds no moments at all (torch creates them at the first step); checked,
    and given as zeros."""
    from moe_merge.checkpoint.reader import DSCheckpoint
    from moe_merge.errors import CheckpointError

    r = DSCheckpoint(tag_dir, verify=False)
    try:
        out = {}
        for name in r.params:
            w = r.read(name).clone()
            if fresh:
                with pytest.raises(CheckpointError, match="exp_avg missing"):
                    r.read(name, state="exp_avg")
            out[name] = {"fp32": w, **{s: torch.zeros_like(w) if fresh else r.read(name, state=s)
                                       .clone() for s in ("exp_avg", "exp_avg_sq")}}
        return out
    finally:
        r.close()


@pytest.mark.distributed
def test_init_from_reproduces_the_merged_weights_at_step_0(trained, tmp_path, data_cache):
    """PMA-init: a run started from a merge output holds exactly the merged fp32 weights at
    step 0 (its global_step0), with Adam's moments per policy: reset zero, latest the newest
    checkpoint's, merged the averaged ones. The HF route (transformers weights, a fresh
    optimizer) and the DeepSpeed route with reset train alike; the step-0 validation loss is
    the merged HF model's (transformers)."""
    from moe_merge.evals.loss import evaluate
    from moe_merge.merge.merger import OutputOptions, merge
    from moe_merge.merge.selection import Selection

    run = trained("moe_z2")
    outs = {}
    for policy in ("latest", "merged"):
        outs[policy] = tmp_path / f"pma_{policy}"
        merge([run], outs[policy], Selection(last=3),
              OutputOptions(fmt="deepspeed", optimizer_state=policy), progress=False)
    hf_out = tmp_path / "pma_hf"
    merge([run], hf_out, Selection(last=3), progress=False)
    base = [*MOE_Z2, f"data.cache_dir={data_cache}", f"output_dir={tmp_path}",
            "train.max_tokens=512", "schedule.decay_tokens=0", "logging.val_every=2"]
    arms = {"reset": (outs["latest"], "reset"), "latest": (outs["latest"], "latest"),
            "merged": (outs["merged"], "merged"), "hf": (hf_out, "reset")}
    for name, (src, policy) in arms.items():
        launch(MOE_RECIPE, [*base, f"name={name}", f"train.init_from={src}",
                            f"train.init_optimizer={policy}"])
    merged = params_and_moments(outs["merged"] / "global_step8")
    latest = params_and_moments(run / "checkpoints" / "global_step8")
    for name in arms:
        start = params_and_moments(tmp_path / name / "checkpoints" / "global_step0",
                                   fresh=name == "hf")
        assert start.keys() == merged.keys()
        policy = arms[name][1]
        for p, t in start.items():
            assert torch.equal(t["fp32"], merged[p]["fp32"]), (name, p)
            for s in ("exp_avg", "exp_avg_sq"):
                want = {"reset": torch.zeros_like(t[s]), "latest": latest[p][s],
                        "merged": merged[p][s]}[policy]
                assert torch.equal(t[s], want), (name, p, s)
        init = json.loads((tmp_path / name / "init.json").read_text())
        assert (init["optimizer"] == policy and init["merged"]
                and init["merge"]["steps"] == [4, 6, 8])
        assert init["format"] == ("hf" if name == "hf" else "deepspeed")
    assert any(not torch.equal(merged[p]["exp_avg"], latest[p]["exp_avg"]) for p in merged)
    # the same weights and a fresh optimizer by two routes: the same training
    hf_losses, ds_losses = train_losses(tmp_path / "hf"), train_losses(tmp_path / "reset")
    assert sorted(hf_losses) == [1, 2]
    assert [hf_losses[s] for s in (1, 2)] == pytest.approx([ds_losses[s] for s in (1, 2)], rel=1e-5)
    val0 = [m["val/loss"] for m in read_metrics(tmp_path / "merged") if m["step"] == 0
            and "val/loss" in m]
    oracle = evaluate(hf_out, recipe=tmp_path / "merged" / "recipe.yaml")["loss"]
    assert val0 == [pytest.approx(oracle, rel=1e-5)]
    # a plain checkpoint goes the same way; asking it for merged moments is refused
    proc = run_cli(["bash", "launch/train.sh", MOE_RECIPE, *base, "name=bad",
                    f"train.init_from={run}", "train.init_optimizer=merged"])
    assert proc.returncode == 2 and "plain checkpoint" in proc.stderr, proc.stderr[-500:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.distributed
def test_injected_nan_triggers_pma_recovery_and_training_continues(trained, tmp_path, data_cache):
    """A NaN loss at step 5 of a 2-rank run: the trainer stops, merges the pre-spike
    checkpoints 2 and 4, reloads the merge in process and trains on to step 8. The first loss
    after the recovery is the merged HF model's on that batch (transformers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_merge.config.recipe import load_recipe as load
    from moe_merge.evals.loss import load_hf, loss_on
    from moe_merge.merge.merger import merge
    from moe_merge.training.data import Batches, prepare

    run = tmp_path / "nan"
    launch(MOE_RECIPE, [*MOE_Z2, "name=nan", f"output_dir={tmp_path}",
                        f"data.cache_dir={data_cache}", "stability.on_spike=pma",
                        "stability.inject_nan_step=5"])
    events = [m for m in read_metrics(run) if "event" in m]
    assert [e["event"] for e in events] == ["spike", "recovery"]
    spike, rec = events[0], events[1]
    assert spike["step"] == 5 and spike["kind"] == "nonfinite"
    assert rec["action"] == "pma" and rec["checkpoints"] == ["global_step2", "global_step4"]
    assert rec["resume_step"] == 4 and rec["attempt"] == 1
    manifest = json.loads(
        (run / "recovery" / "spike5_attempt1" / "merge_manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [2, 4] and manifest["weights"] == [0.5, 0.5]
    losses = train_losses(run)  # the kept trajectory: the replayed step 5 overrides the NaN
    assert sorted(losses) == list(range(1, 9)) and all(map(math.isfinite, losses.values()))
    assert (run / "checkpoints" / "global_step8").is_dir()
    # the weights after the recovery are the merge of steps 2 and 4
    merge([run / "checkpoints" / "global_step2", run / "checkpoints" / "global_step4"],
          tmp_path / "hf24", progress=False)
    cfg = load(run / "recipe.yaml")
    batch = Batches(prepare(cfg.data).train, cfg.data.seq_len, cfg.seed).samples(
        4 * cfg.parallel.global_batch, cfg.parallel.global_batch)
    oracle, _ = loss_on(load_hf(tmp_path / "hf24"), batch, cfg.parallel.global_batch)
    assert losses[5] == pytest.approx(oracle, rel=1e-5)
    scalars = set()
    for f in (run / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"stability/spike", "stability/recovery", "stability/resume_step"} <= scalars


@pytest.mark.distributed
def test_rollback_replays_the_uninterrupted_run(trained, tmp_path, data_cache):
    """Rollback reloads global_step4 with its optimizer state: steps 5..8 then repeat the run
    without the NaN bit for bit (conftest's moe_z2)."""
    launch(MOE_RECIPE, [*MOE_Z2, "name=rb", f"output_dir={tmp_path}",
                        f"data.cache_dir={data_cache}", "stability.on_spike=rollback",
                        "stability.inject_nan_step=5"])
    rec = [m for m in read_metrics(tmp_path / "rb") if m.get("event") == "recovery"]
    assert [(r["action"], r["checkpoints"], r["resume_step"]) for r in rec] == [
        ("rollback", ["global_step4"], 4)]
    assert train_losses(tmp_path / "rb") == train_losses(trained("moe_z2"))


@pytest.mark.distributed
def test_a_spike_with_no_checkpoint_before_it_stops_the_run(tmp_path, data_cache):
    proc = run_cli(["bash", "launch/train.sh", MOE_RECIPE, *MOE_Z2, "name=early",
                    f"output_dir={tmp_path}", f"data.cache_dir={data_cache}",
                    "stability.on_spike=pma", "stability.inject_nan_step=1"])
    assert proc.returncode == 3, proc.stderr[-500:]
    assert "loss spike at step 1: no checkpoint is left before it" in proc.stderr
    events = [m["event"] for m in read_metrics(tmp_path / "early") if "event" in m]
    assert events == ["spike", "gave_up"]


@pytest.mark.distributed
def test_quick_studies_write_complete_results(tmp_path, data_cache, study_cli):
    from moe_merge.studies.stability import ARMS, PMA_INIT_METRICS

    recipe = Path(MOE_RECIPE)
    out = tmp_path / "pi"
    proc = study_cli("study", "pma-init", str(recipe), "--quick", "--out",
                    str(out), f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "pma-init" and [s["seed"] for s in res["seeds"]] == [1]
    s = res["seeds"][0]
    assert s["window"] == [12, 14, 16] and s["weights"] == pytest.approx([1 / 3] * 3)
    manifest = json.loads((out / "seed1" / "pma_init" / "merge_manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [12, 14, 16]
    assert set(s["arms"]) == {"0.003/latest", "0.003/pma", "0.006/latest", "0.006/pma"}
    for a in s["arms"].values():
        assert [p[0] for p in a["curve"]] == list(range(1, res["ct_steps"] + 1))
        assert a["val"][0][0] == 0 and a["val"][-1][0] == res["ct_steps"]
        for m in PMA_INIT_METRICS:
            assert a[m] is not None and math.isfinite(a[m]), m
    # the two arms differ only in their start: the same first-step gradient norm within an arm
    # across LRs (step 1 is taken at the initial weights), different ones across arms
    arms = s["arms"]
    assert arms["0.003/pma"]["curve"][0][2] == pytest.approx(arms["0.006/pma"]["curve"][0][2])
    assert arms["0.003/pma"]["val_start"] != arms["0.003/latest"]["val_start"]
    for lr in ("0.003", "0.006"):
        assert set(res["summary"][lr]) == set(PMA_INIT_METRICS)
    assert {"report.md", "ct_curves.png", "tb"} <= {p.name for p in out.iterdir()}
    assert "Peak LR 0.006" in (out / "report.md").read_text()

    out = tmp_path / "spike"
    proc = study_cli("study", "spike", str(recipe), "--quick", "--out",
                    str(out), f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "spike" and list(res["summary"]) == list(ARMS)
    arms = res["seeds"][0]["arms"]
    for arm in ARMS:  # the quick recipe injects a NaN loss at step 11
        a = arms[arm]
        assert a["first_spike"] == {"step": 11, "kind": "nonfinite"}, arm
        assert a["final_step"] == res["total_steps"] and math.isfinite(a["final_val"])
    for arm in ("rollback", "rollback+skip", "pma"):
        assert [r["resume_step"] for r in arms[arm]["recovery_log"]] == [10]
        assert arms[arm]["recovered"] and arms[arm]["steps_to_trend"] == 2
    assert arms["pma"]["recovery_log"][0]["checkpoints"] == ["global_step6", "global_step8",
                                                             "global_step10"]
    assert arms["continue"]["recoveries"] == 0
    assert {"report.md", "spike_runs.png", "tb"} <= {p.name for p in out.iterdir()}
    assert "| pma | 1/1 | 1/1 | 0 |" in (out / "report.md").read_text()


