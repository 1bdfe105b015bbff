"""Where the fp32 values of each parameter of a DeepSpeed checkpoint tag lie, parsed from the
tag's file names and its loaded state dicts alone: :func:`describe` takes the
:class:`TagFiles` of :func:`classify` and a mapping file name -> loaded state dict (plain values
and :class:`LazyTensor` stand-ins; nothing is opened here) and returns a :class:`Layout`, every
parameter's :class:`ParamSpec` with the :class:`Piece` s of flat partitions that hold it.

Layouts (DeepSpeed 0.19; names as in DeepSpeed's own zero_to_fp32 / ds_to_universal):

- ZeRO-0 fp32: ``mp_rank_00_model_states.pt`` holds the full ``module``
  (:func:`specs_module`).
- ZeRO-1/2 (and bf16 at any stage <= 2): ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``
  per data-parallel rank R, holding that rank's slice of each parameter group's flat fp32 master
  vector (``single_partition_of_fp32_groups[g]``) and where each parameter lies in it
  (``param_slice_mappings[g][name] = (start, numel)``). ``mp_rank_00_model_states.pt`` holds the
  non-expert ``module`` and the shapes; AutoEP experts are in one
  ``layer_L_expert_E_mp_rank_00_model_states.pt`` per global expert (:func:`specs_zero12`).
- ZeRO-3: per rank R ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (shapes, AutoEP metadata of
  that rank) and ``..._optim_states.pt`` (``fp32_flat_groups[g]``: every parameter of group g
  cut in ceil(numel / P) pieces over the P ranks of the group's partition, padded)
  (:func:`specs_zero3`).

Expert layouts (AutoEP, native ``deepspeed.moe``) are in :mod:`~moe_merge.checkpoint.experts`.

A checkpoint is input from someone else, so everything its files say about their layout is
checked against the files before anything is read or allocated, and a disagreement is one
:class:`CheckpointError` line naming the file and key: every key and its type, ``dp_world_size``
against the optimizer partition files, ep sizes, expert counts and AutoEP expert placements
(every global expert on exactly one EP rank, as many per rank as the local shapes hold,
matching the per-expert files), ``param_slice_mappings`` fragments (inside their flat
partition, not overlapping), ZeRO-3 partition counts and ranks (each part of each parameter
held by exactly one partition), the stored step against the tag's name, and the master
partitions' dtype (float32). Every parameter's master elements must be exactly covered by the
partition files, so a shape can never be larger than what the files hold. Bounds (ranks,
experts per layer, characters of a name, elements of a parameter) are in
:mod:`~moe_merge.checkpoint.fields`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_merge.checkpoint import experts as ex
from moe_merge.checkpoint import fields
from moe_merge.checkpoint.discover import MAX_STEP, step_of_name
from moe_merge.checkpoint.fields import MAX_NUMEL, MAX_RANKS
from moe_merge.checkpoint.safe_load import FragmentAddress, LazyTensor
from moe_merge.checkpoint.specs import (
    ZERO3_FLATS,
    ZERO12_FLATS,
    ExpertInfo,
    ParamSpec,
    Piece,
    TagFiles,
    natural,
)
from moe_merge.errors import CheckpointError, IncompleteCheckpoint

OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_model_states\.pt$")
EXPERT_FILE_RE = re.compile(r"^layer_([0-9]+)_expert_([0-9]+)_mp_rank_([0-9]+)_model_states\.pt$")
EXPP_RE = re.compile(r"^expp_rank_([0-9]+)_mp_rank_([0-9]+)_optim_states\.pt$")
MODEL_FILE = "mp_rank_00_model_states.pt"

Files = Mapping[str, dict]  # file name in the tag -> its loaded state dict


@dataclass
class ModelInfo:
    """What the model-states file says besides the module: config, AutoEP layers, names."""
    state: dict  # the loaded model-states file
    ds_config: dict
    autoep_layers: list[dict]
    buffers: set[str]
    shared: dict[str, str]
    bf16: bool
    preset: str | None  # AutoEP preset model
    data_before_expert: bool  # ds_config.use_data_before_expert_parallelism


@dataclass
class Layout:
    """One tag: how it was trained and where each parameter's fp32 values lie."""
    tag: TagFiles
    model: ModelInfo
    zero_stage: int
    dp_size: int
    step: int
    native_moe: bool
    ep_size: int
    num_experts: int
    experts: dict[str, ExpertInfo]  # AutoEP expert parameter name -> its experts
    params: dict[str, ParamSpec]

    @property
    def has_master(self) -> bool:
        return bool(self.tag.optim_files)


