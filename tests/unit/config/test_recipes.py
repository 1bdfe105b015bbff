"""Every shipped recipe loads and dry-runs (resolved recipe, DeepSpeed config, parameter counts)."""

from __future__ import annotations

import pytest
from support.runs import PY, REPO, run_cli

from moe_merge.config.recipe import load_recipe
from moe_merge.training.model import count_params

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not p.name.startswith("study_"))
STUDIES = sorted((REPO / "recipes").rglob("study_*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"moe_tiny.yaml", "dense_tiny.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_dry_runs(recipe):
    proc = run_cli([PY, "-m", "moe_merge.train", str(recipe), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# resolved recipe" in out and '"train_batch_size"' in out
    assert "active/token" in out and "checkpoints" in out


@pytest.mark.parametrize("recipe", [p for p in STUDIES if p.name.startswith("study_anneal")],
                         ids=lambda p: p.name)
def test_study_recipes_load(recipe):
    from moe_merge.studies.anneal import fork_steps, load_study

    cfg, st, train_yaml = load_study(recipe)
    assert "\nstudy:" not in train_yaml and cfg.schedule.decay_tokens == 0
    forks = fork_steps(cfg, st)
    decay = round(st.decay_tokens / cfg.tokens_per_step)
    assert len(forks) == st.forks and forks[-1] + decay <= cfg.total_steps
    assert all(f % cfg.checkpoint_every_steps == 0 for f in forks)


def test_tiny_moe_parameter_counts():
    cfg = load_recipe(REPO / "recipes" / "moe_tiny.yaml")
    c = count_params(cfg.model, cfg.data.vocab_size)
    m = cfg.model
    per_expert = 3 * m.hidden_size * m.moe_intermediate_size
    assert c.expert == m.num_layers * m.num_experts * per_expert
    assert c.active == c.total - c.expert + m.num_layers * m.top_k * per_expert
    assert 1e6 < c.total < 2e7


def test_dry_run_of_paper_scale_recipe_allocates_nothing():
    """Counting a 13B model's parameters must not allocate it (meta device)."""
    paper = [p for p in RECIPES if "13b" in p.name]
    if not paper:
        pytest.fail("no 1.3B/13B reference recipe in recipes/")
    cfg = load_recipe(paper[0])
    c = count_params(cfg.model, cfg.model.vocab_size)
    assert 11e9 < c.total < 15e9 and 1.1e9 < c.active < 1.5e9


def test_stability_study_recipes_load():
    from moe_merge.studies.anneal import load_study
    from moe_merge.studies.stability import ARMS, PMAInitStudy, SpikeStudy

    for cls, name in ((PMAInitStudy, "study_pma_init_tiny.yaml"),
                      (SpikeStudy, "study_spike_tiny.yaml")):
        cfg, st, train_yaml = load_study(REPO / "recipes" / name, **cls.LOAD)
        assert "\nstudy:" not in train_yaml and cfg.parallel.world_size == 2
        assert len(st.seeds) >= 3
        if cls is SpikeStudy:
            assert cfg.checkpoint.keep_last >= cfg.stability.pma_n + cfg.stability.max_retries
            assert set(st.arms) == set(ARMS)
        else:
            assert 2 <= len(st.ct_lrs) <= 3 and st.optimizer == "reset"
