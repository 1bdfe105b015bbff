"""Initial weights drawn per (seed, name, chunk): the rules agree with transformers' own
initialisation, any range of a tensor is the same bits as that range of the whole, and the
model is built without holding a second copy."""

from __future__ import annotations

import pytest
import torch
from support.runs import DENSE_RECIPE, MOE_RECIPE

from moe_merge.config.recipe import load_recipe
from moe_merge.training import init_weights as iw
from moe_merge.training.model import build_model, hf_config

ARCHS = {"qwen3_moe": MOE_RECIPE, "mixtral": MOE_RECIPE, "qwen3": DENSE_RECIPE,
         "llama": DENSE_RECIPE}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_rules_are_what_transformers_initialises(arch):
    """Oracle: a model initialised by transformers. Ones and zeros exactly; normals with the
    recipe's std (within 10%) and mean 0."""
    cfg = load_recipe(ARCHS[arch], [f"model.arch={arch}", "model.num_layers=2"])
    std = cfg.model.init_std
    reference = build_model(cfg.model, 512, seed=1)
    ours = iw.build_initialised(hf_config(cfg.model, 512), seed=1, std=std)
    rules = iw.init_rules(ours, std)
    assert list(rules) == [n for n, _ in reference.named_parameters()]
    for name, p in reference.named_parameters():
        rule, q = rules[name], dict(ours.named_parameters())[name]
        assert q.shape == p.shape and q.dtype == p.dtype == torch.float32
        if rule.kind == "ones":
            assert (p == 1).all() and (q == 1).all(), name
        elif rule.kind == "zeros":
            assert (p == 0).all() and (q == 0).all(), name
        else:
            for t in (p, q):
                assert abs(t.std().item() - std) < 0.1 * std and abs(t.mean().item()) < 0.1 * std
    for (name, a), (_, b) in zip(reference.named_buffers(), ours.named_buffers()):
        assert torch.equal(a, b), name  # the rotary frequencies, recomputed after meta


def test_a_range_is_the_same_bits_as_that_range_of_the_whole():
    rule = iw.Rule("normal", 0.02, zero_rows=(3,))
    shape = (5, iw.CHUNK // 2 + 7)  # rows straddle chunks
    whole = iw.values(0, "w", shape, rule)
    for start, stop in [(0, 1), (iw.CHUNK - 3, iw.CHUNK + 5), (17, whole.numel()),
                        (whole.numel() // 3, 2 * whole.numel() // 3)]:
        assert torch.equal(iw.values(0, "w", shape, rule, start, stop), whole[start:stop])
    assert (whole.view(shape)[3] == 0).all() and (whole.view(shape)[2] != 0).all()
    assert not torch.equal(whole, iw.values(1, "w", shape, rule))  # the seed matters
    assert not torch.equal(whole, iw.values(0, "v", shape, rule))  # and the name
    with pytest.raises(ValueError, match="outside"):
        iw.values(0, "w", shape, rule, 0, whole.numel() + 1)


def test_tied_embeddings_stay_one_parameter():
    cfg = load_recipe(DENSE_RECIPE, ["model.tie_word_embeddings=true", "model.num_layers=1"])
    model = iw.build_initialised(hf_config(cfg.model, 512), seed=0, std=0.02)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())


def test_an_unknown_module_has_no_rule():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="no initialisation rule for 0.weight"):
        iw.init_rules(model, 0.02)