def classify(tag_dir: Path, names: list[str]) -> TagFiles:
    """The files ``names`` of the tag ``tag_dir`` by their role, from the names alone."""
    optim: dict[int, str] = {}
    zero3_model: dict[int, str] = {}
    expert: dict[tuple[int, int], str] = {}
    expp: dict[int, str] = {}

    def num(name: str, text: str) -> int:
        if len(text) > 9:
            raise CheckpointError(f"{tag_dir / name}: a rank or index of {len(text)} digits in "
                                  "the file name: refused")
        return int(text)

    for n in names:
        if m := OPTIM_RE.match(n):
            table, key, mp = optim, num(n, m.group(2)), m.group(3)
        elif m := ZERO3_MODEL_RE.match(n):
            table, key, mp = zero3_model, num(n, m.group(1)), m.group(2)
        elif m := EXPERT_FILE_RE.match(n):
            table, key, mp = expert, (num(n, m.group(1)), num(n, m.group(2))), m.group(3)
        elif m := EXPP_RE.match(n):
            table, key, mp = expp, num(n, m.group(1)), m.group(2)
        else:
            continue
        if num(n, mp):
            raise CheckpointError(f"{tag_dir}: tensor/pipeline-parallel checkpoints "
                                  f"(mp_rank > 0: {n}) are not supported")
        if key in table:
            raise CheckpointError(f"{tag_dir}: {table[key]} and {n} name the same rank or "
                                  "expert: refused")
        table[key] = n
    if len({n.startswith("bf16_") for n in optim.values()}) > 1:
        raise CheckpointError(f"{tag_dir}: both bf16_zero_pp_rank_* and zero_pp_rank_* "
                              "optimizer files: not one checkpoint")
    if MODEL_FILE in names:
        model_file = MODEL_FILE
    elif 0 in zero3_model:
        model_file = zero3_model[0]
    else:
        raise CheckpointError(f"{tag_dir}: no {MODEL_FILE} or zero_pp_rank_0_mp_rank_00_model_"
                              "states.pt: not a DeepSpeed checkpoint tag")
    return TagFiles(tag_dir, list(names), model_file, optim, zero3_model, expert, expp)


def describe(tag: TagFiles, files: Files) -> Layout:
    """The layout of the tag: every check of what its files say, then every parameter's spec
    (in module order for the optimizer-partition layouts)."""
    model = model_info(tag, files[tag.model_file])
    stage = zero_stage(tag, files, model.ds_config)
    native_moe = bool(tag.expert_files) and not model.autoep_layers
    if native_moe and stage == 3:
        raise CheckpointError(f"{tag.dir}: native deepspeed.moe.layer.MoE under ZeRO-3 is not "
                              "a layout DeepSpeed writes; cannot read it")
    dp = dp_size(tag, model.state)
    step = stored_step(tag, model.state)
    experts, ep = ex.autoep_experts(tag, model.autoep_layers, dp)
    n_native = ex.native_counts(tag, model.state) if native_moe else 0
    native_ep = 1
    if not tag.optim_files:
        params, native_ep = specs_module(tag, files, model, stage, ep, native_moe)
    elif stage == 3:
        params = specs_zero3(tag, files, dp, ep, experts)
    else:
        params, native_ep = specs_zero12(tag, files, model, dp, ep, experts, native_moe)
    ex.check_autoep(tag, experts, params)
    if tag.optim_files:
        check_coverage(tag, files, params, stage)
    if native_moe:
        ep, n_experts = native_ep, n_native
    else:
        n_experts = max((e.num_experts for e in experts.values()), default=0)
    return Layout(tag, model, stage, dp, step, native_moe, ep, n_experts, experts, params)


