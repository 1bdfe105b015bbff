"""The annealing study: its pure parts, and a --quick study end to end (2 seeds, real launches)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
from support.lm_tasks import by_hand, write_task
from support.merging import cli
from support.runs import REPO

from moe_merge.studies.anneal import (
    STRATEGIES,
    summarize,
)
from moe_merge.studies.anneal_report import _markdown

STUDY = REPO / "recipes" / "study_anneal_tiny.yaml"


@pytest.mark.distributed
def test_quick_study_runs_end_to_end(tmp_path, data_cache, study_cli):
    out = tmp_path / "study"
    proc = study_cli("study", "anneal", str(STUDY), "--quick",
                    "--out", str(out), f"data.cache_dir={data_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in res["seeds"]] == [1]
    assert res["fork_steps"] == [4, 12]
    for s in res["seeds"]:
        assert len(s["forks"]) == 2 and s["evaluations"] > 0
        for row in s["forks"]:
            for key in ("latest", "annealed", "tissue", "tissue_abs_error"):
                assert math.isfinite(row[key]), key
            assert set(row["merged"]) == set(STRATEGIES) == set(row["abs_error"])
            assert all(math.isfinite(v) for v in row["merged"].values())
            assert row["step"] == row["fork_step"] + 4 == row["annealed_step"]
            assert len(row["window"]) == 3 and row["window"][-1] == row["step"]
        assert s["gain_vs_lr"] and all(g["lr"] < 3e-3 for g in s["gain_vs_lr"])
        assert "params" in s["tissue"] and math.isfinite(s["tissue"]["params"]["alpha"])
        assert {"spearman_all", "spearman_sma_forks", "trunk_val", "branch_val"} <= set(s)
        mech = s["mechanism"]
        assert mech["window"] == s["forks"][-1]["window"] and mech["batches"] == 1
        for ref in ("around_merged", "around_annealed"):
            t = mech[ref]
            assert len(t["D"]) == 3 and all(len(r) == 3 for r in t["D"])
            assert all(math.isfinite(x) for r in t["D"] for x in r)
            assert math.isfinite(t["gain"]["measured"]) and math.isfinite(t["gain"]["predicted"])
            assert t["cross_terms"]["pairs"] == 3
        # the merged loss is the same model and batches either way
        assert mech["around_merged"]["loss_merged"] == pytest.approx(
            mech["around_annealed"]["loss_merged"], rel=1e-6)
    grid = res["seeds"][0]["grid"]
    assert len(grid) == 2 * 2 * 2 and any(c["fits"] for c in grid)
    summary = res["summary"]
    for k in STRATEGIES:
        assert summary["abs_error"][k]["n"] == 2
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "## Ablation grid" in report and "## Mechanism" in report
    for png in ("loss_vs_tokens.png", "gain_vs_lr.png", "grid_heatmap.png"):
        assert (out / png).stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the same command again reuses every run (all complete) and rewrites the same numbers
    again = study_cli("study", "anneal", str(STUDY), "--quick",
                     "--out", str(out), f"data.cache_dir={data_cache}")
    assert again.returncode == 0, again.stderr[-2000:]
    res2 = json.loads((out / "results.json").read_text())
    assert res2["seeds"][0]["forks"] == res["seeds"][0]["forks"]
    # with --tasks: every run reused, and the latest, annealed and merged models of each fork
    # scored by lm-eval; the scores are those of `moe-merge eval --tasks` on the branch's
    # checkpoint and a hand computation on `moe-merge merge` of the window
    tasks = write_task(tmp_path / "tasks")
    scored = study_cli("study", "anneal", str(STUDY), "--quick", "--out", str(out),
                       f"data.cache_dir={data_cache}", "--tasks", "tiny_mc", "--include-path",
                       str(tasks), "study.task_strategies=[sma]")
    assert scored.returncode == 0, scored.stderr[-3000:]
    res3 = json.loads((out / "results.json").read_text())
    seed3 = res3["seeds"][0]
    assert seed3["downstream_scored"] == 6 and "downstream.json" in os.listdir(out / "seed1")
    for row, before in zip(seed3["forks"], res["seeds"][0]["forks"]):
        assert row["merged"] == before["merged"] and row["annealed"] == before["annealed"]
        assert set(row["downstream"]) == {"latest", "annealed", "merged_sma"}
    row = seed3["forks"][-1]
    branch = out / "seed1" / f"anneal_{row['fork_step']}" / "checkpoints" / \
        f"global_step{row['step']}"
    proc = cli("eval", branch, "--tasks", "tiny_mc", "--include-path", tasks, "--results",
               tmp_path / "annealed.json", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert row["downstream"]["annealed"] == json.loads(proc.stdout)
    merged = tmp_path / "merged_window"
    window = [out / "seed1" / "trunk" / "checkpoints" / f"global_step{s}" for s in row["window"]]
    assert cli("merge", *window, "--out", merged, "--quiet").returncode == 0
    assert row["downstream"]["merged_sma"]["tiny_mc"] == by_hand(merged)
    summary3 = res3["summary"]["downstream"]
    accs = [r["downstream"]["latest"]["tiny_mc"]["acc"] for r in seed3["forks"]]
    assert summary3["latest"]["tiny_mc"]["acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "## Downstream tasks" in (out / "report.md").read_text()
    # the spread over seeds: a second seed that is the first with every loss + 0.1 and its
    # annealed losses + 0.2 (captured fractions change, absolute errors shift by 0.1)
    two = copy.deepcopy(res["seeds"][0])
    two["seed"] = 2
    for row in two["forks"]:
        row["latest"] += 0.1
        row["annealed"] += 0.2
        row["merged"] = {k: v + 0.1 for k, v in row["merged"].items()}
        gain = row["latest"] - row["annealed"]
        row["captured"] = {k: (row["latest"] - v) / gain if gain > 0 else None
                           for k, v in row["merged"].items()}
        row["abs_error"] = {k: abs(v - row["annealed"]) for k, v in row["merged"].items()}
    s2 = summarize([res["seeds"][0], two])
    fork = str(res["fork_steps"][0])
    assert s2["per_fork"][fork]["latest"]["std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert s2["per_fork"][fork]["latest"]["n"] == 2 and s2["abs_error"]["sma"]["n"] == 4
    # pooled capture: per seed, summed merge gains over summed annealing gains
    for s_ in (res["seeds"][0], two):
        ann = sum(r["latest"] - r["annealed"] for r in s_["forks"])
        s_["_pooled"] = (sum(r["latest"] - r["merged"]["sma"] for r in s_["forks"]) / ann
                         if ann > 0 else None)
    pooled = [s_["_pooled"] for s_ in (res["seeds"][0], two) if s_["_pooled"] is not None]
    assert s2["captured_pooled"]["sma"]["n"] == len(pooled)
    if pooled:
        assert s2["captured_pooled"]["sma"]["mean"] == pytest.approx(sum(pooled) / len(pooled))
    # and on hand-made forks: seed A gains 0.1 + 0.3 from annealing and 0.1 + 0.1 from merging
    # (pooled 0.5, where the per-fork mean would be (1 + 1/3) / 2); seed B anneals to worse
    # losses and is left out
    def fork(latest, annealed, merged):
        return {"latest": latest, "annealed": annealed, "merged": dict.fromkeys(STRATEGIES, merged),
                "captured": dict.fromkeys(STRATEGIES), "abs_error": dict.fromkeys(STRATEGIES, 0.0),
                "fork_step": 1, "step": 2}
    a = {"forks": [fork(5.0, 4.9, 4.9), fork(5.0, 4.7, 4.9)], "spearman_all": 1.0,
         "spearman_sma_forks": 1.0}
    b = {"forks": [fork(5.0, 5.1, 4.9), fork(5.0, 5.2, 4.9)], "spearman_all": 1.0,
         "spearman_sma_forks": 1.0}
    hand = summarize([a, b])["captured_pooled"]["sma"]
    assert hand["n"] == 1 and hand["mean"] == pytest.approx(0.5)
    md = _markdown({**res, "seeds": [res["seeds"][0], two], "summary": s2}, [])
    assert "± " in md
