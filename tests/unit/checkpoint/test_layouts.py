"""Layout parsing over hand-built state dicts (no files): for each layout (ZeRO-0, ZeRO-1/2
fragments, ZeRO-3 partitions, AutoEP placement, native MoE) where every parameter's fp32 values
lie, and malformed layouts refused in one line naming the key."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from moe_merge.checkpoint import layouts
from moe_merge.checkpoint.safe_load import FragmentAddress, LazyTensor, Record
from moe_merge.checkpoint.specs import ZERO3_FLATS, ZERO12_FLATS, Piece
from moe_merge.errors import CheckpointError

TAG = Path("/ckpt/run/checkpoints/global_step8")
MODEL = "mp_rank_00_model_states.pt"
OPT = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
Z3_MODEL = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
EXPERT = "layer_{}_expert_{}_mp_rank_00_model_states.pt"
NATIVE = "m.deepspeed_moe.experts.deepspeed_experts.{}.w"
_offsets = itertools.count(64, 4096)  # every record at its own bytes


def tensor(file: str, shape, dtype: str = "float32") -> LazyTensor:
    """A contiguous tensor of its own record in ``file``."""
    shape = tuple(shape)
    itemsize = {"float32": 4, "bfloat16": 2, "int64": 8}[dtype]
    n = math.prod(shape)
    rec = Record(TAG / file, f"a/data/{next(_offsets)}", next(_offsets), n * itemsize, 0, dtype,
                 itemsize)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return LazyTensor(rec, 0, shape, stride)


def frag(start: int, numel: int) -> FragmentAddress:
    f = FragmentAddress()
    f.start, f.numel = start, numel
    return f


def model_state(module: dict, **extra) -> dict:
    return {"module": module, "ds_version": "0.19.0", "global_steps": 8, **extra}


def parse(files: dict) -> layouts.Layout:
    return layouts.describe(layouts.classify(TAG, sorted(files)), files)


def refused(files: dict, *words: str) -> str:
    with pytest.raises(CheckpointError) as e:
        parse(files)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def pieces(spec) -> dict[int, list[tuple[int, Piece]]]:
    return {r: sorted(p, key=lambda t: t[0]) for r, p in spec.pieces.items()}


# ---- file names --------------------------------------------------------------------------
def test_classify_gives_each_file_its_role_from_the_name_alone():
    names = [MODEL, OPT.format(0), OPT.format(1), EXPERT.format(0, 3), "expp_rank_1_mp_rank_00_"
             "optim_states.pt", "zero_to_fp32.py", "meta.json"]
    tag = layouts.classify(TAG, names)
    assert tag.model_file == MODEL
    assert tag.optim_files == {0: OPT.format(0), 1: OPT.format(1)}
    assert tag.expert_files == {(0, 3): EXPERT.format(0, 3)}
    assert tag.expp_files == {1: "expp_rank_1_mp_rank_00_optim_states.pt"}
    assert layouts.classify(TAG, [Z3_MODEL.format(0), Z3_MODEL.format(1)]).model_file \
        == Z3_MODEL.format(0)


@pytest.mark.parametrize("names, words", [
    ([MODEL, "zero_pp_rank_0_mp_rank_01_optim_states.pt"], ["mp_rank > 0"]),
    ([MODEL, OPT.format(0), "bf16_" + OPT.format(1)], ["both bf16_zero_pp_rank_*"]),
    ([MODEL, "zero_pp_rank_0000000000_mp_rank_00_optim_states.pt"], ["10 digits"]),
    ([MODEL, OPT.format(1), "zero_pp_rank_01_mp_rank_00_optim_states.pt"], ["the same rank"]),
    ([OPT.format(0)], ["not a DeepSpeed checkpoint tag"]),
])
def test_classify_refuses_names_that_are_not_one_checkpoint(names, words):
    with pytest.raises(CheckpointError) as e:
        layouts.classify(TAG, names)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# ---- ZeRO-0 ------------------------------------------------------------------------------
def test_zero0_takes_every_parameter_from_the_module_but_buffers():
    module = {"a": tensor(MODEL, (2, 3), "bfloat16"), "rope": tensor(MODEL, (4,))}
    layout = parse({MODEL: model_state(module, buffer_names=["rope"])})
    assert layout.zero_stage == 0 and not layout.has_master and layout.step == 8
    assert list(layout.params) == ["a"] and layout.params["a"].shape == (2, 3)
    assert layout.params["a"].pieces == {}


def test_zero0_refuses_a_module_weight_that_is_not_floating_point():
    refused({MODEL: model_state({"a": tensor(MODEL, (3,), "int64")})}, "module weight a",
            "int64", "not floating-point")


# ---- ZeRO-1/2 ----------------------------------------------------------------------------
def zero12() -> dict:
    """dp 2: a (2x3) and b (4) in one group, cut 5 + 5: rank 0 a[0:5], rank 1 a[5:6] b[0:4]."""
    shapes = [{"a": (2, 3), "b": (4,)}]
    ms = model_state({"a": tensor(MODEL, (2, 3)), "b": tensor(MODEL, (4,))}, dp_world_size=2,
                     param_shapes=shapes, ds_config={"zero_optimization": {"stage": 2}})
    files = {MODEL: ms}
    for r, mapping in enumerate([{"a": frag(0, 5)}, {"a": frag(0, 1), "b": frag(1, 4)}]):
        files[OPT.format(r)] = {"optimizer_state_dict": {
            "zero_stage": 2, "partition_count": [2],
            "single_partition_of_fp32_groups": [tensor(OPT.format(r), (5,))],
            "param_slice_mappings": [mapping]}}
    return files


def osd(files: dict, rank: int) -> dict:
    return files[OPT.format(rank)]["optimizer_state_dict"]


def test_zero12_fragments_are_the_pieces_of_each_parameter_in_rank_order():
    layout = parse(zero12())
    assert (layout.zero_stage, layout.dp_size, layout.ep_size) == (2, 2, 1)
    assert list(layout.params) == ["a", "b"]
    a, b = layout.params["a"], layout.params["b"]
    assert a.shape == a.local_shape == (2, 3) and a.expert is None
    assert pieces(a) == {0: [(0, Piece(OPT.format(0), (*ZERO12_FLATS, 0), 0, 5)),
                             (1, Piece(OPT.format(1), (*ZERO12_FLATS, 0), 0, 1))]}
    assert pieces(b) == {0: [(1, Piece(OPT.format(1), (*ZERO12_FLATS, 0), 1, 4))]}


def test_zero12_refuses_overlapping_fragments():
    files = zero12()
    osd(files, 1)["param_slice_mappings"][0]["b"] = frag(0, 4)
    refused(files, OPT.format(1), "param_slice_mappings[0]'", "fragments of a and b overlap")


def test_zero12_refuses_a_fragment_outside_its_partition():
    files = zero12()
    osd(files, 1)["param_slice_mappings"][0]["b"] = frag(2, 4)
    refused(files, "key 'optimizer_state_dict.param_slice_mappings[0].b'", "elements 2..6",
            "outside the flat partition of 5 elements")


def test_zero12_refuses_a_fragment_that_is_not_a_fragment_address():
    files = zero12()
    osd(files, 0)["param_slice_mappings"][0]["a"] = (0, 5)
    refused(files, "key 'optimizer_state_dict.param_slice_mappings[0].a'",
            "not a fragment address")


def test_zero12_refuses_a_master_partition_that_is_not_float32():
    files = zero12()
    osd(files, 0)["single_partition_of_fp32_groups"][0] = tensor(OPT.format(0), (5,), "bfloat16")
    refused(files, "optimizer_state_dict.single_partition_of_fp32_groups.0", "bfloat16",
            "float32: refused")


def test_zero12_refuses_a_parameter_not_covered_by_its_fragments():
    files = zero12()
    osd(files, 1)["param_slice_mappings"][0]["b"] = frag(1, 3)
    refused(files, "parameter b has 3 master elements on EP rank 0, expected 4")


def test_zero12_refuses_a_missing_rank_and_a_bad_world_size():
    files = zero12()
    files[MODEL]["dp_world_size"] = 3
    refused(files, "optimizer partition of rank 2 missing", "key 'dp_world_size'")
    files[MODEL]["dp_world_size"] = True
    refused(files, "key 'dp_world_size' is True, not an integer")


def test_a_tag_named_for_another_step_is_refused():
    files = zero12()
    files[MODEL]["global_steps"] = 9
    refused(files, "named for step 8", "key 'global_steps'", "says step 9")


# ---- ZeRO-3 ------------------------------------------------------------------------------
def zero3() -> dict:
    """dp 2: a (5) cut in parts of 3 (rank 1 holds 2 and padding), b (2x2) in parts of 2."""
    shapes = [{"a": (5,), "b": (2, 2)}]
    files = {}
    for r in range(2):
        files[Z3_MODEL.format(r)] = model_state({}, dp_world_size=2, param_shapes=shapes)
        files[OPT.format(r)] = {"optimizer_state_dict": {
            "zero_stage": 3, "fp32_flat_groups": [tensor(OPT.format(r), (5,))],
            "ds_zero_partition_groups": [{"partition_count": 2, "partition_rank": r}]}}
    return files


def test_zero3_partitions_are_the_pieces_of_each_parameter_in_partition_order():
    layout = parse(zero3())
    assert layout.zero_stage == 3 and layout.tag.model_file == Z3_MODEL.format(0)
    key = (*ZERO3_FLATS, 0)
    assert pieces(layout.params["a"]) == {0: [(0, Piece(OPT.format(0), key, 0, 3)),
                                              (1, Piece(OPT.format(1), key, 0, 2))]}
    assert pieces(layout.params["b"]) == {0: [(0, Piece(OPT.format(0), key, 3, 2)),
                                              (1, Piece(OPT.format(1), key, 3, 2))]}
    assert layout.params["b"].shape == (2, 2)


def test_zero3_refuses_a_part_held_twice():
    files = zero3()
    files[OPT.format(1)]["optimizer_state_dict"]["ds_zero_partition_groups"][0][
        "partition_rank"] = 0
    refused(files, "the partitions of a (EP rank 0) are ranks [0, 0]", "not each of 0..1 once")


def test_zero3_refuses_a_partition_count_above_the_world_size():
    files = zero3()
    files[OPT.format(0)]["optimizer_state_dict"]["ds_zero_partition_groups"][0][
        "partition_count"] = 4
    refused(files, OPT.format(0),
            "key 'optimizer_state_dict.ds_zero_partition_groups[0].partition_count' is 4")


def test_zero3_refuses_ranks_that_disagree_on_the_shapes():
    files = zero3()
    files[Z3_MODEL.format(1)]["param_shapes"] = [{"a": (6,), "b": (2, 2)}]
    refused(files, Z3_MODEL.format(1), "key 'param_shapes' differs")


def test_zero3_refuses_a_flat_group_list_of_another_length():
    files = zero3()
    files[OPT.format(1)]["optimizer_state_dict"]["fp32_flat_groups"] = []
    refused(files, "key 'optimizer_state_dict.fp32_flat_groups' is [], not a list of 1 flat "
                   "groups")


# ---- AutoEP ------------------------------------------------------------------------------
def autoep(placement: list | None = None) -> dict:
    """ZeRO-2, dp 2, ep 2: 4 experts, EP rank 0 holds experts 2 and 3, EP rank 1 experts 0 and
    1; each rank's flat: its local w1, w2, w3 (12 elements each), rank 0 also the router."""
    ranks = placement or [{"rank": 0, "experts": [2, 3]}, {"rank": 1, "experts": [0, 1]}]
    layer = {"num_experts": 4, "ep_size": 2, "moe_layer_id": 0, "expert_key_prefix": "m.experts",
             "module_path": "m", "expert_placement": {"num_experts": 4, "ep_size": 2,
                                                      "ranks": ranks}}
    local = {"m.experts.w1": (2, 2, 3), "m.experts.w2": (2, 3, 2), "m.experts.w3": (2, 2, 3)}
    shapes = [{"m.router.weight": (4, 3), **local}]
    files = {MODEL: model_state({"m.router.weight": tensor(MODEL, (4, 3))}, dp_world_size=2,
                                param_shapes=shapes, ds_autoep_layers=[layer],
                                ds_config={"expert_parallel": {"enabled": True,
                                                               "preset_model": "mixtral"}})}
    for r in range(2):
        mapping = {n: frag(12 * i, 12) for i, n in enumerate(local)}
        if r == 0:
            mapping["m.router.weight"] = frag(36, 12)
        files[OPT.format(r)] = {"optimizer_state_dict": {
            "zero_stage": 2, "single_partition_of_fp32_groups": [tensor(OPT.format(r),
                                                                        (48 - 12 * r,))],
            "param_slice_mappings": [mapping]}}
    for g in range(4):
        f = EXPERT.format(0, g)
        files[f] = {f"m.experts.{w}.{g}": tensor(f, s[1:]) for w, s in
                    zip(("w1", "w2", "w3"), local.values())}
    return files


