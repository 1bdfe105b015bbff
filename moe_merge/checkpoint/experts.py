"""Expert layouts: AutoEP expert placement and native ``deepspeed.moe.layer.MoE`` experts, as
pure functions over a tag's :class:`TagFiles` and its loaded state dicts.

AutoEP expert parameters (``<layer>.experts.w1|w2|w3``, local shape [E_local, ...]) are
partitioned over the expert-data-parallel group of their expert-parallel rank; the expert
placement in ``ds_autoep_layers`` says which global experts each EP rank holds (every global
expert on exactly one EP rank, as many per rank as the local shapes hold). A full logical
expert tensor is [E, ...] with row e the global expert e; under ZeRO-1/2 the module copy of
expert e is in its own ``layer_L_expert_E_mp_rank_00_model_states.pt``.

Native MoE (ZeRO-0/1/2): each local expert is its own module
(``<layer>.deepspeed_moe.experts.deepspeed_experts.<i>.<...>``); the optimizer holds the experts
in a parameter group of their own (``"moe": True``, named ``ep_size_<EP>``) partitioned over the
expert-data-parallel group (``partition_count[g]`` ranks), under local names. Read back, every
expert parameter is named by its global expert index ``ep_rank * E_local + i``, the names
DeepSpeed gives them in its per-expert files, so layouts with different EP sizes line up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moe_merge.checkpoint import fields
from moe_merge.checkpoint.discover import is_int, show_value
from moe_merge.checkpoint.fields import MAX_EXPERTS
from moe_merge.checkpoint.safe_load import LazyTensor
from moe_merge.checkpoint.specs import (
    NATIVE_EXPERT_RE,
    ZERO12_FLATS,
    ExpertInfo,
    ParamSpec,
    Piece,
    TagFiles,
)
from moe_merge.errors import CheckpointError

WEIGHTS = ("w1", "w2", "w3")


# ---- AutoEP ------------------------------------------------------------------------------
def autoep_experts(tag: TagFiles, layers: list, dp_size: int
                   ) -> tuple[dict[str, ExpertInfo], int]:
    """AutoEP layers (``ds_autoep_layers`` of the model states): expert parameter name -> its
    experts and their placement, and the ep size (1 without AutoEP)."""
    f = tag.model_file
    path = tag.dir / f
    info: dict[str, ExpertInfo] = {}
    prefixes: dict[int, str] = {}
    eps = set()
    for i, entry in enumerate(layers):
        where = f"ds_autoep_layers[{i}]"
        if not isinstance(entry, dict):
            fields.bad(path, where, entry, "not an AutoEP layer record")
        n = fields.integer(path, f"{where}.num_experts", entry.get("num_experts"), 1, MAX_EXPERTS)
        ep = fields.integer(path, f"{where}.ep_size", entry.get("ep_size"), 1, n)
        layer = fields.integer(path, f"{where}.moe_layer_id", entry.get("moe_layer_id"), 0,
                               MAX_EXPERTS)
        prefix = fields.param_name(path, f"{where}.expert_key_prefix",
                                   entry.get("expert_key_prefix"))
        fields.param_name(path, f"{where}.module_path", entry.get("module_path"))
        if layer in prefixes or prefix in prefixes.values():
            raise CheckpointError(f"{path}: key '{where}' describes MoE layer {layer} "
                                  f"({prefix}) a second time")
        prefixes[layer] = prefix
        eps.add(ep)
        if tag.optim_files and dp_size % ep:
            raise CheckpointError(f"{path}: key '{where}.ep_size' is {ep}, which does not divide "
                                  f"the dp world size {dp_size}")
        value = entry.get("expert_placement")
        if value is not None:
            ranks = placement(path, f"{where}.expert_placement", value, n, ep)
        else:
            n_local = fields.integer(path, f"{where}.num_local_experts",
                                     entry.get("num_local_experts"), 1, n)
            if n_local * ep != n:
                raise CheckpointError(f"{path}: key '{where}': {n_local} local experts on each "
                                      f"of {ep} EP ranks are not {n} experts")
            ranks = {r: list(range(r * n_local, (r + 1) * n_local)) for r in range(ep)}
        for w in WEIGHTS:
            info[f"{prefix}.{w}"] = ExpertInfo(n, ranks, layer, prefix, w)
    if len(eps) > 1:
        raise CheckpointError(f"{path}: AutoEP layers with different ep sizes {sorted(eps)}: "
                              "not supported")
    ep_size = eps.pop() if eps else 1
    if tag.expert_files and prefixes:  # ZeRO-1/2 AutoEP: one file per global expert
        n_of = {e.layer_id: e.num_experts for e in info.values()}
        check_expert_files(tag, n_of, f"key 'ds_autoep_layers' of {f}")
    return info, ep_size


def placement(path, where: str, value: Any, n: int, ep: int) -> dict[int, list[int]]:
    """An AutoEP ``expert_placement`` (key ``where`` of ``path``): every one of the ``n``
    experts on exactly one of the ``ep`` EP ranks, each rank listed once."""
    if not isinstance(value, dict):
        fields.bad(path, where, value, "not an expert placement")
    for key, want in (("num_experts", n), ("ep_size", ep)):
        if key in value and value[key] != want:
            fields.bad(path, f"{where}.{key}", value[key], f"but the layer says {want}")
    ranks = value.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != ep:
        fields.bad(path, f"{where}.ranks", ranks, f"not a list of the {ep} EP ranks")
    out: dict[int, list[int]] = {}
    seen: set[int] = set()
    for j, r in enumerate(ranks):
        if not isinstance(r, dict):
            fields.bad(path, f"{where}.ranks[{j}]", r, "not a rank's placement")
        rank = fields.integer(path, f"{where}.ranks[{j}].rank", r.get("rank"), 0, ep - 1)
        if rank in out:
            raise CheckpointError(f"{path}: key '{where}.ranks' lists EP rank {rank} twice")
        experts = r.get("experts")
        if not isinstance(experts, list) or not experts:
            fields.bad(path, f"{where}.ranks[{j}].experts", experts, "not a list of expert ids")
        ids = []
        for x in experts:
            x = fields.integer(path, f"{where}.ranks[{j}].experts", x, 0, n - 1)
            if x in seen:
                raise CheckpointError(f"{path}: key '{where}' places expert {x} twice: refused")
            seen.add(x)
            ids.append(x)
        out[rank] = ids
    if len(seen) != n:
        missing = next(x for x in range(n) if x not in seen)
        raise CheckpointError(f"{path}: key '{where}' places expert {missing} on no EP rank: "
                              "refused")
    return out


def param_spec(tag: TagFiles, name: str, local_shape: tuple[int, ...],
               experts: dict[str, ExpertInfo]) -> ParamSpec:
    """The spec of parameter ``name`` of local shape ``local_shape``: for an AutoEP expert
    tensor, its full shape [E, ...], checked against the placement of its experts."""
    e = experts.get(name)
    if e is None:
        return ParamSpec(name, local_shape, local_shape)
    if len(local_shape) != 3:
        raise CheckpointError(f"{tag.dir}: AutoEP expert parameter {name} has local shape "
                              f"{list(local_shape)}, not [experts, rows, columns]")
    counts = {len(v) for v in e.placement.values()}
    path = tag.dir / tag.model_file
    if len(counts) > 1:
        raise CheckpointError(f"{path}: the AutoEP expert placement of MoE layer {e.layer_id} "
                              f"({name}) puts {sorted(counts)} experts on its EP ranks: "
                              "non-uniform placements are not supported")
    if counts != {local_shape[0]}:
        raise CheckpointError(f"{path}: the AutoEP expert placement of MoE layer {e.layer_id} "
                              f"puts {counts.pop()} experts on each EP rank, but {name} holds "
                              f"{local_shape[0]} per rank (local shape {list(local_shape)} in "
                              "param_shapes)")
    return ParamSpec(name, (e.num_experts, *local_shape[1:]), local_shape, e)


def zero3_ep_ranks(tag: TagFiles, mfile: str, state: dict, experts: dict[str, ExpertInfo],
                   ep_size: int) -> dict[str, int]:
    """ZeRO-3: expert parameter name -> the EP rank whose experts the rank's model-states file
    ``mfile`` (loaded: ``state``) holds."""
    path = tag.dir / mfile
    layers = fields.optional(path, "ds_autoep_layers", state.get("ds_autoep_layers"), list, [])
    out = {}
    for i, e in enumerate(layers):
        if not isinstance(e, dict):
            fields.bad(path, f"ds_autoep_layers[{i}]", e, "not an AutoEP layer record")
        prefix = fields.param_name(path, f"ds_autoep_layers[{i}].expert_key_prefix",
                                   e.get("expert_key_prefix"))
        if f"{prefix}.w1" not in experts:
            raise CheckpointError(f"{path}: key 'ds_autoep_layers[{i}]' names {prefix}, which "
                                  f"{tag.model_file} does not describe")
        ep_rank = fields.integer(path, f"ds_autoep_layers[{i}].ep_rank", e.get("ep_rank", 0), 0,
                                 ep_size - 1)
        for w in WEIGHTS:
            out[f"{prefix}.{w}"] = ep_rank
    return out


def check_autoep(tag: TagFiles, experts: dict[str, ExpertInfo],
                 params: dict[str, ParamSpec]) -> None:
    """Each AutoEP layer's w1, w2, w3: present, [E, I, H], [E, H, I], [E, I, H]."""
    path = tag.dir / tag.model_file
    for e in experts.values():
        if e.weight != "w1":
            continue
        names = [f"{e.prefix}.{w}" for w in WEIGHTS]
        for n in names:
            if n not in params:
                raise CheckpointError(f"{path}: AutoEP layer {e.prefix}: parameter {n} not in "
                                      "the checkpoint")
        s1, s2, s3 = (params[n].shape for n in names)
        if len(s1) != 3 or s1[0] != e.num_experts or s3 != s1 or s2 != (s1[0], s1[2], s1[1]):
            raise CheckpointError(f"{path}: AutoEP layer {e.prefix}: expert shapes w1 {list(s1)}, "
                                  f"w2 {list(s2)}, w3 {list(s3)} do not fit {e.num_experts} "
                                  "experts")