# ---- the tag -----------------------------------------------------------------------------
def model_info(tag: TagFiles, ms: dict) -> ModelInfo:
    """The loaded model-states file ``ms``: a DeepSpeed model state, its keys checked."""
    path = tag.dir / tag.model_file
    for key in ("module", "ds_version"):
        if key not in ms:
            raise CheckpointError(f"{path}: key '{key}' missing: not a DeepSpeed model-states "
                                  "file")
    if not isinstance(ms["module"], dict):
        fields.bad(path, "module", ms["module"], "not a dict of tensors")
    if not isinstance(ms["ds_version"], str) or len(ms["ds_version"]) > 64:
        fields.bad(path, "ds_version", ms["ds_version"], "not a version string")
    ds_config = fields.optional(path, "ds_config", ms.get("ds_config"), dict, {})
    layers = fields.optional(path, "ds_autoep_layers", ms.get("ds_autoep_layers"), list, [])
    buffers = fields.optional(path, "buffer_names", ms.get("buffer_names"), (list, tuple, set),
                              [])
    for b in buffers:
        fields.param_name(path, "buffer_names", b)
    shared = dict(fields.optional(path, "shared_params", ms.get("shared_params"), dict, {}))
    bf16 = fields.optional(path, "ds_config.bf16", ds_config.get("bf16"), dict, {})
    is_bf16 = any(n.startswith("bf16_") for n in tag.optim_files.values()) or bool(
        bf16.get("enabled"))
    ep = fields.optional(path, "ds_config.expert_parallel", ds_config.get("expert_parallel"),
                         dict, {})
    preset = ep.get("preset_model") if ep.get("enabled") else None
    if preset is not None and not (isinstance(preset, str) and fields.name_ok(preset)):
        fields.bad(path, "ds_config.expert_parallel.preset_model", preset, "not a preset name")
    before = ds_config.get("use_data_before_expert_parallelism", False)
    if not isinstance(before, bool):
        fields.bad(path, "ds_config.use_data_before_expert_parallelism", before, "not a bool")
    return ModelInfo(ms, ds_config, layers, set(buffers), shared, is_bf16, preset, before)


def zero_stage(tag: TagFiles, files: Files, ds_config: dict) -> int:
    """The ZeRO stage: the first optimizer file's, else the one the config names."""
    if tag.optim_files:
        fname = tag.optim_files[min(tag.optim_files)]
        osd = fields.optimizer_state(tag.dir / fname, files[fname])
        if "zero_stage" in osd:
            return fields.integer(tag.dir / fname, "optimizer_state_dict.zero_stage",
                                  osd["zero_stage"], 0, 3)
    if tag.model_file != MODEL_FILE:  # only ZeRO-3 writes per-rank model-state files
        return 3
    path = tag.dir / tag.model_file
    zo = fields.optional(path, "ds_config.zero_optimization", ds_config.get("zero_optimization"),
                         dict, {})
    return fields.integer(path, "ds_config.zero_optimization.stage", zo.get("stage", 0), 0, 3)


def dp_size(tag: TagFiles, ms: dict) -> int:
    """``dp_world_size``, checked against the optimizer partition files (one per rank)."""
    f, n, optim = tag.model_file, len(tag.optim_files), tag.optim_files
    raw = ms.get("dp_world_size")
    dp = max(n, 1) if raw is None else fields.integer(tag.dir / f, "dp_world_size", raw, 1,
                                                      MAX_RANKS)
    if n:
        over = [r for r in optim if r >= dp]
        if over:
            raise CheckpointError(f"{tag.dir / optim[min(over)]}: a partition of rank "
                                  f"{min(over)}, but key 'dp_world_size' of {f} is {dp}")
        if n < dp:  # n distinct ranks below dp: some rank's file is missing
            missing = next(r for r in range(dp) if r not in optim)
            found = sorted(optim)
            shown = f"{found[:8]}".rstrip("]") + (", ...]" if len(found) > 8 else "]")
            raise IncompleteCheckpoint(f"{tag.dir}: optimizer partition of rank {missing} missing "
                                  f"(dp world size {dp}, key 'dp_world_size' of {f}; found "
                                  f"ranks {shown})")
    return dp