def placement_of(files: dict) -> dict:
    return files[MODEL]["ds_autoep_layers"][0]["expert_placement"]


def test_autoep_expert_tensors_are_full_over_the_placement():
    files = autoep()
    layout = parse(files)
    assert (layout.ep_size, layout.num_experts, layout.model.preset) == (2, 4, "mixtral")
    w1 = layout.params["m.experts.w1"]
    assert w1.shape == (4, 2, 3) and w1.local_shape == (2, 2, 3) and w1.is_expert
    assert w1.expert.placement == {0: [2, 3], 1: [0, 1]}
    assert pieces(w1) == {0: [(0, Piece(OPT.format(0), (*ZERO12_FLATS, 0), 0, 12))],
                          1: [(0, Piece(OPT.format(1), (*ZERO12_FLATS, 0), 0, 12))]}
    assert layout.params["m.experts.w2"].shape == (4, 3, 2)
    assert pieces(layout.params["m.router.weight"]) == {
        0: [(0, Piece(OPT.format(0), (*ZERO12_FLATS, 0), 36, 12))]}
    rows = layouts.module_tensors(layout, files, w1)  # one module copy per global expert
    assert [t.record.path.name for t in rows] == [EXPERT.format(0, g) for g in range(4)]


@pytest.mark.parametrize("ranks, words", [
    ([{"rank": 0, "experts": [2, 3]}, {"rank": 1, "experts": [0, 2]}],
     ["key 'ds_autoep_layers[0].expert_placement' places expert 2 twice"]),
    ([{"rank": 0, "experts": [2, 3]}, {"rank": 0, "experts": [0, 1]}],
     ["key 'ds_autoep_layers[0].expert_placement.ranks' lists EP rank 0 twice"]),
    ([{"rank": 0, "experts": [2, 3]}, {"rank": 1, "experts": [0, 9]}],
     ["key 'ds_autoep_layers[0].expert_placement.ranks[1].experts' is 9"]),
    ([{"rank": 0, "experts": [2, 3]}], ["key 'ds_autoep_layers[0].expert_placement.ranks'",
                                        "not a list of the 2 EP ranks"]),
    ([{"rank": 0, "experts": [2, 3, 1]}, {"rank": 1, "experts": [0]}],
     ["non-uniform placements are not supported"]),
])
def test_autoep_refuses_a_bad_placement(ranks, words):
    refused(autoep(ranks), MODEL, *words)


