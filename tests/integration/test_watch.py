"""``moe-merge watch``: a run followed from beside it. Each whole checkpoint gets one record
(the merge of the window ending there, scored as ``moe-merge eval`` scores it); a save still
being written is not read; a restart redoes nothing; it stops at the run's last step, when idle,
or on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.merging import cli
from support.runs import PY, REPO, tb_tags

from moe_merge.evals.watch import read_log

SCORING = ["data.seq_len=16", "logging.val_batches=2", "parallel.micro_batch=2"]


def tokens_bin(path: Path) -> Path:
    rng = np.random.default_rng(3)
    rng.integers(0, 128, 4096).astype(np.uint16).tofile(path)
    return path


def records(out: Path) -> list[dict]:
    return read_log(out / "watch.jsonl")


def test_watch_follows_a_trainer_run_and_resumes_without_redoing_work(foreign, tmp_path):
    src = foreign("hf", 2)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        shutil.copytree(src / name, run / name)
    (run / "checkpoint-6" / "latest").unlink()  # the third save is still being written
    data, out = tokens_bin(tmp_path / "val.bin"), tmp_path / "w"
    args = ["watch", run, *SCORING, "--out", out, "--last", "2", "--data", data, "--poll", "0.2"]
    proc = cli(*args, "--idle-exit", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(out)] == [4]
    assert f"warning: skipped {run / 'checkpoint-6' / 'global_step6'}" in proc.stderr
    assert proc.stderr.count("warning: skipped") == 1  # said once, not at every look

    (run / "checkpoint-6" / "latest").write_text("global_step6")  # the save completes
    proc = cli(*args)  # no --idle-exit: it stops at the Trainer's max_steps (6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reached its last step (6)" in proc.stderr
    recs = records(out)
    assert [(r["step"], r["window"]) for r in recs] == [(4, [2, 4]), (6, [4, 6])]

    merged = tmp_path / "m"
    assert cli("merge", run, "--last", "2", "--out", merged, "--quiet").returncode == 0
    ev = cli("eval", merged, *SCORING, "--data", data, "--json")
    assert ev.returncode == 0, ev.stderr
    assert recs[1]["val_loss"] == json.loads(ev.stdout)["loss"]
    ev = cli("eval", run / "checkpoint-6", *SCORING, "--data", data, "--json")
    assert recs[1]["latest_val_loss"] == json.loads(ev.stdout)["loss"]
    assert recs[1]["val_gap"] == recs[1]["latest_val_loss"] - recs[1]["val_loss"]
    scalars, _ = tb_tags(out / "tb")
    assert {"pma/val_loss", "latest/val_loss", "pma/val_gap"} <= scalars


def test_watch_on_our_run_stops_at_its_last_step(trained, tmp_path):
    run = trained("moe_z2")
    out = tmp_path / "w"
    proc = cli("watch", run, "--out", out, "--last", "3", "--poll", "0.2", "--no-latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    assert [(r["step"], r["window"]) for r in recs] == [(6, [2, 4, 6]), (8, [4, 6, 8])]
    assert all("latest_val_loss" not in r for r in recs)
    merged = tmp_path / "m"
    assert cli("merge", run, "--last", "3", "--out", merged, "--quiet").returncode == 0
    ev = cli("eval", merged, "--json")
    assert ev.returncode == 0, ev.stderr
    assert recs[-1]["val_loss"] == json.loads(ev.stdout)["loss"]


def test_a_record_cut_short_is_dropped_and_redone(trained, tmp_path):
    run, out = trained("moe_z2"), tmp_path / "w"
    assert cli("watch", run, "--out", out, "--last", "3", "--no-latest").returncode == 0
    log = out / "watch.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][:40])  # killed while writing the second record
    assert [r["step"] for r in records(out)] == [6]
    assert log.read_text() == lines[0]
    assert cli("watch", run, "--out", out, "--last", "3", "--no-latest").returncode == 0
    assert [r["step"] for r in records(out)] == [6, 8]
    log.write_text("not json\n")
    proc = cli("watch", run, "--out", out, "--last", "3")
    assert proc.returncode == 2 and "not a watch log" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on the nodes")
def test_watch_stops_when_asked(trained, tmp_path):
    """A run with no known end (tags in a plain directory): the watcher keeps looking until
    SIGTERM, then exits 0 with its records whole."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    src = trained("moe_z2")
    for step in (2, 4):
        shutil.copytree(src / "checkpoints" / f"global_step{step}", ckpts / f"global_step{step}")
    out = tmp_path / "w"
    cmd = [PY, "-m", "moe_merge", "watch", str(ckpts), "--out", str(out), "--last", "2",
           "--recipe", str(src / "recipe.yaml"), "--hf-config", str(src / "hf"), "--poll", "0.2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 240
    while not records(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None and [r["step"] for r in records(out)] == [4]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: stopping" in stderr and "1 merge(s) scored" in stdout