def stored_step(tag: TagFiles, ms: dict) -> int:
    """``global_steps``, which must be the step the tag is named for."""
    f = tag.model_file
    raw = ms.get("global_steps")
    step = 0 if raw is None else fields.integer(tag.dir / f, "global_steps", raw, 0, MAX_STEP)
    named = step_of_name(tag.dir.name, tag.dir)
    if raw is not None and named is not None and step != named:
        raise CheckpointError(f"{tag.dir}: the tag is named for step {named}, but key "
                              f"'global_steps' of {f} says step {step}: refused (a renamed or "
                              "crafted checkpoint)")
    return step


# ---- the layouts -------------------------------------------------------------------------
def specs_module(tag: TagFiles, files: Files, model: ModelInfo, stage: int, ep: int,
                 native_moe: bool) -> tuple[dict[str, ParamSpec], int]:
    """ZeRO-0 (no optimizer partitions): every parameter from its module weight; and the
    native-MoE ep size (one ``expp_rank`` optimizer file per EP rank)."""
    if model.bf16:
        raise CheckpointError(f"{tag.dir}: bf16 checkpoint without optimizer partitions: no fp32 "
                              "master weights to read")
    if stage > 0:
        raise IncompleteCheckpoint(f"{tag.dir}: ZeRO-{stage} checkpoint without its "
                              "*_optim_states.pt files")
    if ep > 1:
        raise CheckpointError(f"{tag.dir}: AutoEP with ep size {ep} and no optimizer partitions: "
                              "not a layout DeepSpeed writes")
    path = tag.dir / tag.model_file
    specs = {}
    for n, t in model.state["module"].items():
        if n in model.buffers:
            continue
        fields.param_name(path, "module", n)
        t = fields.module_tensor(path, n, t, t.shape if isinstance(t, LazyTensor) else ())
        specs[n] = ParamSpec(n, tuple(t.shape), tuple(t.shape))
    native = ex.native_expert_files(tag, files) if native_moe else {}
    for n, (fname, shape) in native.items():
        specs[n] = ParamSpec(n, shape, shape, module_file=fname)
    return specs, max(len(tag.expp_files), 1)


def fragments(tag: TagFiles, files: Files, fname: str, g: int, mapping: Any
              ) -> list[tuple[str, int, int]]:
    """``param_slice_mappings[g]`` of one rank's optimizer file ``fname``: (name, start, numel)
    of each fragment, checked to lie inside the flat partition and not to overlap another."""
    path = tag.dir / fname
    where = f"optimizer_state_dict.param_slice_mappings[{g}]"
    if not isinstance(mapping, dict):
        fields.bad(path, where, mapping, "not a dict of fragments")
    size = fields.flat(path, files[fname], (*ZERO12_FLATS, g)).numel()
    out = []
    for name, frag in mapping.items():
        fields.param_name(path, where, name)
        if not isinstance(frag, FragmentAddress):
            fields.bad(path, f"{where}.{name}", frag, "not a fragment address")
        start = fields.integer(path, f"{where}.{name}.start", getattr(frag, "start", None), 0,
                               MAX_NUMEL)
        numel = fields.integer(path, f"{where}.{name}.numel", getattr(frag, "numel", None), 0,
                               MAX_NUMEL)
        if start + numel > size:
            raise CheckpointError(f"{path}: key '{where}.{name}': elements {start}.."
                                  f"{start + numel} lie outside the flat partition of {size} "
                                  "elements")
        out.append((name, start, numel))
    end, prev = 0, None
    for name, start, numel in sorted((f for f in out if f[2]), key=lambda f: f[1]):
        if start < end:
            raise CheckpointError(f"{path}: key '{where}': the fragments of {prev} and {name} "
                                  "overlap: refused")
        end, prev = start + numel, name
    return out