def check_expert_files(tag: TagFiles, n_of: dict[int, int], source: str) -> None:
    """The per-expert files are exactly ``layer_L_expert_E`` for every MoE layer L of
    ``n_of`` and every expert E < ``n_of[L]`` (``source`` says where ``n_of`` comes from)."""
    have: dict[int, set[int]] = {}
    for layer, e in tag.expert_files:
        have.setdefault(layer, set()).add(e)
    for layer, ids in sorted(have.items()):
        if layer not in n_of:
            raise CheckpointError(f"{tag.dir / tag.expert_files[(layer, min(ids))]}: an expert "
                                  f"file of MoE layer {layer}, which {source} does not have")
        extra = [e for e in ids if e >= n_of[layer]]
        if extra:
            raise CheckpointError(f"{tag.dir / tag.expert_files[(layer, min(extra))]}: expert "
                                  f"{min(extra)} of MoE layer {layer}, which has {n_of[layer]} "
                                  f"experts by {source}")
    for layer, n in sorted(n_of.items()):
        ids = have.get(layer, set())
        if len(ids) != n:
            missing = next(e for e in range(n) if e not in ids)
            raise CheckpointError(f"{tag.dir}: expert file layer_{layer}_expert_{missing}_mp_rank_"
                                  f"00_model_states.pt missing (MoE layer {layer} has {n} experts "
                                  f"by {source})")


