"""How the model is computed (model.activation_checkpointing, model.attn_implementation) changes
memory and speed, not the numbers: oracle, the same model computed without checkpointing."""

from __future__ import annotations

import pytest
import torch
from support.runs import DENSE_RECIPE, MOE_RECIPE

from moe_merge.config.recipe import load_recipe
from moe_merge.errors import ConfigError
from moe_merge.training import init_weights as iw
from moe_merge.training.model import hf_config

ARCHS = {"qwen3_moe": MOE_RECIPE, "mixtral": MOE_RECIPE, "qwen3": DENSE_RECIPE,
         "llama": DENSE_RECIPE}


def _loss_and_grads(cfg, checkpointing: bool, tokens: torch.Tensor):
    model = iw.build_initialised(hf_config(cfg.model, 512), seed=3, std=cfg.model.init_std)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:].contiguous())
    # the trainer's loss: LM loss plus the router's load-balancing term
    loss = out.loss + (cfg.model.router_aux_loss_coef * out.aux_loss if cfg.model.is_moe else 0)
    loss.backward()
    assert model.is_gradient_checkpointing == checkpointing
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_gives_the_same_loss_and_gradients(arch):
    cfg = load_recipe(ARCHS[arch], [f"model.arch={arch}", "model.num_layers=2"])
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    loss0, grads0 = _loss_and_grads(cfg, False, tokens)
    loss1, grads1 = _loss_and_grads(cfg, True, tokens)
    assert torch.isfinite(loss0)
    assert abs(loss1 - loss0) <= 1e-6 * abs(loss0)
    assert grads0.keys() == grads1.keys()
    for name, g0 in grads0.items():
        assert g0 is not None and g0.abs().sum() > 0, name  # every parameter is trained
        rel = ((grads1[name] - g0).norm() / g0.norm()).item()
        assert rel <= 1e-6, (name, rel)


def test_the_attention_kernel_reaches_the_model():
    for impl in ("sdpa", "eager"):
        cfg = load_recipe(MOE_RECIPE, [f"model.attn_implementation={impl}", "model.num_layers=1"])
        model = iw.build_initialised(hf_config(cfg.model, 512), seed=0, std=0.02)
        assert model.config._attn_implementation == impl


def test_sdpa_is_what_transformers_picked_before_the_key():
    """The default keeps earlier runs' numbers: a config that names no kernel gets sdpa here."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(num_hidden_layers=1))
    cfg = load_recipe(MOE_RECIPE, [])
    assert model.config._attn_implementation == cfg.model.attn_implementation == "sdpa"


@pytest.mark.parametrize("override, words", [
    ("model.attn_implementation=fast", "is not one of sdpa, eager, flash_attention_2"),
    ("model.attn_implementation=flash_attention_2", "needs the flash-attn package"),
])
def test_bad_kernel_is_one_line_naming_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_recipe(MOE_RECIPE, [override])
    msg = str(e.value)
    assert "\n" not in msg and "'model.attn_implementation'" in msg and words in msg, msg


def test_checkpointing_on_an_architecture_without_it_is_refused(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.Qwen3MoeForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="'model.activation_checkpointing'.*does not support"):
        load_recipe(MOE_RECIPE, ["model.activation_checkpointing=true"])
    load_recipe(MOE_RECIPE, ["model.activation_checkpointing=false"])  # only when asked for


def test_a_resume_may_change_how_the_model_is_computed_but_not_the_model(tmp_path):
    from moe_merge.config.recipe import to_yaml
    from moe_merge.training.origin import check_resume_compatible

    stored = tmp_path / "recipe.yaml"
    stored.write_text(to_yaml(load_recipe(MOE_RECIPE, [])))
    for same in (["model.activation_checkpointing=true"], ["model.attn_implementation=eager"]):
        check_resume_compatible(load_recipe(MOE_RECIPE, same), stored)
    old = stored.read_text().replace("  activation_checkpointing: false\n", "")
    old = old.replace("  attn_implementation: sdpa\n", "")
    assert "activation_checkpointing" not in old and "attn_implementation" not in old
    stored.write_text(old)  # a run from before the keys existed
    check_resume_compatible(load_recipe(MOE_RECIPE, []), stored)
    with pytest.raises(ConfigError, match="'model': differs"):
        check_resume_compatible(load_recipe(MOE_RECIPE, ["model.hidden_size=96"]), stored)
