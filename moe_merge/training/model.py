"""Build HF transformers models from the recipe's model section, with no hub access."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_merge.config.recipe import ModelConfig


def hf_config(m: ModelConfig, vocab_size: int):
    """The transformers config for ``m``; ``vocab_size`` is used when m.vocab_size is 0."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=m.vocab_size or vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        initializer_range=m.init_std,
        use_cache=False,
        attn_implementation=m.attn_implementation,
    )
    if m.arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, intermediate_size=m.intermediate_size,
            moe_intermediate_size=m.moe_intermediate_size, num_experts=m.num_experts,
            num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=1,
            mlp_only_layers=[], output_router_logits=True,
            router_aux_loss_coef=m.router_aux_loss_coef,
        )
    if m.arch == "mixtral":
        return MixtralConfig(
            **common, intermediate_size=m.moe_intermediate_size, num_local_experts=m.num_experts,
            num_experts_per_tok=m.top_k, output_router_logits=True,
            router_aux_loss_coef=m.router_aux_loss_coef,
        )
    if m.arch == "qwen3":
        return Qwen3Config(**common, intermediate_size=m.intermediate_size)
    if m.arch == "llama":
        return LlamaConfig(**common, intermediate_size=m.intermediate_size)
    raise ValueError(f"unknown arch {m.arch!r}")


def import_model_code(arch: str) -> None:
    """Import what building and training ``arch`` under DeepSpeed imports, so that a resident
    set measured afterwards is the baseline the model's own memory adds to."""
    import importlib

    for name in ("deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
                 "deepspeed.runtime.zero.stage3", "deepspeed.module_inject.auto_ep",
                 "transformers", f"transformers.models.{arch}.modeling_{arch}"):
        importlib.import_module(name)


def build_model(m: ModelConfig, vocab_size: int, seed: int, device: str | torch.device = "cpu"):
    """A freshly initialised causal LM; ``device='meta'`` allocates nothing (for counting)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config(m, vocab_size), dtype=torch.float32)


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


@dataclass(frozen=True)
class ParamCounts:
    total: int
    expert: int
    active: int
    """Parameters a token passes through: non-expert + top_k / num_experts of the experts."""
    embedding: int

    def describe(self) -> str:
        return (f"total {human(self.total)} ({self.total:,}), active/token {human(self.active)} "
                f"({self.active:,}), experts {human(self.expert)}, "
                f"embeddings {human(self.embedding)}")


def count_params(m: ModelConfig, vocab_size: int) -> ParamCounts:
    model = build_model(m, vocab_size, seed=0, device="meta")
    total = expert = emb = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if is_expert_param(name):
            expert += p.numel()
        if "embed_tokens" in name or "lm_head" in name:
            emb += p.numel()
    active = total - expert + (expert * m.top_k // m.num_experts if m.is_moe else 0)
    return ParamCounts(total=total, expert=expert, active=active, embedding=emb)


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
