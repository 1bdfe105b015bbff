"""The vocabulary of layout parsing: a tag's files by role (:class:`TagFiles`), and what the
parse yields per parameter (:class:`ParamSpec`): its full logical shape, where its fp32 master
values lie (:class:`Piece` s of flat partitions), its experts for an AutoEP expert tensor, and
the per-expert file holding its module copy for a native MoE expert."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

NATIVE_EXPERT_RE = re.compile(
    r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)([0-9]{1,9})(\..+)$")
ZERO12_FLATS = ("optimizer_state_dict", "single_partition_of_fp32_groups")
ZERO3_FLATS = ("optimizer_state_dict", "fp32_flat_groups")
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TagFiles:
    """The files of one tag directory by their role, from their names alone; ``dir`` names
    them in errors."""
    dir: Path
    names: list[str]
    model_file: str  # mp_rank_00_model_states.pt, or rank 0's ZeRO-3 model states
    optim_files: dict[int, str]  # data-parallel rank -> its optimizer partition file
    zero3_model_files: dict[int, str]  # ZeRO-3: data-parallel rank -> its model-states file
    expert_files: dict[tuple[int, int], str]  # (MoE layer, global expert) -> per-expert file
    expp_files: dict[int, str]  # native MoE under ZeRO-0: EP rank -> its optimizer file


@dataclass
class Piece:
    """``numel`` elements from ``start`` of a flat tensor found at ``key`` in ``file``."""
    file: str
    key: tuple
    start: int
    numel: int


def for_state(piece: Piece, state: str) -> Piece:
    """The same slice of an Adam moment: ZeRO keeps moments in the layout of the fp32 groups."""
    if state == "fp32":
        return piece
    if state not in MOMENTS:
        raise ValueError(f"unknown optimizer state {state!r}")
    g = piece.key[-1]
    if piece.key[1] == ZERO12_FLATS[1]:  # ZeRO-1/2 and bf16
        key = ("optimizer_state_dict", "base_optimizer_state", "state", g, state)
    else:  # ZeRO-3
        key = ("optimizer_state_dict", "optimizer_state_dict", "state", g, state)
    return Piece(piece.file, key, piece.start, piece.numel)


@dataclass
class ExpertInfo:
    """The experts of one AutoEP expert tensor ``<prefix>.<weight>``."""
    num_experts: int
    placement: dict[int, list[int]]  # EP rank -> global expert ids, in local order
    layer_id: int
    prefix: str  # e.g. model.layers.0.mlp.experts
    weight: str  # w1 | w2 | w3


@dataclass
class ParamSpec:
    """One parameter: its shapes and, per EP rank, its pieces with their order in the
    parameter's flattened local tensor."""
    name: str
    shape: tuple[int, ...]  # full logical shape
    local_shape: tuple[int, ...]  # shape on one EP rank (== shape for non-expert params)
    expert: ExpertInfo | None = None
    pieces: dict[int, list[tuple[int, Piece]]] = field(default_factory=dict)  # ep -> (order, piece)
    module_file: str | None = None  # native MoE expert: the per-expert file holding its module copy

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_expert(self) -> bool:
        return self.expert is not None or NATIVE_EXPERT_RE.match(self.name) is not None

    def add(self, ep_rank: int, order: int, piece: Piece) -> None:
        """``piece`` holds the part ``order`` of this parameter's values on EP rank ``ep_rank``."""
        self.pieces.setdefault(ep_rank, []).append((order, piece))


def natural(name: str) -> list:
    """Sort key putting layers.10 after layers.9 and native expert 10 after expert 9, keeping
    the parameters of one expert in the order they were found (the sort is stable)."""
    m = NATIVE_EXPERT_RE.match(name)
    key = m.group(1) + m.group(2) if m else name
    parts = re.split(r"([0-9]+)", key)  # text at even positions, digit runs at odd ones
    return [(len(t.lstrip("0")), t.lstrip("0"), t) if i % 2 else t for i, t in enumerate(parts)]