# ---- native deepspeed.moe ----------------------------------------------------------------
def native_counts(tag: TagFiles, state: dict) -> int:
    """Native MoE: experts per layer, from the per-expert files, checked against the model
    states' (``state``) ``num_experts``; returns the largest."""
    layers: dict[int, int] = {}
    for layer, e in tag.expert_files:
        layers[layer] = max(layers.get(layer, 0), e + 1)
    if set(layers) != set(range(len(layers))):
        missing = next(x for x in range(len(layers) + 1) if x not in layers)
        raise CheckpointError(f"{tag.dir}: expert files of MoE layer {missing} missing (found "
                              f"layers {sorted(layers)[:8]})")
    counts = [layers[x] for x in range(len(layers))]
    raw = state.get("num_experts")
    if raw is not None and (not isinstance(raw, list) or len(raw) != len(counts) or any(
            not is_int(a) or a != b for a, b in zip(raw, counts, strict=True))):
        fields.bad(tag.dir / tag.model_file, "num_experts", raw, f"but the tag holds expert "
                   f"files of {counts} experts per MoE layer")
    check_expert_files(tag, dict(enumerate(counts)), "the expert files present")
    return max(counts)


def native_expert_files(tag: TagFiles, files: Mapping[str, dict]
                        ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Global expert parameter name -> (per-expert file, shape), from the per-expert files;
    every expert of a layer with the same parameters and shapes."""
    index: dict[str, tuple[str, tuple[int, ...]]] = {}
    layout: dict[int, dict[int, dict[tuple[str, str], tuple[int, ...]]]] = {}
    for (layer, e), fname in sorted(tag.expert_files.items()):
        path = tag.dir / fname
        for name, t in files[fname].items():
            if not isinstance(t, LazyTensor):
                continue
            m = NATIVE_EXPERT_RE.match(name) if fields.name_ok(name) else None
            if m is None or int(m.group(2)) != e:
                raise CheckpointError(f"{path}: "
                                      f"{name if fields.name_ok(name) else show_value(name)} is "
                                      f"not a parameter of expert {e}: refused")
            if name in index:
                raise CheckpointError(f"{path}: parameter {name} is in {index[name][0]} as well")
            fields.module_tensor(path, name, t, t.shape)
            index[name] = (fname, tuple(t.shape))
            layout.setdefault(layer, {}).setdefault(e, {})[(m.group(1), m.group(3))] = \
                tuple(t.shape)
    for layer, experts in sorted(layout.items()):
        first = experts.get(0, {})
        for e, params in sorted(experts.items()):
            if params != first or len({prefix for prefix, _ in params}) != 1:
                raise CheckpointError(f"{tag.dir / tag.expert_files[(layer, e)]}: expert {e} of "
                                      f"MoE layer {layer} has other parameters or shapes than "
                                      "expert 0 of its layer: refused")
    return index


def native_groups(path, osd: dict, ngroups: int, dp_size: int) -> dict[int, tuple[int, int]]:
    """Native-MoE optimizer groups of the optimizer state ``osd`` (of ``path``, with
    ``ngroups`` flat partitions): group index -> (ep size, expert-dp partition count)."""
    base = fields.optional(path, "optimizer_state_dict.base_optimizer_state",
                           osd.get("base_optimizer_state"), dict, {})
    groups = fields.optional(path, "optimizer_state_dict.base_optimizer_state.param_groups",
                             base.get("param_groups"), list, [])
    counts = osd.get("partition_count")
    out = {}
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            fields.bad(path, f"optimizer_state_dict.base_optimizer_state.param_groups[{g}]",
                       group, "not a parameter group")
        if not group.get("moe"):
            continue
        name = group.get("name")
        m = re.fullmatch(r"ep_size_([1-9][0-9]{0,8})", name) if isinstance(name, str) else None
        if m is None or not isinstance(counts, list) or g >= len(counts) or g >= ngroups:
            raise CheckpointError(f"{path}: MoE parameter group {g} has no 'ep_size_N' name, "
                                  "partition count or fp32 partition")
        count = fields.integer(path, f"optimizer_state_dict.partition_count[{g}]", counts[g], 1,
                               dp_size)
        out[g] = (int(m.group(1)), count)
    return out


def add_native(tag: TagFiles, specs: dict[str, ParamSpec], fname: str, g: int,
               frags: list[tuple[str, int, int]], ep_rank: int, order: int,
               shapes: list[dict[str, tuple[int, ...]]],
               native: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Add to ``specs`` the fragments ``frags`` of native-MoE group ``g`` of ``fname``, the
    partition ``order`` of EP rank ``ep_rank``, under global expert names (``native``: see
    :func:`native_expert_files`)."""
    path = tag.dir / fname
    local: dict[str, int] = {}
    parsed = []
    for name, start, numel in frags:
        m = NATIVE_EXPERT_RE.match(name)
        if m is None:
            raise CheckpointError(f"{path}: parameter {name} of MoE group {g} is not a "
                                  "deepspeed_moe expert")
        local[m.group(1)] = max(local.get(m.group(1), 0), int(m.group(2)) + 1)
        parsed.append((m, name, start, numel))
    for m, name, start, numel in parsed:
        gname = f"{m.group(1)}{ep_rank * local[m.group(1)] + int(m.group(2))}{m.group(3)}"
        if gname not in specs:
            shape = fields.shape_of(tag.dir / tag.model_file, shapes, g, name)
            if gname not in native or native[gname][1] != shape:
                raise CheckpointError(f"{path}: MoE group {g}: expert parameter {gname} (local "
                                      f"{name} of EP rank {ep_rank}) of shape {list(shape)} is "
                                      "not in the per-expert files")
            specs[gname] = ParamSpec(gname, shape, shape, module_file=native[gname][0])
        specs[gname].add(0, order, Piece(fname, (*ZERO12_FLATS, g), start, numel))
