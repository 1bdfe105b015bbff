"""Read one DeepSpeed checkpoint tag (``global_stepN/``) as full logical fp32 tensors.

Layouts (DeepSpeed 0.19; names as in DeepSpeed's own zero_to_fp32 / ds_to_universal):

- ZeRO-0 fp32: ``mp_rank_00_model_states.pt`` holds the full ``module``.
- ZeRO-1/2 (and bf16 at any stage <= 2): ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``
  per data-parallel rank R, holding that rank's slice of each parameter group's flat fp32 master
  vector (``single_partition_of_fp32_groups[g]``) and where each parameter lies in it
  (``param_slice_mappings[g][name] = (start, numel)``). ``mp_rank_00_model_states.pt`` holds the
  non-expert ``module`` and the shapes; AutoEP experts are in one
  ``layer_L_expert_E_mp_rank_00_model_states.pt`` per global expert.
- ZeRO-3: per rank R ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (shapes, AutoEP metadata of
  that rank) and ``..._optim_states.pt`` (``fp32_flat_groups[g]``: every parameter of group g
  cut in ceil(numel / P) pieces over the P ranks of the group's partition, padded).

Native ``deepspeed.moe.layer.MoE`` (ZeRO-0/1/2): each local expert is its own module
(``<layer>.deepspeed_moe.experts.deepspeed_experts.<i>.<...>``); the optimizer holds the experts
in a parameter group of their own (``"moe": True``, named ``ep_size_<EP>``) partitioned over the
expert-data-parallel group (``partition_count[g]`` ranks), under local names. Read back, every
expert parameter is named by its global expert index ``ep_rank * E_local + i``, the names
DeepSpeed gives them in its per-expert files, so layouts with different EP sizes line up.

AutoEP expert parameters (``<layer>.experts.w1|w2|w3``, local shape [E_local, ...]) are
partitioned over the expert-data-parallel group of their expert-parallel rank; the expert
placement in ``ds_autoep_layers`` says which global experts each EP rank holds. A full logical
expert tensor is [E, ...] with row e the global expert e.

Files are opened with :func:`moe_merge.checkpoint.safe_load.load` (no torch, no code run):
their tensors are :class:`LazyTensor` records, and values are read with ``pread`` where they are
needed. A merge touches only the fp32 master bytes it needs, never the optimizer moments; torch
is imported only where a torch tensor is returned (:meth:`DSCheckpoint.read`).

A checkpoint is input from someone else, so everything its files say about their layout is
checked against the files before anything is read or allocated, and a disagreement is one
:class:`CheckpointError` line naming the file and key: the tag's files (regular files, or
symlinks to regular files inside the tag; no FIFOs, devices or symlinks leading out), every key
and its type, ``dp_world_size`` against the optimizer partition files, ep sizes, expert counts
and AutoEP expert placements (every global expert on exactly one EP rank, as many per rank as
the local shapes hold, matching the per-expert files), ``param_slice_mappings`` fragments
(inside their flat partition, not overlapping), ZeRO-3 partition counts and ranks (each part of
each parameter held by exactly one partition), the stored step against the tag's name, and the
master partitions' dtype (float32). Every parameter's master elements must be exactly covered
by the partition files, so a shape can never be larger than what the files hold; read from
module weights (no optimizer partitions) the output is at most :data:`MODULE_BYTES_FACTOR`
times the tag's bytes on disk (tied weights share one storage). Bounds: :data:`MAX_RANKS`
ranks, :data:`MAX_EXPERTS` experts per layer, :data:`MAX_NAME` characters per parameter name.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import stat
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from moe_merge.checkpoint.discover import MAX_STEP, is_int, show_value, step_of_name
from moe_merge.checkpoint.safe_load import (
    FragmentAddress,
    LazyTensor,
    Record,
    load,
    open_regular,
    pread_exact,
    real_path,
)
from moe_merge.errors import CheckpointError

try:  # Intel ISA-L's CRC-32: ~4x zlib's speed; same polynomial, same values
    from isal.isal_zlib import crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    crc32, _crc32_combine = zlib.crc32, None

OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)_model_states\.pt$")
EXPERT_FILE_RE = re.compile(r"^layer_([0-9]+)_expert_([0-9]+)_mp_rank_([0-9]+)_model_states\.pt$")
EXPP_RE = re.compile(r"^expp_rank_([0-9]+)_mp_rank_([0-9]+)_optim_states\.pt$")
NATIVE_EXPERT_RE = re.compile(
    r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)([0-9]{1,9})(\..+)$")
MODEL_FILE = "mp_rank_00_model_states.pt"
MAX_RANKS = 1 << 20  # data-parallel / expert-parallel ranks
MAX_EXPERTS = 1 << 16  # experts of one MoE layer
MAX_NAME = 1024  # characters of a parameter name
MAX_NUMEL = 1 << 48  # elements of one parameter
MODULE_BYTES_FACTOR = 8  # output bytes read from module weights, per byte of the tag
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_CRC_POOL: ThreadPoolExecutor | None = None


@dataclass
class Piece:
    """``numel`` elements from ``start`` of a flat tensor found at ``key`` in ``file``."""
    file: str
    key: tuple
    start: int
    numel: int


def _for_state(piece: Piece, state: str) -> Piece:
    """The same slice of an Adam moment: ZeRO keeps moments in the layout of the fp32 groups."""
    if state == "fp32":
        return piece
    if state not in ("exp_avg", "exp_avg_sq"):
        raise ValueError(f"unknown optimizer state {state!r}")
    g = piece.key[-1]
    if piece.key[1] == "single_partition_of_fp32_groups":  # ZeRO-1/2 and bf16
        key = ("optimizer_state_dict", "base_optimizer_state", "state", g, state)
    else:  # ZeRO-3
        key = ("optimizer_state_dict", "optimizer_state_dict", "state", g, state)
    return Piece(piece.file, key, piece.start, piece.numel)


@dataclass
class ExpertInfo:
    num_experts: int
    placement: dict[int, list[int]]  # EP rank -> global expert ids, in local order
    layer_id: int
    prefix: str  # e.g. model.layers.0.mlp.experts
    weight: str  # w1 | w2 | w3


@dataclass
class ParamSpec:
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


def _natural(name: str) -> list:
    """Sort key putting layers.10 after layers.9 and native expert 10 after expert 9, keeping
    the parameters of one expert in the order they were found (the sort is stable)."""
    m = NATIVE_EXPERT_RE.match(name)
    key = m.group(1) + m.group(2) if m else name
    parts = re.split(r"([0-9]+)", key)  # text at even positions, digit runs at odd ones
    return [(len(t.lstrip("0")), t.lstrip("0"), t) if i % 2 else t for i, t in enumerate(parts)]


def _crc_range(record: Record, start: int, nbytes: int, crc: int = 0,
               root: Path | None = None) -> int:
    """``crc`` continued over ``nbytes`` of ``record``'s file from byte ``start`` (pread)."""
    record.check(start, nbytes)
    done = 0
    view = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
    fd = open_regular(record.path, root)
    try:
        while done < nbytes:
            part = view[:min(len(view), nbytes - done)]
            pread_exact(fd, part, start + done, record.path)
            crc = crc32(part, crc)  # releases the GIL: runs beside the averaging
            done += len(part)
    finally:
        os.close(fd)
    return crc