def test_autoep_refuses_an_expert_placed_nowhere():
    files = autoep([{"rank": 0, "experts": [2]}, {"rank": 1, "experts": [0]}])
    refused(files, "key 'ds_autoep_layers[0].expert_placement' places expert 1 on no EP rank")


def test_autoep_refuses_an_ep_size_that_does_not_divide_the_world():
    files = autoep()
    layer = files[MODEL]["ds_autoep_layers"][0]
    layer["ep_size"] = placement_of(files)["ep_size"] = 3
    refused(files, "key 'ds_autoep_layers[0].ep_size' is 3", "not divide the dp world size 2")


def test_autoep_refuses_a_missing_expert_file():
    files = autoep()
    del files[EXPERT.format(0, 3)]
    refused(files, "layer_0_expert_3_mp_rank_00_model_states.pt missing",
                   "key 'ds_autoep_layers'")


def test_autoep_refuses_local_shapes_that_do_not_fit_the_placement():
    files = autoep()
    files[MODEL]["param_shapes"][0]["m.experts.w2"] = (2, 3, 3)
    refused(files, "AutoEP layer m.experts", "expert shapes", "w2 [4, 3, 3]")


# ---- native deepspeed.moe ----------------------------------------------------------------
def native() -> dict:
    """ZeRO-2, dp 2, ep 2: one local expert per EP rank in the MoE group 1 (partition count 1),
    the gate in group 0 cut over both ranks; per-expert files under global expert names."""
    shapes = [{"m.gate.weight": (2, 3)}, {NATIVE.format(0): (2, 3)}]
    files = {MODEL: model_state({"m.gate.weight": tensor(MODEL, (2, 3))}, dp_world_size=2,
                                param_shapes=shapes, num_experts=[2])}
    for r in range(2):
        files[OPT.format(r)] = {"optimizer_state_dict": {
            "zero_stage": 2, "partition_count": [2, 1],
            "base_optimizer_state": {"param_groups": [{"moe": False},
                                                      {"moe": True, "name": "ep_size_2"}]},
            "single_partition_of_fp32_groups": [tensor(OPT.format(r), (3,)),
                                                tensor(OPT.format(r), (6,))],
            "param_slice_mappings": [{"m.gate.weight": frag(0, 3)},
                                     {NATIVE.format(0): frag(0, 6)}]}}
    for e in range(2):
        files[EXPERT.format(0, e)] = {NATIVE.format(e): tensor(EXPERT.format(0, e), (2, 3))}
    return files


