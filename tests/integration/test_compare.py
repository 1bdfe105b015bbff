"""moe-merge compare on a trained run and a merge of it: its numbers are moe-merge eval's."""

from __future__ import annotations

import json

import pytest
from support.merging import cli, tag


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_compare_equals_eval_of_the_same_dirs(trained, tmp_path):
    run = trained("moe_z2")
    merged = tmp_path / "sma3"
    proc = cli("merge", run, "--last", "3", "--out", merged, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = tmp_path / "plot" / "compare.png"
    res = _json(cli("compare", run, merged, "--png", png, "--json"))

    latest = _json(cli("eval", run, "--json"))
    merged_eval = _json(cli("eval", merged, "--json"))
    step4 = _json(cli("eval", tag(run, 4), "--json"))
    assert res["latest"]["tag"] == "global_step8"
    assert res["latest"]["loss"] == latest["loss"]
    assert res["merged"]["loss"] == merged_eval["loss"]
    assert res["gain"] == latest["loss"] - merged_eval["loss"]
    assert (res["windows"], res["tokens_scored"]) == (merged_eval["windows"],
                                                      merged_eval["tokens"])

    # every checkpoint for the plot, on the same batches: the trainer's val/loss at its step
    by_step = {c["step"]: c for c in res["checkpoints"]}
    assert sorted(by_step) == [2, 4, 6, 8]
    assert by_step[4]["loss"] == step4["loss"]
    assert by_step[8]["loss"] == latest["loss"]
    assert [c["tokens"] for c in res["checkpoints"]] == [512, 1024, 1536, 2048]
    meta = json.loads((tag(run, 8) / "meta.json").read_text())
    assert by_step[8]["loss"] == pytest.approx(meta["val_loss"], abs=1e-4)

    window = res["merged"]["inputs"]
    assert [c["step"] for c in window] == [4, 6, 8]
    assert [c["loss"] for c in window] == [by_step[s]["loss"] for s in (4, 6, 8)]
    assert res["merged"]["tokens"] == 2048 and res["merged"]["label"] == "SMA of 3"
    assert sum(c["weight"] for c in window) == pytest.approx(1.0)
    assert res["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = cli("compare", run, merged, "--quiet")
    assert text.returncode == 0, text.stderr[-2000:]
    lines = text.stdout.splitlines()
    assert next(ln for ln in lines if "latest checkpoint" in ln).endswith(f"{latest['loss']:.4f}")
    assert next(ln for ln in lines if "merged: SMA of 3" in ln).endswith(
        f"{merged_eval['loss']:.4f}")
    assert lines[-1].endswith(f"{latest['loss'] - merged_eval['loss']:+.4f}")
    assert "plot:" not in text.stdout and "evaluating" not in text.stderr


def test_compare_refuses_a_directory_that_is_no_merge(trained, tmp_path):
    run = trained("moe_z2")
    proc = cli("compare", run, run / "hf")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"moe-merge compare: error: {run / 'hf'}: no merge_manifest.json; not a moe-merge "
        "merge output"]
