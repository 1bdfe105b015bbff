"""Initial weights as a function of (seed, parameter name), whatever the parallel layout.

Every parameter of the transformers model follows its architecture's rule (what transformers'
``_init_weights`` does for Qwen3, Qwen3-MoE, Mixtral and Llama: a normal of std
``model.init_std`` for linear, embedding, router and fused expert weights, ones for norm weights,
zeros for biases). Its values are drawn in chunks of :data:`CHUNK` elements of the flattened
tensor, each chunk from its own generator seeded by (seed, name, chunk index). Any range of a
tensor can therefore be drawn on its own: a ZeRO-3 rank draws only its partition, an
expert-parallel rank only its experts, and the gathered weights are the same bits for every world
size, ZeRO stage and EP size. Values are drawn on the CPU in float32 (the same bits on any
accelerator) and copied where the tensor lives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

CHUNK = 1 << 20  # elements drawn from one generator


@dataclass(frozen=True)
class Rule:
    """How one parameter starts: ``normal`` (mean 0, ``std``), ``ones`` or ``zeros``."""

    kind: str
    std: float = 0.0
    zero_rows: tuple[int, ...] = ()
    """Rows set to zero after the normal draw (an embedding's padding index)."""


def init_rules(model: nn.Module, std: float) -> dict[str, Rule]:
    """The rule of every parameter of ``model`` (its ``named_parameters`` names), by the module
    that owns it; a parameter of a module this does not know is an error, not a guess."""
    rules = {}
    for name, _ in model.named_parameters():
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        cls = type(owner).__name__
        if isinstance(owner, nn.Embedding):
            pad = owner.padding_idx
            rules[name] = Rule("normal", std, () if pad is None else (pad,))
        elif isinstance(owner, nn.Linear):
            rules[name] = Rule("normal", std) if pname == "weight" else Rule("zeros")
        elif "RMSNorm" in cls or "LayerNorm" in cls:
            rules[name] = Rule("ones") if pname == "weight" else Rule("zeros")
        elif cls.endswith("Experts") or cls.endswith("TopKRouter"):
            rules[name] = Rule("normal", std) if pname != "bias" else Rule("zeros")
        else:
            raise ValueError(f"no initialisation rule for {name} ({cls}.{pname})")
    return rules


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def values(seed: int, name: str, shape: tuple[int, ...] | torch.Size, rule: Rule,
           start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Elements ``start:stop`` of the flattened initial value of parameter ``name`` (float32,
    CPU): the same bits however the tensor is split."""
    numel = 1
    for d in shape:
        numel *= d
    stop = numel if stop is None else stop
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"{name}: range {start}:{stop} outside its {numel} elements")
    if rule.kind == "ones":
        return torch.ones(stop - start)
    if rule.kind == "zeros" or start == stop:
        return torch.zeros(stop - start)
    out = torch.empty(stop - start)
    for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1):
        lo, hi = chunk * CHUNK, min((chunk + 1) * CHUNK, numel)
        block = torch.empty(hi - lo).normal_(0.0, rule.std, generator=_generator(seed, name, chunk))
        a, b = max(lo, start), min(hi, stop)
        out[a - start:b - start] = block[a - lo:b - lo]
    if rule.zero_rows:
        row = numel // shape[0]
        for r in rule.zero_rows:
            a, b = max(r * row, start), min((r + 1) * row, stop)
            if a < b:
                out[a - start:b - start] = 0.0
    return out


def full_value(seed: int, name: str, shape: tuple[int, ...] | torch.Size,
               rule: Rule) -> torch.Tensor:
    """The whole initial value of ``name``, shaped."""
    return values(seed, name, shape, rule).view(tuple(shape))


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter object (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def set_parameter(model: nn.Module, names: list[str], param: nn.Parameter) -> None:
    """Put ``param`` under each of ``names`` (one parameter object for tied weights)."""
    for name in names:
        owner_name, _, pname = name.rpartition(".")
        model.get_submodule(owner_name)._parameters[pname] = param


def meta_buffers(model: nn.Module) -> Iterator[nn.Module]:
    """Modules holding buffers on the meta device."""
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            yield module


def build_initialised(hf_cfg, seed: int, std: float,
                      local_experts: tuple[int, int] | None = None) -> nn.Module:
    """The transformers model of ``hf_cfg`` with every parameter drawn by :func:`values`,
    built without ever holding another copy: parameters are created on the meta device and
    then materialised one at a time. ``local_experts=(a, b)``: of each routed-expert tensor
    ([num_experts, ...]) only experts a..b-1 are drawn, the rest is left unwritten (pages never
    touched take no memory): under expert parallelism DeepSpeed's AutoEP copies out the rank's
    own experts and drops the tensor before anything reads the others."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.tie_weights()  # skipped with the initialisation: tied weights are one parameter
    rules = init_rules(model, std)
    aliases = tied_names(model)
    experts = getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "num_local_experts", 0)
    for name, p in list(model.named_parameters()):
        if local_experts is not None and ".mlp.experts." in name and p.shape[0] == experts:
            a, b = local_experts
            row = p[0].numel()
            data = torch.empty(p.shape, dtype=torch.float32)
            data.view(-1)[a * row:b * row] = values(seed, name, p.shape, rules[name],
                                                    a * row, b * row)
        else:
            data = full_value(seed, name, p.shape, rules[name])
        set_parameter(model, aliases[id(p)], nn.Parameter(data, requires_grad=p.requires_grad))
    for module in list(meta_buffers(model)):
        for bname, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[bname] = torch.empty(buf.shape, dtype=buf.dtype)
        model._init_weights(module)  # transformers' own rule for buffers (rotary frequencies)
    return model


def build_zero3(hf_cfg, seed: int, std: float, ds_config: dict) -> nn.Module:
    """The model of ``hf_cfg`` built inside ``deepspeed.zero.Init``: each rank only ever holds
    its own partitions, and draws only those (:func:`fill_zero3_partitions`)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        model.tie_weights()  # skipped with the initialisation
    fill_zero3_partitions(model, seed, std)
    return model


def fill_zero3_partitions(model: nn.Module, seed: int, std: float) -> None:
    """Draw each ZeRO-3 parameter's own partition (and, for a parameter DeepSpeed keeps whole
    on every rank, its full value) of a model built under ``deepspeed.zero.Init``."""
    import torch.distributed as dist

    rules = init_rules(model, std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = p.ds_tensor
            n = part.numel()
            rank = dist.get_rank(group=p.ds_process_group)
            start = min(rank * n, p.ds_numel)
            stop = min(start + n, p.ds_numel)
            part.zero_()
            part.view(-1)[:stop - start].copy_(values(seed, name, p.ds_shape, rules[name],
                                                      start, stop))
            if p.data.numel() == p.ds_numel:  # held whole too (persistent or available)
                p.data.copy_(full_value(seed, name, p.ds_shape, rules[name]))