def test_native_experts_are_named_by_their_global_index():
    layout = parse(native())
    assert layout.native_moe and (layout.ep_size, layout.num_experts) == (2, 2)
    assert list(layout.params) == ["m.gate.weight", NATIVE.format(0), NATIVE.format(1)]
    for e in range(2):
        spec = layout.params[NATIVE.format(e)]
        assert spec.module_file == EXPERT.format(0, e) and spec.is_expert
        assert pieces(spec) == {0: [(0, Piece(OPT.format(e), (*ZERO12_FLATS, 1), 0, 6))]}
    assert pieces(layout.params["m.gate.weight"]) == {
        0: [(0, Piece(OPT.format(0), (*ZERO12_FLATS, 0), 0, 3)),
            (1, Piece(OPT.format(1), (*ZERO12_FLATS, 0), 0, 3))]}


def test_native_refuses_an_expert_count_the_files_do_not_hold():
    files = native()
    files[MODEL]["num_experts"] = [3]
    refused(files, MODEL, "key 'num_experts' is [3]", "expert files of [2] experts")


def test_native_refuses_an_expert_file_holding_another_expert():
    files = native()
    files[EXPERT.format(0, 1)] = {NATIVE.format(0): tensor(EXPERT.format(0, 1), (2, 3))}
    refused(files, EXPERT.format(0, 1), "is not a parameter of expert 1")


def test_native_refuses_a_moe_group_without_its_ep_size():
    files = native()
    osd(files, 0)["base_optimizer_state"]["param_groups"][1]["name"] = "experts"
    refused(files, OPT.format(0), "MoE parameter group 1 has no 'ep_size_N' name")


def test_native_refuses_an_expert_partition_count_that_does_not_fit():
    files = native()
    osd(files, 1)["partition_count"] = [2, 2]
    refused(files, OPT.format(1), "MoE group 1", "ep size 2 and expert-data-parallel size 2 "
                                                 "do not agree")


def test_native_under_zero3_is_refused():
    files = native()
    for r in range(2):
        osd(files, r)["zero_stage"] = 3
    refused(files, "native deepspeed.moe.layer.MoE under ZeRO-3")
