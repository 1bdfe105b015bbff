"""Warmup stability: the spike detector on synthetic curves, recovery plans, train.init_from
(PMA-init) with each optimizer policy, and in-process spike recovery in 2-rank runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from support.runs import MOE_RECIPE, REPO

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
    assert (count.next(45) == 0
            and recovery_plan(count.candidates(tags, 45), "pma", 3) == [20, 30, 40])
    count.resumed(40)
    assert (count.next(44) == 1
            and recovery_plan(count.candidates(tags, 44), "pma", 3) == [10, 20, 30])
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
    recipe = REPO / "recipes" / f"study_{study}_tiny.yaml"
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_study(recipe, [override], **cls.LOAD)
