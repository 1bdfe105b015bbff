"""Warmup stability: the spike detector on synthetic curves, recovery plans, train.init_from
(PMA-init) with each optimizer policy, and in-process spike recovery in 2-rank runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DECAY, MOE_RECIPE, PY, TINY_MOE, launch, read_metrics, run_cli, train_losses

from moe_merge.config.recipe import load_recipe
from moe_merge.errors import ConfigError
from moe_merge.training.init_from import resolve_init
from moe_merge.training.spikes import RetryCount, SpikeDetector, recovery_plan


# ---- the detector ---------------------------------------------------------------------------
def noisy_curve(n: int, seed: int, noise: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """A decaying loss and gradient norm with log-normal per-step noise, like a small-batch
    run's (2000 steps: loss/trend up to 1.19-1.26, grad norm/trend up to 4-6)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    loss = (3.0 + 5.0 * np.exp(-steps / 60)) * np.exp(rng.normal(0, noise, n))
    gn = (0.4 + 2.0 * np.exp(-steps / 30)) * np.exp(rng.normal(0, 0.5, n))
    return loss, gn


def feed(det: SpikeDetector, loss, gn, start: int = 1) -> tuple[list, list]:
    events, ends = [], []
    for i, (v, g) in enumerate(zip(loss, gn)):
        spike, ended = det.update(start + i, float(v), None if g is None else float(g))
        if spike is not None:
            events.append(spike)
        if ended is not None:
            ends.append((start + i, ended))
    return events, ends


@pytest.mark.parametrize("seed", range(5))
def test_detector_stays_quiet_on_noise(seed):
    loss, gn = noisy_curve(2000, seed)
    events, _ = feed(SpikeDetector(), loss, gn)
    assert events == [], [(e.step, e.kind, e.describe()) for e in events]


def test_detector_fires_on_loss_spikes_nan_and_grad_norm_jumps():
    loss, gn = noisy_curve(600, 7)
    loss[299:303] *= 1.8  # a 4-step loss spike at steps 300..303
    loss[449] = math.nan  # step 450
    gn[519] *= 60  # step 520: a gradient-norm jump alone
    det = SpikeDetector(loss_factor=1.3, grad_norm_factor=10, beta=0.9, min_steps=20)
    trend_before = None
    events, ends = [], []
    for i, (v, g) in enumerate(zip(loss, gn)):
        if i + 1 == 300:
            trend_before = det.loss.trend
        spike, ended = det.update(i + 1, float(v), float(g))
        events += [spike] if spike else []
        ends += [(i + 1, ended)] if ended else []
    assert [(e.step, e.kind) for e in events] == [(300, "loss"), (450, "nonfinite"),
                                                  (520, "grad_norm")]
    assert events[0].loss_ratio > 1.3 and events[2].grad_norm_ratio > 10
    assert events[0].loss_trend == pytest.approx(trend_before)
    assert ends == [(304, 4), (451, 1), (521, 1)]  # the event lasts as long as the spike
    assert det.loss.trend < 1.2 * trend_before  # the spike never entered the trend


def test_detector_waits_for_history_and_a_lasting_jump_never_ends():
    det = SpikeDetector(min_steps=20)
    events, _ = feed(det, [5.0] * 5 + [50.0], [1.0] * 6)  # too early to judge a loss jump
    assert events == []
    events, ends = feed(det, [4.0] * 30 + [9.0] * 50, [1.0] * 80, start=7)
    assert [e.step for e in events] == [37] and ends == []
    assert det.event is not None and det.event_steps == 50


def test_a_spike_replayed_after_a_reload_is_a_retry():
    det = SpikeDetector(min_steps=3)
    feed(det, [5.0] * 10, [1.0] * 10)
    at_ckpt = det.trends()
    feed(det, [5.0], [1.0], start=11)
    spike, _ = det.update(12, 9.0, 1.0)
    assert spike is not None
    det.restart(at_ckpt)  # the trainer reloaded step 10; step 12 spikes again when replayed
    assert det.loss.n == 10  # the replayed step 11 is not counted twice
    assert feed(det, [5.0], [1.0], start=11) == ([], [])
    again, _ = det.update(12, 9.0, 1.0)
    assert again is not None and again.loss_trend == pytest.approx(spike.loss_trend)
    # without ZeRO DeepSpeed reports no gradient norm: the loss alone is judged
    det = SpikeDetector(min_steps=3)
    assert feed(det, [5.0] * 10 + [9.0], [None] * 11)[0][0].kind == "loss"