def _coords(rank: int, ep: int, edp: int, before: bool) -> tuple[int, int]:
    """(EP rank, place in its expert-data-parallel group) of data-parallel rank ``rank``."""
    return (rank // edp, rank % edp) if before else (rank % ep, rank // ep)


def specs_zero12(tag: TagFiles, files: Files, model: ModelInfo, dp: int, ep: int,
                 experts: dict[str, ExpertInfo], native_moe: bool
                 ) -> tuple[dict[str, ParamSpec], int]:
    """ZeRO-1/2: every parameter's fragments of the ranks' flat fp32 partitions; and the
    native-MoE ep size (1 without native MoE)."""
    shapes = fields.param_shapes(tag.dir / tag.model_file, model.state.get("param_shapes"))
    specs: dict[str, ParamSpec] = {}
    native = ex.native_expert_files(tag, files) if native_moe else {}
    native_ep = 1
    before = model.data_before_expert
    if dp % ep:
        raise CheckpointError(f"{tag.dir}: dp size {dp} not divisible by ep size {ep}")
    edp = dp // ep
    group_of: dict[str, tuple[int, str]] = {}
    moe_group_ids: set[int] = set()
    for rank, fname in sorted(tag.optim_files.items()):
        path = tag.dir / fname
        osd = fields.optimizer_state(path, files[fname])
        flats = osd.get("single_partition_of_fp32_groups")
        if flats is None:
            raise CheckpointError(f"{path}: key 'optimizer_state_dict."
                                  "single_partition_of_fp32_groups' missing")
        if not isinstance(flats, list):
            fields.bad(path, "optimizer_state_dict.single_partition_of_fp32_groups", flats,
                       "not a list of flat partitions")
        mappings = osd.get("param_slice_mappings")
        if mappings is None:
            raise CheckpointError(f"{path}: key 'param_slice_mappings' missing (checkpoint from "
                                  "a DeepSpeed older than 0.10?)")
        if not isinstance(mappings, list) or len(mappings) != len(flats):
            fields.bad(path, "optimizer_state_dict.param_slice_mappings", mappings,
                       f"not a list of {len(flats)} groups (as many as optimizer_state_dict."
                       "single_partition_of_fp32_groups)")
        moe_groups = ex.native_groups(path, osd, len(mappings), dp) if native_moe else {}
        moe_group_ids |= set(moe_groups)
        for g, mapping in enumerate(mappings):
            frags = fragments(tag, files, fname, g, mapping)
            if g in moe_groups:
                g_ep, g_edp = moe_groups[g]
                if dp % g_ep or dp // g_ep != g_edp:
                    raise CheckpointError(f"{path}: MoE group {g}: dp size {dp}, ep size {g_ep} "
                                          f"and expert-data-parallel size {g_edp} do not agree")
                native_ep = max(native_ep, g_ep)
                ep_rank, order = _coords(rank, g_ep, g_edp, before)
                ex.add_native(tag, specs, fname, g, frags, ep_rank, order, shapes, native)
                continue
            for name, start, numel in frags:
                other = group_of.setdefault(name, (g, fname))
                if other[0] != g:
                    raise CheckpointError(f"{path}: parameter {name} is in parameter group {g} "
                                          f"here but in group {other[0]} in {other[1]}")
                if name not in specs:
                    local = fields.shape_of(tag.dir / tag.model_file, shapes, g, name)
                    specs[name] = ex.param_spec(tag, name, local, experts)
                ep_rank, order = _coords(rank, ep, edp, before) if name in experts else (0, rank)
                specs[name].add(ep_rank, order, Piece(fname, (*ZERO12_FLATS, g), start, numel))
    for g, group in enumerate(shapes):  # every parameter has master values somewhere
        if g in moe_group_ids:
            continue
        for name, shape in group.items():
            if name not in specs:
                if math.prod(shape):
                    raise CheckpointError(f"{tag.dir}: parameter {name} (param_shapes[{g}] of "
                                          f"{tag.model_file}) is in no optimizer partition")
                specs[name] = ex.param_spec(tag, name, shape, experts)
    return ordered(model.state["module"], specs), native_ep


def specs_zero3(tag: TagFiles, files: Files, dp: int, ep: int, experts: dict[str, ExpertInfo]
                ) -> dict[str, ParamSpec]:
    """ZeRO-3: every parameter's part of each rank's flat fp32 group, in partition order."""
    specs: dict[str, ParamSpec] = {}
    first_shapes = None
    counts: dict[tuple[str, int], int] = {}  # (name, EP rank) -> partitions it is cut in
    extra = sorted(set(tag.zero3_model_files) - set(tag.optim_files))
    if extra:
        raise IncompleteCheckpoint(f"{tag.dir / tag.zero3_model_files[extra[0]]}: no optimizer "
                              f"partition of rank {extra[0]} beside it")
    for rank, fname in sorted(tag.optim_files.items()):
        mfile = tag.zero3_model_files.get(rank)
        if mfile is None:
            raise IncompleteCheckpoint(f"{tag.dir}: zero_pp_rank_{rank}_mp_rank_00_model_"
                                       "states.pt missing")
        mstate = files[mfile]
        shapes = fields.param_shapes(tag.dir / mfile, mstate.get("param_shapes"))
        if first_shapes is None:
            first_shapes = shapes
        elif shapes != first_shapes:
            raise CheckpointError(f"{tag.dir / mfile}: key 'param_shapes' differs from "
                                  f"{tag.model_file}'s")
        ep_rank_of = ex.zero3_ep_ranks(tag, mfile, mstate, experts, ep)
        path = tag.dir / fname
        osd = fields.optimizer_state(path, files[fname])
        flats = osd.get("fp32_flat_groups")
        if flats is None:
            raise CheckpointError(f"{path}: key 'optimizer_state_dict.fp32_flat_groups' missing")
        if not isinstance(flats, list) or len(flats) != len(shapes):
            fields.bad(path, "optimizer_state_dict.fp32_flat_groups", flats,
                       f"not a list of {len(shapes)} flat groups (one per param_shapes group)")
        groups = fields.optional(path, "optimizer_state_dict.ds_zero_partition_groups",
                                 osd.get("ds_zero_partition_groups"), list, [])
        for g, group_shapes in enumerate(shapes):
            where = f"optimizer_state_dict.ds_zero_partition_groups[{g}]"
            meta = groups[g] if g < len(groups) else {}
            if not isinstance(meta, dict):
                fields.bad(path, where, meta, "not a partition group record")
            count = fields.integer(path, f"{where}.partition_count",
                                   meta.get("partition_count", dp), 1, dp)
            prank = fields.integer(path, f"{where}.partition_rank",
                                   meta.get("partition_rank", rank), 0, count - 1)
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                part = -(-numel // count)
                take = max(0, min(part, numel - prank * part))
                if name not in specs:
                    specs[name] = ex.param_spec(tag, name, shape, experts)
                ep_rank = ep_rank_of.get(name, 0) if name in experts else 0
                if counts.setdefault((name, ep_rank), count) != count:
                    raise CheckpointError(f"{path}: key '{where}.partition_count' is {count}, "
                                          f"but another rank's file cuts {name} in "
                                          f"{counts[(name, ep_rank)]} partitions")
                specs[name].add(ep_rank, prank, Piece(fname, (*ZERO3_FLATS, g), offset, take))
                offset += part
    for (name, ep_rank), count in counts.items():
        have = sorted(o for o, _ in specs[name].pieces[ep_rank])
        if have != list(range(count)):
            raise CheckpointError(f"{tag.dir}: the partitions of {name} (EP rank {ep_rank}) are "
                                  f"ranks {have[:8]} of its partition group, not each of "
                                  f"0..{count - 1} once: refused")
    return ordered(files[tag.model_file]["module"], specs)


def ordered(module: dict, specs: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
    """Parameters in module order (the order of the model-states ``module`` dict), the others
    after them in natural order."""
    order = [n for n in module if n in specs]
    known = set(order)
    rest = sorted((n for n in specs if n not in known), key=natural)
    return {n: specs[n] for n in [*order, *rest]}


# ---- checks and lookups over a layout ----------------------------------------------------
def piece_tensor(tag: TagFiles, files: Files, piece: Piece) -> LazyTensor:
    """The elements of ``piece``, checked to lie inside their flat partition."""
    obj = fields.flat(tag.dir / piece.file, files[piece.file], piece.key)
    if piece.start < 0 or piece.numel < 0 or piece.start + piece.numel > obj.numel():
        raise CheckpointError(f"{tag.dir / piece.file}: flat partition "
                              f"{'.'.join(map(str, piece.key))} has {obj.numel()} elements, "
                              f"needs {piece.start + piece.numel}")
    return obj.narrow(piece.start, piece.numel)


def check_coverage(tag: TagFiles, files: Files, params: dict[str, ParamSpec], stage: int
                   ) -> None:
    """Every parameter's master elements covered exactly (so that no shape asks for more than
    the files hold), every piece inside a float32 flat partition, no two partitions sharing
    bytes; the module copies of the weights (ZeRO-1/2) floating-point, of the same shapes."""
    flats: dict[tuple[str, tuple], LazyTensor] = {}
    for name, spec in params.items():
        want = math.prod(spec.local_shape)
        ranks = set(spec.expert.placement) if spec.expert else {0}
        if want and set(spec.pieces) != ranks:
            missing = sorted(ranks - set(spec.pieces))
            raise CheckpointError(f"{tag.dir}: master weights of {name} missing for EP ranks "
                                  f"{missing}" if missing else
                                  f"{tag.dir}: master weights of {name} for EP ranks "
                                  f"{sorted(set(spec.pieces) - ranks)}, which hold none of its "
                                  "experts")
        for ep_rank, pieces in spec.pieces.items():
            orders = [o for o, _ in pieces]
            if len(set(orders)) != len(orders):
                raise CheckpointError(f"{tag.dir}: two partitions hold the same part of {name} "
                                      f"(EP rank {ep_rank}): refused")
            have = sum(p.numel for _, p in pieces)
            if have != want:
                raise CheckpointError(f"{tag.dir}: parameter {name} has {have} master elements "
                                      f"on EP rank {ep_rank}, expected {want}")
            for _, p in pieces:
                piece_tensor(tag, files, p)
                flats.setdefault((p.file, p.key),
                                 fields.flat(tag.dir / p.file, files[p.file], p.key))
    spans = sorted((str(t.record.path), t.file_offset, t.file_offset + t.numel() * 4, k)
                   for k, t in flats.items() if t.numel())
    for a, b in itertools.pairwise(spans):
        if a[0] == b[0] and b[1] < a[2]:
            raise CheckpointError(f"{tag.dir / b[3][0]}: flat partition "
                                  f"{'.'.join(map(str, b[3][1]))} shares its bytes with "
                                  f"{a[3][0]} {'.'.join(map(str, a[3][1]))}: refused")
    if stage < 3:
        module = files[tag.model_file]["module"]
        for name, spec in params.items():
            t = module.get(name) if spec.expert is None and spec.module_file is None else None
            if t is not None:
                fields.module_tensor(tag.dir / tag.model_file, name, t, spec.shape)


def module_tensors(layout: Layout, files: Files, spec: ParamSpec) -> list[LazyTensor]:
    """The module weights of ``spec`` (one, or one per expert of an AutoEP expert tensor),
    checked."""
    tag = layout.tag
    if layout.zero_stage == 3:
        raise CheckpointError(f"{tag.dir}: ZeRO-3 checkpoints hold no full module weights; "
                              "read the fp32 master weights (--source master)")
    if spec.module_file is not None:
        t = files[spec.module_file].get(spec.name)
        return [fields.module_tensor(tag.dir / spec.module_file, spec.name, t, spec.shape)]
    if spec.expert is None:
        t = files[tag.model_file]["module"].get(spec.name)
        return [fields.module_tensor(tag.dir / tag.model_file, spec.name, t, spec.shape)]
    e = spec.expert
    rows = []
    for g in range(e.num_experts):
        fname = tag.expert_files.get((e.layer_id, g))
        if fname is None:
            raise IncompleteCheckpoint(f"{tag.dir}: expert file layer_{e.layer_id}_expert_{g}_"
                                  "mp_rank_00_model_states.pt missing")
        key = f"{e.prefix}.{e.weight}.{g}"
        rows.append(fields.module_tensor(tag.dir / fname, key, files[fname].get(key),
                                         spec.shape[1:]))
    return rows
