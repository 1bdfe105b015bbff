"""The annealing study: its pure parts, and a --quick study end to end (2 seeds, real launches)."""

from __future__ import annotations

import math

import pytest
from support.runs import REPO

from moe_merge.config.recipe import load_recipe
from moe_merge.errors import ConfigError
from moe_merge.studies.anneal import (
    AnnealStudyConfig,
    fork_steps,
    load_study,
    spearman,
)

STUDY = REPO / "recipes" / "study_anneal_tiny.yaml"


def test_spearman_matches_hand_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [0.5, 0.5, 2, 3], y ranks [0, 1, 2, 3]
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_fork_points_start_where_the_window_fits_after_warmup():
    cfg = load_recipe(REPO / "tests" / "recipes" / "moe_tiny.yaml",
                      ["checkpoint.every_tokens=2.048e4"])
    st = AnnealStudyConfig(forks=4, n=6, interval=2)
    # warmup 20 steps, a checkpoint every 5: first window 20, 30, ..., 70
    # ... the last one branch (40 steps) before the end of the 200-step trunk
    assert fork_steps(cfg, st) == [70, 100, 130, 160]
    assert fork_steps(cfg, AnnealStudyConfig(forks=1)) == [160]
    assert fork_steps(cfg, AnnealStudyConfig(fork_steps=[100, 50])) == [50, 100]


@pytest.mark.parametrize("override, key", [
    ("schedule.decay_tokens=4096", "schedule.decay_tokens"),
    ("study.decay_shape=step", "study.decay_shape"),
    ("study.seeds=[1,1]", "study.seeds"),
    ("study.n=60", "study.n"),
    ("study.fork_steps=[190]", "study.fork_steps"),
])
def test_bad_study_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_study(STUDY, [override])


def test_unknown_study_key_is_refused():
    with pytest.raises(ConfigError, match="study"):
        load_study(STUDY, ["study.nope=1"])




def test_downstream_scores_each_model_once_across_reruns(tmp_path, monkeypatch):
    """study.tasks: each model is written as a merge output (safetensors + the HF files) and
    scored once; a re-run reads the scores back from the seed's downstream.json."""
    import torch
    from safetensors.torch import load_file

    from moe_merge.evals import downstream
    from moe_merge.studies.anneal import Downstream

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (hf / "trainer_state.json").write_text("{}")  # not an HF model file: not copied
    calls = []

    def fake_run_tasks(model_dir, tasks, options):
        files = sorted(p.name for p in model_dir.iterdir())
        calls.append((files, load_file(str(model_dir / "model.safetensors")), tasks))
        return {"scores": {"t": {"acc": 0.25 * len(calls)}}}

    monkeypatch.setattr(downstream, "run_tasks", fake_run_tasks)
    st = AnnealStudyConfig(tasks=["t"])
    cache = tmp_path / "seed1" / "downstream.json"
    cache.parent.mkdir()
    trunk = tmp_path / "seed1" / "trunk"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    d = Downstream(st, hf, cache)
    assert d.scores([(trunk, 4)], [1.0], lambda: state) == {"t": {"acc": 0.25}}
    files, written, tasks = calls[0]
    assert files == ["config.json", "model.safetensors"] and tasks == ["t"]
    assert torch.equal(written["w"], state["w"])
    assert d.scores([(trunk, 4)], [1.0], lambda: 1 / 0) == {"t": {"acc": 0.25}}
    again = Downstream(st, hf, cache)  # a re-run of the study
    assert again.scores([(trunk, 4)], [1.0], lambda: 1 / 0) == {"t": {"acc": 0.25}}
    assert again.scores([(trunk, 4), (trunk, 6)], [0.5, 0.5], lambda: state)["t"]["acc"] == 0.5
    assert len(calls) == 2 and again.scored == 1
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".downstream-")]