def _check_crc(record: Record, pieces: list[tuple[int, int, int]] | None = None,
               root: Path | None = None) -> None:
    """Compare the CRC-32 of ``record``'s bytes with the one its zip entry holds. ``pieces``:
    ``(byte, nbytes, crc)`` of ranges the caller has read (and checksummed) already; only the
    bytes between them are read here, and the CRCs are combined. ``root``: the directory the
    record's file must lie in."""
    crc, pos, end = 0, record.offset, record.offset + record.nbytes
    if pieces and _crc32_combine is not None:
        for byte, nbytes, piece_crc in sorted(pieces):
            if byte < pos or byte + nbytes > end:  # overlapping reads: check it whole
                crc, pos = 0, record.offset
                break
            if byte > pos:
                crc = _crc_range(record, pos, byte - pos, crc, root)
            crc = _crc32_combine(crc, piece_crc, nbytes)
            pos = byte + nbytes
    crc = _crc_range(record, pos, end - pos, crc, root)
    if crc != record.crc:
        raise CheckpointError(f"{record.path}: record {record.name} fails its CRC-32 check "
                              "(corrupted file)")


def _check_views(path: Path, obj: Any) -> None:
    """Refuse tensors a DeepSpeed checkpoint never holds, whose values would not be their own:
    a non-contiguous tensor (an overlapping or strided view of its record), or two tensors whose
    bytes overlap (one parameter read through another's record). Views of one record at
    disjoint places are fine (ZeRO-1/2 module weights are views of one flat buffer), and so is
    the same view under two module names that the file's ``shared_params`` ties together."""
    shared = obj.get("shared_params") if isinstance(obj, dict) else None
    tied = {frozenset((f"module.{a}", f"module.{b}")) for a, b in shared.items()} \
        if isinstance(shared, dict) else set()
    views: dict[Record, dict[tuple, str]] = {}
    todo: list[tuple[Any, str]] = [(obj, "")]
    seen: set[int] = set()  # a container reached twice is walked once (the pickle may share)
    while todo:
        x, key = todo.pop()
        if isinstance(x, (dict, list, tuple)):
            if id(x) in seen:
                continue
            seen.add(id(x))
        if isinstance(x, dict):
            todo.extend((v, f"{key}.{k}" if key else str(k)) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            todo.extend((v, f"{key}.{i}") for i, v in enumerate(x))
        elif isinstance(x, LazyTensor) and x.numel():
            if not x.is_contiguous():
                raise CheckpointError(f"{path}: tensor {_short(key)} is a strided view of its "
                                      "record, not a contiguous tensor: refused")
            same = views.setdefault(x.record, {})
            view = (x.storage_offset, x.shape)
            if view in same and frozenset((same[view], key)) not in tied:
                raise CheckpointError(f"{path}: tensors {_short(same[view])} and {_short(key)} "
                                      f"share bytes of record {x.record.name}: refused")
            same.setdefault(view, key)
    for record, same in views.items():
        spans = sorted((off, off + math.prod(shape), key) for (off, shape), key in same.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(f"{path}: tensors {_short(a)} and {_short(b)} share bytes "
                                      f"of record {record.name}: refused")


def _short(key: str) -> str:
    return key if len(key) <= 120 else key[:117] + "..."


def _name_ok(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable()


def _path_text(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


class DSCheckpoint:
    """One tag directory of a DeepSpeed checkpoint."""

    def __init__(self, tag_dir: Path | str, verify: bool = True, verify_async: bool = False):
        """``verify``: check the CRC-32 of every tensor record read, once per record. With
        ``verify_async`` the checks run in a background thread and ``wait_verified()`` raises
        the first failure (the merge calls it before its output is moved into place)."""
        self.dir = Path(tag_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.verify = verify
        self.verify_async = verify_async
        self._pending: list[Future] = []
        self._files: dict[str, dict] = {}
        self._verified: set[Record] = set()
        self._inline: dict[Record, list[tuple[int, int, int]]] = {}
        self._fds: dict[str, int] = {}
        self.files: list[str] = self._list_files()
        self._classify(self.files)
        if MODEL_FILE in self.files:
            self.model_file = MODEL_FILE
        elif 0 in self.zero3_model_files:
            self.model_file = self.zero3_model_files[0]
        else:
            raise CheckpointError(f"{self.dir}: no {MODEL_FILE} or zero_pp_rank_0_mp_rank_00_model_"
                                  "states.pt: not a DeepSpeed checkpoint tag")
        self.model_state = self._load(self.model_file)
        self._read_model_state()
        self.native_moe = bool(self.expert_files) and not self.autoep_layers
        self.zero_stage = self._zero_stage()
        if self.native_moe and self.zero_stage == 3:
            raise CheckpointError(f"{self.dir}: native deepspeed.moe.layer.MoE under ZeRO-3 is not "
                                  "a layout DeepSpeed writes; cannot read it")
        self._native_ep = 1
        self.dp_size = self._dp_size()
        self.has_master = bool(self.optim_files)
        self._step = self._stored_step()
        self._experts = self._expert_info()
        self._native_experts = self._native_counts() if self.native_moe else 0
        self.params: dict[str, ParamSpec] = self._build_specs()
        self._check_layout()

    # ---- description ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @property
    def ep_size(self) -> int:
        if self.native_moe:
            return self._native_ep
        return self._ep

    @property
    def num_experts(self) -> int:
        if self.native_moe:
            return self._native_experts
        return max((e.num_experts for e in self._experts.values()), default=0)

    @property
    def preset(self) -> str | None:
        return self._preset

    @cached_property
    def bytes_on_disk(self) -> int:
        return sum(os.stat(self.dir / n).st_size for n in self.files)

    @cached_property
    def master_files(self) -> list[str]:
        return [self.optim_files[r] for r in sorted(self.optim_files)]

    def param_counts(self) -> dict[str, int]:
        expert = sum(p.numel for p in self.params.values() if p.is_expert)
        total = sum(p.numel for p in self.params.values())
        return {"total": total, "expert": expert, "non_expert": total - expert}

    def signature(self) -> dict[str, tuple[int, ...]]:
        return {n: p.shape for n, p in self.params.items()}

    # ---- reading -------------------------------------------------------------------------
    def read(self, name: str, source: str = "master", state: str = "fp32", out=None):
        """The full logical fp32 tensor (torch) of parameter ``name``: its master weights
        (``state`` "fp32"), or Adam's ``exp_avg`` / ``exp_avg_sq`` for it (same partition layout).

        With ``out`` (a torch tensor or view of the full shape, any float dtype), the values are
        read from the partition files straight into it and ``out`` is returned: no intermediate
        tensors for the usual layouts.
        """
        import torch

        spec = self.params[name]
        if state != "fp32":
            if not self.has_master:
                raise CheckpointError(f"{self.dir}: no optimizer partitions, no {state} to read")
            source = "master"
        if source == "module" or not self.has_master:
            t = self._read_module(spec)
            return t if out is None else out.copy_(t)
        if out is None:
            out = torch.empty(spec.shape, dtype=torch.float32)
        for ep_rank, ordered in self._rank_pieces(spec, state):
            if spec.expert is None:
                dest = out
            else:
                ids = spec.expert.placement[ep_rank]
                contiguous = ids == list(range(ids[0], ids[0] + len(ids)))
                dest = out.narrow(0, ids[0], len(ids)) if contiguous else None
            if dest is not None and dest.is_contiguous():
                flat, offset = dest.view(-1), 0
                for p in ordered:
                    self._read_into(self._slice(p), flat.narrow(0, offset, p.numel))
                    offset += p.numel
                continue
            parts = [self._slice(p).torch() for p in ordered]
            local = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(spec.local_shape)
            if dest is not None:
                dest.copy_(local)
            else:
                out[torch.tensor(ids)] = local.to(out.dtype)
        return out

    def _read_into(self, src: LazyTensor, dest) -> None:
        """Copy the values of ``src`` into the flat torch tensor ``dest`` (pread straight into
        its memory when the dtypes match)."""
        import torch

        if dest.dtype == getattr(torch, src.dtype) and dest.is_contiguous() and src.numel():
            view = memoryview(dest.numpy()).cast("B")
            src.record.check(src.file_offset, len(view))
            pread_exact(self._fd(src.record), view, src.file_offset, src.record.path)
        else:
            dest.copy_(src.torch().reshape(-1))

    def _rank_pieces(self, spec: ParamSpec, state: str = "fp32"):
        """``(ep_rank, pieces in partition order)`` of ``spec``'s master values (or of an Adam
        moment, same layout), each EP rank's pieces checked to cover its local tensor."""
        want = math.prod(spec.local_shape)
        for ep_rank, pieces in sorted(spec.pieces.items()):
            ordered = [_for_state(p, state) for _, p in sorted(pieces, key=lambda t: t[0])]
            have = sum(p.numel for p in ordered)
            if have != want:
                raise CheckpointError(f"{self.dir}: parameter {spec.name} has {have} master "
                                      f"elements on EP rank {ep_rank}, expected {want}")
            yield ep_rank, ordered

    def segments(self, name: str) -> list[tuple[int, int, int, int, Record]] | None:
        """Where the fp32 master values of ``name`` lie, without reading them: a list of
        ``(offset, numel, fd, byte, record)`` meaning "elements ``offset .. offset + numel`` of
        the flattened logical tensor are the float32 values at byte ``byte`` of the file of
        ``record``, open as ``fd``", covering the tensor in order (every range checked to lie
        inside its record). ``None`` when the layout is not a plain concatenation (no master
        weights, or an expert placement that is not contiguous): use :meth:`read` then.

        With ``verify``, the records are checked by :meth:`wait_verified` from the CRC-32 of
        the ranges the caller reports with :meth:`note_read` (and the bytes between them)."""
        spec = self.params[name]
        if not self.has_master:
            return None
        row = math.prod(spec.shape[1:]) if spec.shape else 1
        segs = []
        for ep_rank, ordered in self._rank_pieces(spec):
            offset = 0
            if spec.expert is not None:
                ids = spec.expert.placement[ep_rank]
                if ids != list(range(ids[0], ids[0] + len(ids))):
                    return None
                offset = ids[0] * row
            for p in ordered:
                if p.numel:
                    flat = self._slice(p, verify=False)
                    flat.record.check(flat.file_offset, p.numel * flat.element_size())
                    if self.verify and flat.record not in self._verified:
                        self._inline.setdefault(flat.record, [])
                    segs.append((offset, p.numel, self._fd(flat.record), flat.file_offset,
                                 flat.record))
                offset += p.numel
        segs.sort(key=lambda s: s[0])
        return segs

    def note_read(self, record: Record, byte: int, nbytes: int, crc: int) -> None:
        """The caller read ``nbytes`` at ``byte`` of a segment of ``record``; their CRC-32."""
        pieces = self._inline.get(record)
        if pieces is not None:
            pieces.append((byte, nbytes, crc))  # list.append is atomic: callable from threads

    def _fd(self, record: Record) -> int:
        """A file descriptor of the file holding ``record`` (a regular file inside the tag),
        opened once."""
        key = str(record.path)
        if key not in self._fds:
            self._fds[key] = open_regular(record.path, self.dir)
        return self._fds[key]

    def close(self) -> None:
        """Close the files opened for reading."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _module_tensor(self, fname: str, key: str, t: Any, shape: tuple[int, ...]
                       ) -> LazyTensor:
        """``t``, the module weight ``key`` of ``fname``, checked: a floating-point tensor of
        ``shape``."""
        if t is None:
            raise CheckpointError(f"{self.dir / fname}: module weight {key} missing")
        if not isinstance(t, LazyTensor):
            raise CheckpointError(f"{self.dir / fname}: module weight {key} is "
                                  f"{show_value(t)}, not a tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.dir / fname}: module weight {key} is a tensor of "
                                  f"{t.dtype}, not floating-point weights: refused")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.dir / fname}: module weight {key} has shape "
                                  f"{list(t.shape)}, expected {list(shape)}")
        return t

    def _module_tensors(self, spec: ParamSpec) -> list[LazyTensor]:
        """The module weights of ``spec`` (one, or one per expert), checked."""
        if self.zero_stage == 3:
            raise CheckpointError(f"{self.dir}: ZeRO-3 checkpoints hold no full module weights; "
                                  "read the fp32 master weights (--source master)")
        if spec.module_file is not None:
            t = self._load(spec.module_file).get(spec.name)
            return [self._module_tensor(spec.module_file, spec.name, t, spec.shape)]
        if spec.expert is None:
            t = self.model_state["module"].get(spec.name)
            return [self._module_tensor(self.model_file, spec.name, t, spec.shape)]
        e = spec.expert
        rows = []
        for g in range(e.num_experts):
            fname = self.expert_files.get((e.layer_id, g))
            if fname is None:
                raise CheckpointError(f"{self.dir}: expert file layer_{e.layer_id}_expert_{g}_"
                                      "mp_rank_00_model_states.pt missing")
            key = f"{e.prefix}.{e.weight}.{g}"
            rows.append(self._module_tensor(fname, key, self._load(fname).get(key),
                                            spec.shape[1:]))
        return rows

    def check_module(self) -> None:
        """Check every module weight a read with ``source="module"`` takes (per-expert files
        included) without reading one: call before merging from module weights."""
        for spec in self.params.values():
            self._module_tensors(spec)

    def _read_module(self, spec: ParamSpec):
        import torch

        tensors = [self._materialize(t).float() for t in self._module_tensors(spec)]
        if spec.expert is None:
            return tensors[0]
        return torch.stack(tensors)

    def _materialize(self, t: LazyTensor):
        if self.verify:
            self._verify_record(t.record)
        return t.torch()

    def _flat(self, fname: str, key: tuple) -> LazyTensor:
        """The flat fp32 partition (or Adam moment) at ``key`` of ``fname``: a contiguous
        float32 tensor."""
        obj: Any = self._load(fname)
        try:
            for k in key:
                obj = obj[k]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise CheckpointError(f"{self.dir / fname}: key {'.'.join(map(str, key))} "
                                  "missing") from None
        if not isinstance(obj, LazyTensor):
            raise CheckpointError(f"{self.dir / fname}: {'.'.join(map(str, key))} is "
                                  f"{show_value(obj)}, not a tensor")
        if obj.dtype != "float32":
            raise CheckpointError(f"{self.dir / fname}: {'.'.join(map(str, key))} is a tensor "
                                  f"of {obj.dtype}; fp32 master weights and moments are "
                                  "float32: refused")
        if not obj.is_contiguous():
            raise CheckpointError(f"{self.dir / fname}: {'.'.join(map(str, key))} is not a "
                                  "contiguous tensor: not a flat partition")
        return obj

    def _slice(self, piece: Piece, verify: bool = True) -> LazyTensor:
        obj = self._flat(piece.file, piece.key)
        if piece.start < 0 or piece.numel < 0 or piece.start + piece.numel > obj.numel():
            raise CheckpointError(f"{self.dir / piece.file}: flat partition "
                                  f"{'.'.join(map(str, piece.key))} has {obj.numel()} elements, "
                                  f"needs {piece.start + piece.numel}")
        if self.verify and verify:
            self._verify_record(obj.record)
        return obj.narrow(piece.start, piece.numel)

    def _verify_record(self, record: Record) -> None:
        """Check the CRC-32 of ``record`` once (in a background thread with ``verify_async``)."""
        if record in self._verified:
            return
        self._verified.add(record)
        self._inline.pop(record, None)
        if not self.verify_async:
            _check_crc(record, None, self.dir)
            return
        global _CRC_POOL
        if _CRC_POOL is None:
            _CRC_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32")
        self._pending.append(_CRC_POOL.submit(_check_crc, record, None, self.dir))

    def wait_verified(self) -> None:
        """Raise the first CRC failure of the records read so far (``verify_async`` mode)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        inline, self._inline = self._inline, {}
        for record, pieces in inline.items():
            self._verified.add(record)
            _check_crc(record, pieces, self.dir)

    def _load(self, fname: str) -> dict:
        if fname not in self._files:
            obj = load(self.dir / fname, root=self.dir)
            _check_views(self.dir / fname, obj)
            self._files[fname] = obj
        return self._files[fname]

    # ---- checked values ------------------------------------------------------------------
    def _bad(self, fname: str, key: str, value: Any, want: str) -> NoReturn:
        raise CheckpointError(f"{self.dir / fname}: key '{key}' is {show_value(value)}, {want}")

    def _int(self, fname: str, key: str, value: Any, lo: int = 0, hi: int = MAX_RANKS) -> int:
        if not is_int(value) or not lo <= value <= hi:
            self._bad(fname, key, value, f"not an integer in [{lo}, {hi}]")
        return int(value)

    def _opt(self, fname: str, key: str, value: Any, kind: type | tuple, default: Any) -> Any:
        """``value`` (``default`` when None) if it is a ``kind``."""
        if value is None:
            return default
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(
                k.__name__ for k in kind)
            self._bad(fname, key, value, f"not a {names}")
        return value

    def _name(self, fname: str, key: str, name: Any) -> str:
        if not _name_ok(name):
            self._bad(fname, key, name, f"not a parameter name (text of at most {MAX_NAME} "
                                        "printable characters)")
        return name

    def _shape(self, fname: str, key: str, shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, (tuple, list)) or len(shape) > 32 \
                or not all(is_int(s) and 0 <= s <= MAX_NUMEL for s in shape) \
                or math.prod(shape) > MAX_NUMEL:
            self._bad(fname, key, shape, "not a tensor shape (at most 32 sizes >= 0)")
        return tuple(int(s) for s in shape)

    def _param_shapes(self, fname: str, value: Any) -> list[dict[str, tuple[int, ...]]]:
        """``param_shapes``: per parameter group, parameter name -> shape."""
        if value is None:
            raise CheckpointError(f"{self.dir / fname}: key 'param_shapes' missing")
        if not isinstance(value, (list, tuple)):
            self._bad(fname, "param_shapes", value, "not a list of parameter groups")
        out = []
        for g, group in enumerate(value):
            if not isinstance(group, dict):
                self._bad(fname, f"param_shapes[{g}]", group, "not a dict of shapes")
            shapes = {}
            for name, shape in group.items():
                self._name(fname, f"param_shapes[{g}]", name)
                shapes[name] = self._shape(fname, f"param_shapes[{g}].{name}", shape)
            out.append(shapes)
        return out

    def _osd(self, fname: str) -> dict:
        osd = self._load(fname).get("optimizer_state_dict")
        if not isinstance(osd, dict):
            self._bad(fname, "optimizer_state_dict", osd, "not a DeepSpeed optimizer state")
        return osd

    # ---- files ---------------------------------------------------------------------------
    def _list_files(self) -> list[str]:
        """The tag's files: regular files, or symlinks to regular files inside the tag (any
        other entry but a directory is refused)."""
        try:
            names = sorted(os.listdir(self.dir))
        except OSError as e:
            raise CheckpointError(f"{self.dir}: cannot list the directory ({e.strerror})") from None
        files = []
        for name in names:
            path = self.dir / name
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    real = real_path(path, self.dir)
                    mode = os.stat(real).st_mode
                    if not stat.S_ISREG(mode):
                        raise CheckpointError(f"{_path_text(path)}: a symlink to {real}, not to a "
                                              "regular file: refused")
            except FileNotFoundError:
                raise CheckpointError(f"{_path_text(path)}: a symlink to nothing: "
                                      "refused") from None
            except OSError as e:
                raise CheckpointError(f"{_path_text(path)}: cannot read ({e.strerror})") from None
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise CheckpointError(f"{_path_text(path)}: not a regular file (a FIFO, device "
                                      "or socket): refused")
            files.append(name)
        return files

    def _classify(self, names: list[str]) -> None:
        self.optim_files: dict[int, str] = {}
        self.zero3_model_files: dict[int, str] = {}
        self.expert_files: dict[tuple[int, int], str] = {}
        self._expp: dict[int, str] = {}

        def num(name: str, text: str) -> int:
            if len(text) > 9:
                raise CheckpointError(f"{self.dir / name}: a rank or index of {len(text)} "
                                      "digits in the file name: refused")
            return int(text)

        for n in names:
            if m := OPTIM_RE.match(n):
                table, key, mp = self.optim_files, num(n, m.group(2)), m.group(3)
            elif m := ZERO3_MODEL_RE.match(n):
                table, key, mp = self.zero3_model_files, num(n, m.group(1)), m.group(2)
            elif m := EXPERT_FILE_RE.match(n):
                table, key, mp = self.expert_files, (num(n, m.group(1)), num(n, m.group(2))), \
                    m.group(3)
            elif m := EXPP_RE.match(n):
                table, key, mp = self._expp, num(n, m.group(1)), m.group(2)
            else:
                continue
            if num(n, mp):
                raise CheckpointError(f"{self.dir}: tensor/pipeline-parallel checkpoints "
                                      f"(mp_rank > 0: {n}) are not supported")
            if key in table:
                raise CheckpointError(f"{self.dir}: {table[key]} and {n} name the same rank "
                                      "or expert: refused")
            table[key] = n
        if len({n.startswith("bf16_") for n in self.optim_files.values()}) > 1:
            raise CheckpointError(f"{self.dir}: both bf16_zero_pp_rank_* and zero_pp_rank_* "
                                  "optimizer files: not one checkpoint")

    # ---- layout discovery ----------------------------------------------------------------
    def _read_model_state(self) -> None:
        f, ms = self.model_file, self.model_state
        for key in ("module", "ds_version"):
            if key not in ms:
                raise CheckpointError(f"{self.dir / f}: key '{key}' missing: not a "
                                      "DeepSpeed model-states file")
        if not isinstance(ms["module"], dict):
            self._bad(f, "module", ms["module"], "not a dict of tensors")
        if not isinstance(ms["ds_version"], str) or len(ms["ds_version"]) > 64:
            self._bad(f, "ds_version", ms["ds_version"], "not a version string")
        self.ds_config: dict = self._opt(f, "ds_config", ms.get("ds_config"), dict, {})
        self.autoep_layers: list[dict] = self._opt(f, "ds_autoep_layers",
                                                   ms.get("ds_autoep_layers"), list, [])
        buffers = self._opt(f, "buffer_names", ms.get("buffer_names"), (list, tuple, set), [])
        for b in buffers:
            self._name(f, "buffer_names", b)
        self._buffers = set(buffers)
        self.shared: dict[str, str] = dict(self._opt(f, "shared_params", ms.get("shared_params"),
                                                     dict, {}))
        bf16 = self._opt(f, "ds_config.bf16", self.ds_config.get("bf16"), dict, {})
        self.bf16 = any(n.startswith("bf16_") for n in self.optim_files.values()) or bool(
            bf16.get("enabled"))
        ep = self._opt(f, "ds_config.expert_parallel", self.ds_config.get("expert_parallel"),
                       dict, {})
        preset = ep.get("preset_model") if ep.get("enabled") else None
        if preset is not None and not (isinstance(preset, str) and _name_ok(preset)):
            self._bad(f, "ds_config.expert_parallel.preset_model", preset, "not a preset name")
        self._preset: str | None = preset
        before = self.ds_config.get("use_data_before_expert_parallelism", False)
        if not isinstance(before, bool):
            self._bad(f, "ds_config.use_data_before_expert_parallelism", before, "not a bool")
        self._before = before

    def _zero_stage(self) -> int:
        if self.optim_files:
            fname = self.optim_files[min(self.optim_files)]
            osd = self._osd(fname)
            if "zero_stage" in osd:
                return self._int(fname, "optimizer_state_dict.zero_stage", osd["zero_stage"], 0, 3)
        if self.model_file != MODEL_FILE:  # only ZeRO-3 writes per-rank model-state files
            return 3
        zo = self._opt(self.model_file, "ds_config.zero_optimization",
                       self.ds_config.get("zero_optimization"), dict, {})
        return self._int(self.model_file, "ds_config.zero_optimization.stage",
                         zo.get("stage", 0), 0, 3)

    def _dp_size(self) -> int:
        """``dp_world_size``, checked against the optimizer partition files (one per rank)."""
        f, n = self.model_file, len(self.optim_files)
        raw = self.model_state.get("dp_world_size")
        dp = max(n, 1) if raw is None else self._int(f, "dp_world_size", raw, 1, MAX_RANKS)
        if n:
            over = [r for r in self.optim_files if r >= dp]
            if over:
                raise CheckpointError(f"{self.dir / self.optim_files[min(over)]}: a partition of "
                                      f"rank {min(over)}, but key 'dp_world_size' of {f} is {dp}")
            if n < dp:  # n distinct ranks below dp: some rank's file is missing
                missing = next(r for r in range(dp) if r not in self.optim_files)
                found = sorted(self.optim_files)
                shown = f"{found[:8]}".rstrip("]") + (", ...]" if len(found) > 8 else "]")
                raise CheckpointError(f"{self.dir}: optimizer partition of rank {missing} missing "
                                      f"(dp world size {dp}, key 'dp_world_size' of {f}; found "
                                      f"ranks {shown})")
        return dp

    def _stored_step(self) -> int:
        """``global_steps``, which must be the step the tag is named for."""
        f = self.model_file
        raw = self.model_state.get("global_steps")
        step = 0 if raw is None else self._int(f, "global_steps", raw, 0, MAX_STEP)
        named = step_of_name(self.dir.name, self.dir)
        if raw is not None and named is not None and step != named:
            raise CheckpointError(f"{self.dir}: the tag is named for step {named}, but key "
                                  f"'global_steps' of {f} says step {step}: refused (a renamed "
                                  "or crafted checkpoint)")
        return step

    def _expert_info(self) -> dict[str, ExpertInfo]:
        """AutoEP layers: expert parameter name -> its experts and their placement."""
        f = self.model_file
        info: dict[str, ExpertInfo] = {}
        layers: dict[int, str] = {}
        eps = set()
        for i, entry in enumerate(self.autoep_layers):
            where = f"ds_autoep_layers[{i}]"
            if not isinstance(entry, dict):
                self._bad(f, where, entry, "not an AutoEP layer record")
            n = self._int(f, f"{where}.num_experts", entry.get("num_experts"), 1, MAX_EXPERTS)
            ep = self._int(f, f"{where}.ep_size", entry.get("ep_size"), 1, n)
            layer = self._int(f, f"{where}.moe_layer_id", entry.get("moe_layer_id"), 0, MAX_EXPERTS)
            prefix = self._name(f, f"{where}.expert_key_prefix", entry.get("expert_key_prefix"))
            self._name(f, f"{where}.module_path", entry.get("module_path"))
            if layer in layers or prefix in layers.values():
                raise CheckpointError(f"{self.dir / f}: key '{where}' describes MoE layer {layer} "
                                      f"({prefix}) a second time")
            layers[layer] = prefix
            eps.add(ep)
            if self.optim_files and self.dp_size % ep:
                raise CheckpointError(f"{self.dir / f}: key '{where}.ep_size' is {ep}, which does "
                                      f"not divide the dp world size {self.dp_size}")
            placement = entry.get("expert_placement")
            if placement is not None:
                ranks = self._placement(f, f"{where}.expert_placement", placement, n, ep)
            else:
                n_local = self._int(f, f"{where}.num_local_experts",
                                    entry.get("num_local_experts"), 1, n)
                if n_local * ep != n:
                    raise CheckpointError(f"{self.dir / f}: key '{where}': {n_local} local "
                                          f"experts on each of {ep} EP ranks are not "
                                          f"{n} experts")
                ranks = {r: list(range(r * n_local, (r + 1) * n_local)) for r in range(ep)}
            for w in ("w1", "w2", "w3"):
                info[f"{prefix}.{w}"] = ExpertInfo(n, ranks, layer, prefix, w)
        if len(eps) > 1:
            raise CheckpointError(f"{self.dir / f}: AutoEP layers with different ep sizes "
                                  f"{sorted(eps)}: not supported")
        self._ep = eps.pop() if eps else 1
        if self.expert_files and layers:  # ZeRO-1/2 AutoEP: one file per global expert
            n_of = {e.layer_id: e.num_experts for e in info.values()}
            self._check_expert_files(n_of, f"key 'ds_autoep_layers' of {f}")
        return info

    def _placement(self, f: str, where: str, placement: Any, n: int, ep: int
                   ) -> dict[int, list[int]]:
        """An AutoEP ``expert_placement``: every one of the ``n`` experts on exactly one of the
        ``ep`` EP ranks, each rank listed once."""
        if not isinstance(placement, dict):
            self._bad(f, where, placement, "not an expert placement")
        for key, want in (("num_experts", n), ("ep_size", ep)):
            if key in placement and placement[key] != want:
                self._bad(f, f"{where}.{key}", placement[key], f"but the layer says {want}")
        ranks = placement.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != ep:
            self._bad(f, f"{where}.ranks", ranks, f"not a list of the {ep} EP ranks")
        out: dict[int, list[int]] = {}
        seen: set[int] = set()
        for j, r in enumerate(ranks):
            if not isinstance(r, dict):
                self._bad(f, f"{where}.ranks[{j}]", r, "not a rank's placement")
            rank = self._int(f, f"{where}.ranks[{j}].rank", r.get("rank"), 0, ep - 1)
            if rank in out:
                raise CheckpointError(f"{self.dir / f}: key '{where}.ranks' lists EP rank {rank} "
                                      "twice")
            experts = r.get("experts")
            if not isinstance(experts, list) or not experts:
                self._bad(f, f"{where}.ranks[{j}].experts", experts, "not a list of expert ids")
            ids = []
            for x in experts:
                x = self._int(f, f"{where}.ranks[{j}].experts", x, 0, n - 1)
                if x in seen:
                    raise CheckpointError(f"{self.dir / f}: key '{where}' places expert {x} "
                                          "twice: refused")
                seen.add(x)
                ids.append(x)
            out[rank] = ids
        if len(seen) != n:
            missing = next(x for x in range(n) if x not in seen)
            raise CheckpointError(f"{self.dir / f}: key '{where}' places expert {missing} on no "
                                  "EP rank: refused")
        return out

    def _check_expert_files(self, n_of: dict[int, int], source: str) -> None:
        """The per-expert files are exactly ``layer_L_expert_E`` for every MoE layer L of
        ``n_of`` and every expert E < ``n_of[L]``."""
        have: dict[int, set[int]] = {}
        for layer, e in self.expert_files:
            have.setdefault(layer, set()).add(e)
        for layer, ids in sorted(have.items()):
            if layer not in n_of:
                raise CheckpointError(f"{self.dir / self.expert_files[(layer, min(ids))]}: an "
                                      f"expert file of MoE layer {layer}, which {source} does "
                                      "not have")
            extra = [e for e in ids if e >= n_of[layer]]
            if extra:
                raise CheckpointError(f"{self.dir / self.expert_files[(layer, min(extra))]}: "
                                      f"expert {min(extra)} of MoE layer {layer}, which has "
                                      f"{n_of[layer]} experts by {source}")
        for layer, n in sorted(n_of.items()):
            ids = have.get(layer, set())
            if len(ids) != n:
                missing = next(e for e in range(n) if e not in ids)
                raise CheckpointError(f"{self.dir}: expert file layer_{layer}_expert_{missing}_"
                                      f"mp_rank_00_model_states.pt missing (MoE layer {layer} has "
                                      f"{n} experts by {source})")

    def _native_counts(self) -> int:
        """Native MoE: experts per layer, from the per-expert files, checked against the
        model states' ``num_experts``; returns the largest."""
        f = self.model_file
        layers: dict[int, int] = {}
        for layer, e in self.expert_files:
            layers[layer] = max(layers.get(layer, 0), e + 1)
        if set(layers) != set(range(len(layers))):
            missing = next(x for x in range(len(layers) + 1) if x not in layers)
            raise CheckpointError(f"{self.dir}: expert files of MoE layer {missing} missing "
                                  f"(found layers {sorted(layers)[:8]})")
        counts = [layers[x] for x in range(len(layers))]
        raw = self.model_state.get("num_experts")
        if raw is not None and (not isinstance(raw, list) or len(raw) != len(counts) or any(
                not is_int(a) or a != b for a, b in zip(raw, counts, strict=True))):
            self._bad(f, "num_experts", raw, f"but the tag holds expert files of {counts} "
                                             "experts per MoE layer")
        self._check_expert_files(dict(enumerate(counts)), "the expert files present")
        return max(counts)

    def _spec(self, name: str, local_shape: tuple, experts: dict[str, ExpertInfo]) -> ParamSpec:
        e = experts.get(name)
        if e is None:
            return ParamSpec(name, local_shape, local_shape)
        if len(local_shape) != 3:
            raise CheckpointError(f"{self.dir}: AutoEP expert parameter {name} has local shape "
                                  f"{list(local_shape)}, not [experts, rows, columns]")
        counts = {len(v) for v in e.placement.values()}
        if len(counts) > 1:
            raise CheckpointError(f"{self.dir / self.model_file}: the AutoEP expert placement of "
                                  f"MoE layer {e.layer_id} ({name}) puts {sorted(counts)} experts "
                                  "on its EP ranks: non-uniform placements are not supported")
        if counts != {local_shape[0]}:
            raise CheckpointError(f"{self.dir / self.model_file}: the AutoEP expert placement of "
                                  f"MoE layer {e.layer_id} puts {counts.pop()} experts on each EP "
                                  f"rank, but {name} holds {local_shape[0]} per rank (local shape "
                                  f"{list(local_shape)} in param_shapes)")
        return ParamSpec(name, (e.num_experts, *local_shape[1:]), local_shape, e)

    def _build_specs(self) -> dict[str, ParamSpec]:
        experts = self._experts
        if not self.optim_files:
            if self.bf16:
                raise CheckpointError(f"{self.dir}: bf16 checkpoint without optimizer partitions: "
                                      "no fp32 master weights to read")
            if self.zero_stage > 0:
                raise CheckpointError(f"{self.dir}: ZeRO-{self.zero_stage} checkpoint without its "
                                      "*_optim_states.pt files")
            if self._ep > 1:
                raise CheckpointError(f"{self.dir}: AutoEP with ep size {self._ep} and no "
                                      "optimizer partitions: not a layout DeepSpeed writes")
            f = self.model_file
            specs = {}
            for n, t in self.model_state["module"].items():
                if n in self._buffers:
                    continue
                self._name(f, "module", n)
                t = self._module_tensor(f, n, t, t.shape if isinstance(t, LazyTensor) else ())
                specs[n] = ParamSpec(n, tuple(t.shape), tuple(t.shape))
            native = self._native_expert_files() if self.native_moe else {}
            self._native_ep = max(len(self._expp), 1)  # ZeRO-0 MoE: one optimizer file per EP rank
            for n, (fname, shape) in native.items():
                specs[n] = ParamSpec(n, shape, shape, module_file=fname)
            return specs
        if self.zero_stage == 3:
            return self._specs_zero3(experts)
        return self._specs_zero12(experts)

    def _native_expert_files(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Global expert parameter name -> (per-expert file, shape), from the expert files."""
        index: dict[str, tuple[str, tuple[int, ...]]] = {}
        layout: dict[int, dict[int, dict[tuple[str, str], tuple[int, ...]]]] = {}
        for (layer, e), fname in sorted(self.expert_files.items()):
            for name, t in self._load(fname).items():
                if not isinstance(t, LazyTensor):
                    continue
                m = NATIVE_EXPERT_RE.match(name) if _name_ok(name) else None
                if m is None or int(m.group(2)) != e:
                    raise CheckpointError(f"{self.dir / fname}: "
                                          f"{name if _name_ok(name) else show_value(name)} is "
                                          f"not a parameter of expert {e}: refused")
                if name in index:
                    raise CheckpointError(f"{self.dir / fname}: parameter {name} is in "
                                          f"{index[name][0]} as well")
                self._module_tensor(fname, name, t, t.shape)
                index[name] = (fname, tuple(t.shape))
                layout.setdefault(layer, {}).setdefault(e, {})[(m.group(1), m.group(3))] = \
                    tuple(t.shape)
        for layer, experts in sorted(layout.items()):  # every expert of a layer alike
            first = experts.get(0, {})
            for e, params in sorted(experts.items()):
                if params != first or len({prefix for prefix, _ in params}) != 1:
                    raise CheckpointError(f"{self.dir / self.expert_files[(layer, e)]}: expert {e} "
                                          f"of MoE layer {layer} has other parameters or shapes "
                                          "than expert 0 of its layer: refused")
        return index

    def _native_groups(self, fname: str, osd: dict, ngroups: int) -> dict[int, tuple[int, int]]:
        """Native-MoE optimizer groups: group index -> (ep size, expert-dp partition count)."""
        base = self._opt(fname, "optimizer_state_dict.base_optimizer_state",
                         osd.get("base_optimizer_state"), dict, {})
        groups = self._opt(fname, "optimizer_state_dict.base_optimizer_state.param_groups",
                           base.get("param_groups"), list, [])
        counts = osd.get("partition_count")
        out = {}
        for g, group in enumerate(groups):
            if not isinstance(group, dict):
                self._bad(fname, f"optimizer_state_dict.base_optimizer_state.param_groups[{g}]",
                          group, "not a parameter group")
            if not group.get("moe"):
                continue
            name = group.get("name")
            m = re.fullmatch(r"ep_size_([1-9][0-9]{0,8})", name) if isinstance(name, str) else None
            if m is None or not isinstance(counts, list) or g >= len(counts) or g >= ngroups:
                raise CheckpointError(f"{self.dir / fname}: MoE parameter group {g} has no "
                                      "'ep_size_N' name, partition count or fp32 partition")
            count = self._int(fname, f"optimizer_state_dict.partition_count[{g}]", counts[g], 1,
                              self.dp_size)
            out[g] = (int(m.group(1)), count)
        return out

    def _fragments(self, fname: str, g: int, mapping: Any) -> list[tuple[str, int, int]]:
        """``param_slice_mappings[g]`` of one rank: (name, start, numel) of each fragment,
        checked to lie inside the flat partition and not to overlap another."""
        where = f"optimizer_state_dict.param_slice_mappings[{g}]"
        if not isinstance(mapping, dict):
            self._bad(fname, where, mapping, "not a dict of fragments")
        size = self._flat(fname, ("optimizer_state_dict", "single_partition_of_fp32_groups",
                                  g)).numel()
        out = []
        for name, frag in mapping.items():
            self._name(fname, where, name)
            if not isinstance(frag, FragmentAddress):
                self._bad(fname, f"{where}.{name}", frag, "not a fragment address")
            start = self._int(fname, f"{where}.{name}.start", getattr(frag, "start", None), 0,
                              MAX_NUMEL)
            numel = self._int(fname, f"{where}.{name}.numel", getattr(frag, "numel", None), 0,
                              MAX_NUMEL)
            if start + numel > size:
                raise CheckpointError(f"{self.dir / fname}: key '{where}.{name}': elements "
                                      f"{start}..{start + numel} lie outside the flat partition "
                                      f"of {size} elements")
            out.append((name, start, numel))
        end, prev = 0, None
        for name, start, numel in sorted((f for f in out if f[2]), key=lambda f: f[1]):
            if start < end:
                raise CheckpointError(f"{self.dir / fname}: key '{where}': the fragments of "
                                      f"{prev} and {name} overlap: refused")
            end, prev = start + numel, name
        return out

    def _specs_zero12(self, experts: dict[str, ExpertInfo]) -> dict[str, ParamSpec]:
        shapes = self._param_shapes(self.model_file, self.model_state.get("param_shapes"))
        specs: dict[str, ParamSpec] = {}
        native = self._native_expert_files() if self.native_moe else {}
        ep = self.ep_size
        before = self._before
        if self.dp_size % ep:
            raise CheckpointError(f"{self.dir}: dp size {self.dp_size} not divisible by ep size "
                                  f"{ep}")
        edp = self.dp_size // ep
        group_of: dict[str, tuple[int, str]] = {}
        moe_group_ids: set[int] = set()
        for rank, fname in sorted(self.optim_files.items()):
            osd = self._osd(fname)
            flats = osd.get("single_partition_of_fp32_groups")
            if flats is None:
                raise CheckpointError(f"{self.dir / fname}: key 'optimizer_state_dict."
                                      "single_partition_of_fp32_groups' missing")
            if not isinstance(flats, list):
                self._bad(fname, "optimizer_state_dict.single_partition_of_fp32_groups", flats,
                          "not a list of flat partitions")
            mappings = osd.get("param_slice_mappings")
            if mappings is None:
                raise CheckpointError(f"{self.dir / fname}: key 'param_slice_mappings' missing "
                                      "(checkpoint from a DeepSpeed older than 0.10?)")
            if not isinstance(mappings, list) or len(mappings) != len(flats):
                self._bad(fname, "optimizer_state_dict.param_slice_mappings", mappings,
                          f"not a list of {len(flats)} groups (as many as optimizer_state_dict."
                          "single_partition_of_fp32_groups)")
            moe_groups = self._native_groups(fname, osd, len(mappings)) if self.native_moe else {}
            moe_group_ids |= set(moe_groups)
            for g, mapping in enumerate(mappings):
                frags = self._fragments(fname, g, mapping)
                if g in moe_groups:
                    self._add_native(specs, rank, fname, g, frags, moe_groups[g], shapes, native,
                                     before)
                    continue
                for name, start, numel in frags:
                    other = group_of.setdefault(name, (g, fname))
                    if other[0] != g:
                        raise CheckpointError(f"{self.dir / fname}: parameter {name} is in "
                                              f"parameter group {g} here but in group {other[0]} "
                                              f"in {other[1]}")
                    is_expert = name in experts
                    if name not in specs:
                        local = self._shape_of(shapes, g, name)
                        specs[name] = self._spec(name, local, experts)
                    ep_rank = ((rank // edp if before else rank % ep) if is_expert else 0)
                    order = (rank % edp if before else rank // ep) if is_expert else rank
                    piece = Piece(fname, ("optimizer_state_dict", "single_partition_of_fp32_groups",
                                          g), start, numel)
                    specs[name].pieces.setdefault(ep_rank, []).append((order, piece))
        for g, group in enumerate(shapes):  # every parameter has master values somewhere
            if g in moe_group_ids:
                continue
            for name, shape in group.items():
                if name not in specs:
                    if math.prod(shape):
                        raise CheckpointError(f"{self.dir}: parameter {name} (param_shapes[{g}] of "
                                              f"{self.model_file}) is in no optimizer partition")
                    specs[name] = self._spec(name, shape, experts)
        return self._ordered(specs, shapes)

    def _add_native(self, specs, rank, fname, g, frags, group, shapes, native, before) -> None:
        """Pieces of one rank's native-MoE expert group, under global expert names."""
        ep, edp = group
        if self.dp_size % ep or self.dp_size // ep != edp:
            raise CheckpointError(f"{self.dir / fname}: MoE group {g}: dp size {self.dp_size}, ep "
                                  f"size {ep} and expert-data-parallel size {edp} do not agree")
        self._native_ep = max(self._native_ep, ep)
        ep_rank = rank // edp if before else rank % ep
        order = rank % edp if before else rank // ep
        local: dict[str, int] = {}
        parsed = []
        for name, start, numel in frags:
            m = NATIVE_EXPERT_RE.match(name)
            if m is None:
                raise CheckpointError(f"{self.dir / fname}: parameter {name} of MoE group {g} is "
                                      "not a deepspeed_moe expert")
            local[m.group(1)] = max(local.get(m.group(1), 0), int(m.group(2)) + 1)
            parsed.append((m, name, start, numel))
        for m, name, start, numel in parsed:
            gname = f"{m.group(1)}{ep_rank * local[m.group(1)] + int(m.group(2))}{m.group(3)}"
            if gname not in specs:
                shape = self._shape_of(shapes, g, name)
                if gname not in native or native[gname][1] != shape:
                    raise CheckpointError(f"{self.dir / fname}: MoE group {g}: expert parameter "
                                          f"{gname} (local {name} of EP rank {ep_rank}) of shape "
                                          f"{list(shape)} is not in the per-expert files")
                specs[gname] = ParamSpec(gname, shape, shape, module_file=native[gname][0])
            piece = Piece(fname, ("optimizer_state_dict", "single_partition_of_fp32_groups", g),
                          start, numel)
            specs[gname].pieces.setdefault(0, []).append((order, piece))

    def _ep_ranks(self, mfile: str, mstate: dict, experts: dict[str, ExpertInfo]
                  ) -> dict[str, int]:
        """ZeRO-3: expert parameter name -> the EP rank whose experts this rank's file holds."""
        layers = self._opt(mfile, "ds_autoep_layers", mstate.get("ds_autoep_layers"), list, [])
        out = {}
        for i, e in enumerate(layers):
            if not isinstance(e, dict):
                self._bad(mfile, f"ds_autoep_layers[{i}]", e, "not an AutoEP layer record")
            prefix = self._name(mfile, f"ds_autoep_layers[{i}].expert_key_prefix",
                                e.get("expert_key_prefix"))
            if f"{prefix}.w1" not in experts:
                raise CheckpointError(f"{self.dir / mfile}: key 'ds_autoep_layers[{i}]' names "
                                      f"{prefix}, which {self.model_file} does not describe")
            ep_rank = self._int(mfile, f"ds_autoep_layers[{i}].ep_rank", e.get("ep_rank", 0), 0,
                                self._ep - 1)
            for w in ("w1", "w2", "w3"):
                out[f"{prefix}.{w}"] = ep_rank
        return out

    def _specs_zero3(self, experts: dict[str, ExpertInfo]) -> dict[str, ParamSpec]:
        specs: dict[str, ParamSpec] = {}
        first_shapes = None
        counts: dict[tuple[str, int], int] = {}  # (name, EP rank) -> partitions it is cut in
        extra = sorted(set(self.zero3_model_files) - set(self.optim_files))
        if extra:
            raise CheckpointError(f"{self.dir / self.zero3_model_files[extra[0]]}: no optimizer "
                                  f"partition of rank {extra[0]} beside it")
        for rank, fname in sorted(self.optim_files.items()):
            mfile = self.zero3_model_files.get(rank)
            if mfile is None:
                raise CheckpointError(f"{self.dir}: zero_pp_rank_{rank}_mp_rank_00_model_states.pt "
                                      "missing")
            mstate = self._load(mfile)
            shapes = self._param_shapes(mfile, mstate.get("param_shapes"))
            if first_shapes is None:
                first_shapes = shapes
            elif shapes != first_shapes:
                raise CheckpointError(f"{self.dir / mfile}: key 'param_shapes' differs from "
                                      f"{self.model_file}'s")
            ep_rank_of = self._ep_ranks(mfile, mstate, experts)
            osd = self._osd(fname)
            flats = osd.get("fp32_flat_groups")
            if flats is None:
                raise CheckpointError(f"{self.dir / fname}: key 'optimizer_state_dict."
                                      "fp32_flat_groups' missing")
            if not isinstance(flats, list) or len(flats) != len(shapes):
                self._bad(fname, "optimizer_state_dict.fp32_flat_groups", flats,
                          f"not a list of {len(shapes)} flat groups (one per param_shapes group)")
            groups = self._opt(fname, "optimizer_state_dict.ds_zero_partition_groups",
                               osd.get("ds_zero_partition_groups"), list, [])
            for g, group_shapes in enumerate(shapes):
                where = f"optimizer_state_dict.ds_zero_partition_groups[{g}]"
                meta = groups[g] if g < len(groups) else {}
                if not isinstance(meta, dict):
                    self._bad(fname, where, meta, "not a partition group record")
                count = self._int(fname, f"{where}.partition_count",
                                  meta.get("partition_count", self.dp_size), 1, self.dp_size)
                prank = self._int(fname, f"{where}.partition_rank",
                                  meta.get("partition_rank", rank), 0, count - 1)
                offset = 0
                for name, shape in group_shapes.items():
                    numel = math.prod(shape)
                    part = -(-numel // count)
                    take = max(0, min(part, numel - prank * part))
                    if name not in specs:
                        specs[name] = self._spec(name, shape, experts)
                    ep_rank = ep_rank_of.get(name, 0) if name in experts else 0
                    if counts.setdefault((name, ep_rank), count) != count:
                        raise CheckpointError(f"{self.dir / fname}: key '{where}.partition_count' "
                                              f"is {count}, but another rank's file cuts {name} "
                                              f"in {counts[(name, ep_rank)]} partitions")
                    piece = Piece(fname, ("optimizer_state_dict", "fp32_flat_groups", g), offset,
                                  take)
                    specs[name].pieces.setdefault(ep_rank, []).append((prank, piece))
                    offset += part
        for (name, ep_rank), count in counts.items():
            have = sorted(o for o, _ in specs[name].pieces[ep_rank])
            if have != list(range(count)):
                raise CheckpointError(f"{self.dir}: the partitions of {name} (EP rank {ep_rank}) "
                                      f"are ranks {have[:8]} of its partition group, not each of "
                                      f"0..{count - 1} once: refused")
        return self._ordered(specs, first_shapes)

    def _shape_of(self, shapes, g: int, name: str) -> tuple[int, ...]:
        try:
            return shapes[g][name]
        except (TypeError, IndexError, KeyError):
            raise CheckpointError(f"{self.dir / self.model_file}: no shape for parameter {name} in "
                                  f"param_shapes[{g}]") from None

    def _ordered(self, specs: dict[str, ParamSpec], shapes) -> dict[str, ParamSpec]:
        """Parameters in module order (the order of the model-states ``module`` dict)."""
        order = [n for n in self.model_state["module"] if n in specs]
        known = set(order)
        rest = sorted((n for n in specs if n not in known), key=_natural)
        return {n: specs[n] for n in [*order, *rest]}

    def _check_layout(self) -> None:
        """Every parameter's master elements covered exactly (so that no shape asks for more
        than the files hold), every piece inside a float32 flat partition, no two partitions
        sharing bytes; AutoEP expert shapes that fit together; a bounded output from module
        weights."""
        self._check_autoep()
        if not self.has_master:
            total = sum(p.numel for p in self.params.values()) * 4
            if total > MODULE_BYTES_FACTOR * max(self.bytes_on_disk, 1 << 20):
                raise CheckpointError(f"{self.dir}: its parameters declare {total} bytes of fp32 "
                                      f"weights, more than {MODULE_BYTES_FACTOR} times the "
                                      f"{self.bytes_on_disk} bytes of its files: refused")
            return
        flats: dict[tuple[str, tuple], LazyTensor] = {}
        for name, spec in self.params.items():
            want = math.prod(spec.local_shape)
            ranks = set(spec.expert.placement) if spec.expert else {0}
            if want and set(spec.pieces) != ranks:
                missing = sorted(ranks - set(spec.pieces))
                raise CheckpointError(f"{self.dir}: master weights of {name} missing for EP ranks "
                                      f"{missing}" if missing else
                                      f"{self.dir}: master weights of {name} for EP ranks "
                                      f"{sorted(set(spec.pieces) - ranks)}, which hold none of "
                                      "its experts")
            for ep_rank, pieces in spec.pieces.items():
                orders = [o for o, _ in pieces]
                if len(set(orders)) != len(orders):
                    raise CheckpointError(f"{self.dir}: two partitions hold the same part of "
                                          f"{name} (EP rank {ep_rank}): refused")
                have = sum(p.numel for _, p in pieces)
                if have != want:
                    raise CheckpointError(f"{self.dir}: parameter {name} has {have} master "
                                          f"elements on EP rank {ep_rank}, expected {want}")
                for _, p in pieces:
                    self._slice(p, verify=False)
                    flats.setdefault((p.file, p.key), self._flat(p.file, p.key))
        spans = sorted((str(t.record.path), t.file_offset, t.file_offset + t.numel() * 4, k)
                       for k, t in flats.items() if t.numel())
        for a, b in itertools.pairwise(spans):
            if a[0] == b[0] and b[1] < a[2]:
                raise CheckpointError(f"{self.dir / b[3][0]}: flat partition "
                                      f"{'.'.join(map(str, b[3][1]))} shares its bytes with "
                                      f"{a[3][0]} {'.'.join(map(str, a[3][1]))}: refused")
        if self.zero_stage < 3:  # the module copies of the weights: float, the same shapes
            module = self.model_state["module"]
            for name, spec in self.params.items():
                t = module.get(name) if spec.expert is None and spec.module_file is None else None
                if t is not None:
                    self._module_tensor(self.model_file, name, t, spec.shape)

    def _check_autoep(self) -> None:
        """Each AutoEP layer's w1, w2, w3: present, [E, I, H], [E, H, I], [E, I, H]."""
        f = self.model_file
        for e in self._experts.values():
            if e.weight != "w1":
                continue
            names = [f"{e.prefix}.{w}" for w in ("w1", "w2", "w3")]
            for n in names:
                if n not in self.params:
                    raise CheckpointError(f"{self.dir / f}: AutoEP layer {e.prefix}: parameter {n} "
                                          "not in the checkpoint")
            s1, s2, s3 = (self.params[n].shape for n in names)
            if len(s1) != 3 or s1[0] != e.num_experts or s3 != s1 \
                    or s2 != (s1[0], s1[2], s1[1]):
                raise CheckpointError(f"{self.dir / f}: AutoEP layer {e.prefix}: expert shapes "
                                      f"w1 {list(s1)}, w2 {list(s2)}, w3 {list(s3)} do not fit "
                                      f"{e.num_experts} experts")
