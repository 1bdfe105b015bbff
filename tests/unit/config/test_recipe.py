"""Recipe validation: every problem is one line naming the file and the key, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.runs import PY, REPO, run_cli

from moe_merge.config.recipe import load_recipe
from moe_merge.errors import ConfigError

TINY = REPO / "tests" / "recipes" / "moe_tiny.yaml"


@pytest.mark.parametrize("overrides, key", [
    (["model.nonexistent=1"], "model.nonexistent"),
    (["train.lr=fast"], "train.lr"),
    (["parallel.ep_size=3"], "parallel.ep_size"),            # does not divide 8 experts
    (["parallel.global_batch=15"], "parallel.global_batch"),  # not micro x world multiple
    (["model.num_experts=6", "parallel.ep_size=2", "parallel.world_size=3",
      "parallel.global_batch=24"], "parallel.ep_size"),        # ep does not divide world
    (["parallel.zero_stage=0"], "parallel.zero_stage"),       # AutoEP needs ZeRO >= 1
    (["model.arch=qwen3"], "parallel.ep_size"),              # EP on a dense model
    (["schedule.decay_shape=exp"], "schedule.decay_shape"),
    (["checkpoint.every_tokens=100"], "checkpoint.every_tokens"),  # less than one step
    (["train.max_tokens=1.5e3", "schedule.warmup_tokens=0"], "train.max_tokens"),
    (["model.top_k=9"], "model.top_k"),
    (["train.resume=maybe"], "train.resume"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(TINY) in msg and f"'{key}" in msg, msg


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  top_k: 2", "  top_k: 2\n  topk: 2"))
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.topk'"):
        load_recipe(bad)


def test_wrong_type_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("num_layers: 4", "num_layers: four"))
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'model.num_layers'"):
        load_recipe(bad)


def test_overrides_accept_scientific_notation():
    cfg = load_recipe(TINY, ["train.lr=3e-3", "checkpoint.every_tokens=2e5"])
    assert cfg.train.lr == 3e-3
    assert cfg.checkpoint.every_tokens == 2e5
    assert cfg.checkpoint_every_steps == int(2e5) // cfg.tokens_per_step


def test_cli_error_is_one_line_exit_2_and_no_run_dir(tmp_path):
    proc = run_cli([PY, "-m", "moe_merge.train", str(TINY), f"output_dir={tmp_path}",
                    "parallel.ep_size=3", "--dry-run"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.ep_size" in lines[0] and "moe_tiny.yaml" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_world_size_mismatch_is_refused_before_anything_is_written(tmp_path, data_cache):
    """A plain one-process launch of a 2-rank recipe: refused by the trainer itself."""
    proc = run_cli([PY, "-m", "moe_merge.train", str(TINY), f"output_dir={tmp_path}",
                    f"data.cache_dir={data_cache}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.world_size" in proc.stderr and "moe_tiny.yaml" in proc.stderr
    assert not (tmp_path / "moe_tiny").exists()


def test_missing_recipe_file():
    proc = run_cli([PY, "-m", "moe_merge.train", "recipes/nope.yaml", "--dry-run"])
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


def test_engine_config_must_not_carry_recipe_keys(tmp_path):
    from moe_merge.config.deepspeed import build_ds_config

    ds = tmp_path / "zero2.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 64}')
    cfg = load_recipe(TINY, [f"parallel.ds_config={ds}"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(cfg, 2)


def test_injected_batch_arithmetic():
    from moe_merge.config.deepspeed import build_ds_config

    cfg = load_recipe(TINY, ["parallel.global_batch=32", "parallel.micro_batch=4"])
    ds = build_ds_config(cfg, 2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 32
    assert ds["expert_parallel"]["autoep_size"] == 2
    assert ds["zero_optimization"]["stage"] == 2


def test_recipe_round_trips_through_yaml(tmp_path):
    from moe_merge.config.recipe import to_yaml

    cfg = load_recipe(TINY, ["train.lr=1e-3"])
    out = tmp_path / "r.yaml"
    out.write_text(to_yaml(cfg))
    assert load_recipe(out) == cfg
    assert Path(out).read_text().count("lr: 0.001") == 1
