"""``moe-merge eval --tasks``: lm-eval-harness on a merge output and on a checkpoint, with a
local task (task YAML + local JSONL: no hub), its scores checked against a hand computation of
the same log-likelihoods with transformers; an unknown task is a one-line error naming it."""

from __future__ import annotations

import json

from support.lm_tasks import by_hand, write_task
from support.merging import cli


def test_lm_eval_scores_a_merge_and_a_checkpoint_as_computed_by_hand(trained, tmp_path):
    run = trained("moe_z2")
    tasks = write_task(tmp_path / "tasks")
    merged = tmp_path / "m"
    assert cli("merge", run, "--last", "3", "--out", merged, "--quiet").returncode == 0
    results = tmp_path / "r.json"
    proc = cli("eval", merged, "--tasks", "tiny_mc", "--include-path", tasks,
               "--results", results, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(results.read_text())
    want = by_hand(merged)
    assert got["scores"]["tiny_mc"] == want
    assert "tiny_mc" in proc.stdout and f"{want['acc']:.4f}" in proc.stdout

    # a checkpoint is gathered first: the run's newest tag, scored as its HF gather
    latest = tmp_path / "latest"
    assert cli("merge", run, "--last", "1", "--out", latest, "--quiet").returncode == 0
    proc = cli("eval", run, "--tasks", "tiny_mc", "--include-path", tasks, "--results",
               tmp_path / "r2.json", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["tiny_mc"] == by_hand(latest)


def test_an_unknown_task_is_one_line_naming_it(trained, tmp_path):
    proc = cli("eval", trained("moe_z2"), "--tasks", "no_such_task_here", "--results",
               tmp_path / "r.json")
    assert proc.returncode == 2 and not (tmp_path / "r.json").exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown task 'no_such_task_here'" in line and "--include-path" in line


def test_a_study_with_an_unknown_task_stops_before_training(tmp_path):
    from support.runs import REPO

    out = tmp_path / "study"
    proc = cli("study", "anneal", REPO / "recipes" / "study_anneal_tiny.yaml", "--quick",
               "--out", out, "--tasks", "no_such_task_here", "--include-path",
               write_task(tmp_path / "tasks"))
    assert proc.returncode == 2 and not out.exists()
    assert "unknown task 'no_such_task_here'" in proc.stderr.strip().splitlines()[-1]