def test_retries_go_one_checkpoint_further_back_and_new_spikes_start_afresh():
    tags = [10, 20, 30, 40]
    count, picks = RetryCount(), []
    for spike in (45, 45, 35, 45, 50):
        retry = count.next(spike)
        chosen = recovery_plan(count.candidates(tags, spike), "rollback", 3)
        picks.append((retry, chosen))
        if chosen:
            count.resumed(chosen[-1])
    assert picks == [(0, [40]), (1, [30]), (2, [20]), (3, [10]), (0, [40])]
    count = RetryCount()
    assert count.next(45) == 0 and recovery_plan(count.candidates(tags, 45), "pma", 3) == [20, 30, 40]
    count.resumed(40)
    assert count.next(44) == 1 and recovery_plan(count.candidates(tags, 44), "pma", 3) == [10, 20, 30]
    count.resumed(30)
    assert count.next(45) == 2 and count.candidates([], 45) == []
    assert recovery_plan([], "rollback", 3) == []


def test_stability_and_init_keys_are_checked(tmp_path):
    def err(*ov):
        with pytest.raises(ConfigError) as e:
            load_recipe(MOE_RECIPE, list(ov))
        return str(e.value)

    assert "stability.on_spike" in err("stability.on_spike=maybe")
    assert "stability.loss_factor" in err("stability.loss_factor=0.9")
    assert "checkpoint.keep_last" in err("stability.on_spike=pma", "checkpoint.keep_last=2")
    assert "stability.optimizer_state" in err("stability.on_spike=rollback",
                                              "stability.optimizer_state=merged")
    assert "train.init_optimizer" in err("train.init_optimizer=fresh")
    assert "no such directory" in err(f"train.init_from={tmp_path / 'nope'}")
    tag = tmp_path / "global_step4"
    tag.mkdir()
    assert "not both" in err(f"train.init_from={tmp_path}", f"train.fork_from={tag}")
    with pytest.raises(ConfigError, match="neither an HF model"):
        resolve_init(tmp_path, "reset")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="train.init_optimizer.*HF model"):
        resolve_init(tmp_path, "latest")
    assert resolve_init(tmp_path, "reset").format == "hf"


# ---- 2-rank runs ----------------------------------------------------------------------------
MOE_Z2 = [*TINY_MOE, *DECAY, "parallel.zero_stage=2"]  # conftest RUNS["moe_z2"]


def cli(*args) -> object:
    return run_cli([PY, "-m", "moe_merge", *map(str, args)])


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
    from moe_merge.merge.merger import merge

    run = trained("moe_z2")
    outs = {}
    for policy in ("latest", "merged"):
        outs[policy] = tmp_path / f"pma_{policy}"
        merge([run], outs[policy], last=3, fmt="deepspeed", optimizer_state=policy,
              progress=False)
    hf_out = tmp_path / "pma_hf"
    merge([run], hf_out, last=3, progress=False)
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
        assert init["optimizer"] == policy and init["merged"] and init["merge"]["steps"] == [4, 6, 8]
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
    manifest = json.loads((run / "recovery" / "spike5_attempt1" / "merge_manifest.json").read_text())
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
    launch(MOE_RECIPE, [*MOE_Z2, "name=rb", f"output_dir={tmp_path}", f"data.cache_dir={data_cache}",
                        "stability.on_spike=rollback", "stability.inject_nan_step=5"])
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


# ---- the studies ------------------------------------------------------------------------------
def _rec(lines: list[dict], exit_code: int = 0, tmp: Path | None = None) -> dict:
    from moe_merge.studies.stability import read_run

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if exit_code:
        (tmp / "exit.json").write_text(json.dumps({"exit": exit_code}))
    return read_run(tmp)


def test_spike_metrics_count_executed_steps_until_past_the_spike(tmp_path):
    from moe_merge.studies.stability import spike_metrics

    def step(s, loss, gn=1.0):
        return {"step": s, "train/loss": loss, "train/grad_norm": gn}

    spike = {"step": 6, "event": "spike", "kind": "loss", "loss": 9.0, "grad_norm": 1.0,
             "loss_trend": 5.0, "grad_norm_trend": 1.0}
    # pma: the spike step is dropped, steps 5 and 6 replayed, 7 is past it and on trend
    pma = _rec([*(step(s, 5.0) for s in range(1, 6)), spike,
                {"step": 6, "event": "recovery", "resume_step": 4, "spike_step": 6,
                 "checkpoints": ["global_step2", "global_step4"], "retry": 0},
                step(5, 5.1), step(6, 5.0), step(7, 4.9), {"step": 7, "val/loss": 5.0}],
               tmp=tmp_path / "pma")
    m = spike_metrics(pma, 1.3)
    assert [s for s, _, _ in pma["executed"]] == [1, 2, 3, 4, 5, 6, 5, 6, 7]
    assert pma["spike_at"] == [5] and pma["executed"][5][1] == 9.0
    assert m["steps_to_trend"] == 3 and m["recovered"] and m["recoveries"] == 1
    assert m["first_spike"] == {"step": 6, "kind": "loss"} and m["final_val"] == 5.0
    # continue: the loss comes down by itself two steps later
    cont = _rec([*(step(s, 5.0) for s in range(1, 6)), spike, step(6, 9.0), step(7, 7.0),
                 step(8, 6.4), {"step": 8, "val/loss": 5.5}], tmp=tmp_path / "cont")
    assert spike_metrics(cont, 1.3)["steps_to_trend"] == 2
    assert cont["spike_at"] == [5] and len(cont["executed"]) == 8
    # rollback that gave up: not recovered, no final loss
    rb = _rec([*(step(s, 5.0) for s in range(1, 6)), spike,
               {"step": 6, "event": "gave_up"}], exit_code=3, tmp=tmp_path / "rb")
    m = spike_metrics(rb, 1.3)
    assert m["gave_up"] and not m["recovered"] and m["final_val"] is None
    # NaN to the end: never back on trend
    nan = _rec([*(step(s, 5.0) for s in range(1, 6)), spike,
                *(step(s, math.nan) for s in range(6, 10))], tmp=tmp_path / "nan")
    assert spike_metrics(nan, 1.3)["recovered"] is False


def test_pma_init_summary_ranks_diverged_runs():
    from moe_merge.studies.stability import PMA_INIT_METRICS, summarize_pma_init

    def arm(v):
        return {m: v for m in PMA_INIT_METRICS}

    seeds = [{"arms": {"0.003/latest": arm(2.0), "0.003/pma": arm(1.0)}},
             {"arms": {"0.003/latest": arm(math.inf), "0.003/pma": arm(3.0)}},
             {"arms": {"0.003/latest": arm(4.0), "0.003/pma": arm(math.nan)}}]
    r = summarize_pma_init(seeds, [3e-3])["0.003"]["grad_norm_max"]
    assert (r["pma_lower"], r["of"]) == (2, 2)  # the diverged latest arm counts, NaN drops
    assert r["diff"] == {"mean": -1.0, "std": 0.0, "n": 1}
    assert r["nonfinite"] == {"latest": 1, "pma": 1}
    assert r["latest"]["mean"] == pytest.approx(3.0)


@pytest.mark.distributed
def test_quick_studies_write_complete_results(tmp_path, data_cache):
    from moe_merge.studies.stability import ARMS, PMA_INIT_METRICS

    recipe = Path(MOE_RECIPE)
    out = tmp_path / "pi"
    proc = run_cli([PY, "-m", "moe_merge", "study", "pma-init", str(recipe), "--quick", "--out",
                    str(out), f"data.cache_dir={data_cache}"], timeout=1200)
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
    proc = run_cli([PY, "-m", "moe_merge", "study", "spike", str(recipe), "--quick", "--out",
                    str(out), f"data.cache_dir={data_cache}"], timeout=1200)
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


@pytest.mark.parametrize("study, override, key", [
    ("pma_init", "study.optimizer=merged", "study.optimizer"),
    ("pma_init", "study.n=40", "study.n"),
    ("pma_init", "study.ct_warmup_tokens=1e9", "study.ct_warmup_tokens"),
    ("spike", "study.arms=[pma,maybe]", "study.arms"),
    ("spike", "checkpoint.every_tokens=0", "checkpoint.every_tokens"),
])
def test_bad_stability_study_settings_name_the_key(study, override, key):
    from moe_merge.studies.anneal import load_study
    from moe_merge.studies.stability import PMAInitStudy, SpikeStudy

    cls = PMAInitStudy if study == "pma_init" else SpikeStudy
    recipe = Path(MOE_RECIPE).parent / f"study_{study}_tiny.yaml"
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_study(recipe, [override], **cls.LOAD)
