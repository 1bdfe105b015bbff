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
"""

from __future__ import annotations

import math
import os
import re
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moe_merge.checkpoint.safe_load import CheckpointError, LazyTensor, Record, load, pread_exact

try:  # Intel ISA-L's CRC-32: ~4x zlib's speed; same polynomial, same values
    from isal.isal_zlib import crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    crc32, _crc32_combine = zlib.crc32, None

OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_CRC_POOL: ThreadPoolExecutor | None = None


NATIVE_EXPERT_RE = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..+)$")
MODEL_FILE = "mp_rank_00_model_states.pt"


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
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _crc_range(record: Record, start: int, nbytes: int, crc: int = 0) -> int:
    """``crc`` continued over ``nbytes`` of ``record``'s file from byte ``start`` (pread)."""
    done = 0
    view = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
    fd = os.open(record.path, os.O_RDONLY)
    try:
        while done < nbytes:
            part = view[:min(len(view), nbytes - done)]
            pread_exact(fd, part, start + done, record.path)
            crc = crc32(part, crc)  # releases the GIL: runs beside the averaging
            done += len(part)
    finally:
        os.close(fd)
    return crc


def _check_crc(record: Record, pieces: list[tuple[int, int, int]] | None = None) -> None:
    """Compare the CRC-32 of ``record``'s bytes with the one its zip entry holds. ``pieces``:
    ``(byte, nbytes, crc)`` of ranges the caller has read (and checksummed) already; only the
    bytes between them are read here, and the CRCs are combined."""
    crc, pos, end = 0, record.offset, record.offset + record.nbytes
    if pieces and _crc32_combine is not None:
        for byte, nbytes, piece_crc in sorted(pieces):
            if byte < pos or byte + nbytes > end:  # overlapping reads: check it whole
                crc, pos = 0, record.offset
                break
            if byte > pos:
                crc = _crc_range(record, pos, byte - pos, crc)
            crc = _crc32_combine(crc, piece_crc, nbytes)
            pos = byte + nbytes
    crc = _crc_range(record, pos, end - pos, crc)
    if crc != record.crc:
        raise CheckpointError(f"{record.path}: record {record.name} fails its CRC-32 check "
                              "(corrupted file)")


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
        names = sorted(p.name for p in self.dir.iterdir() if p.is_file())
        self.optim_files = {int(m.group(2)): n for n in names if (m := OPTIM_RE.match(n))}
        self.zero3_model_files = {int(m.group(1)): n for n in names if (m := ZERO3_MODEL_RE.match(n))}
        self.expert_files = {(int(m.group(1)), int(m.group(2))): n
                             for n in names if (m := EXPERT_FILE_RE.match(n))}
        if any(int(m.group(3)) for n in names if (m := OPTIM_RE.match(n))):
            raise CheckpointError(f"{self.dir}: tensor/pipeline-parallel checkpoints (mp_rank > 0) "
                                  "are not supported")
        if MODEL_FILE in names:
            self.model_file = MODEL_FILE
        elif 0 in self.zero3_model_files:
            self.model_file = self.zero3_model_files[0]
        else:
            raise CheckpointError(f"{self.dir}: no {MODEL_FILE} or zero_pp_rank_0_mp_rank_00_model_"
                                  "states.pt: not a DeepSpeed checkpoint tag")
        self.model_state = self._load(self.model_file)
        for key in ("module", "ds_version"):
            if key not in self.model_state:
                raise CheckpointError(f"{self.dir / self.model_file}: key '{key}' missing: not a "
                                      "DeepSpeed model-states file")
        self.ds_config: dict = self.model_state.get("ds_config") or {}
        self.autoep_layers: list[dict] = self.model_state.get("ds_autoep_layers") or []
        self.native_moe = bool(self.expert_files) and not self.autoep_layers
        self.zero_stage = self._zero_stage()
        if self.native_moe and self.zero_stage == 3:
            raise CheckpointError(f"{self.dir}: native deepspeed.moe.layer.MoE under ZeRO-3 is not "
                                  "a layout DeepSpeed writes; cannot read it")
        self._native_ep = 1
        self.dp_size = int(self.model_state.get("dp_world_size") or max(len(self.optim_files), 1))
        self.has_master = bool(self.optim_files)
        self.bf16 = any(n.startswith("bf16_") for n in self.optim_files.values()) or bool(
            self.ds_config.get("bf16", {}).get("enabled"))
        if self.optim_files and sorted(self.optim_files) != list(range(self.dp_size)):
            missing = sorted(set(range(self.dp_size)) - set(self.optim_files))
            raise CheckpointError(f"{self.dir}: optimizer partition of rank {missing[0]} missing "
                                  f"(dp world size {self.dp_size}, found ranks "
                                  f"{sorted(self.optim_files)})")
        self.params: dict[str, ParamSpec] = self._build_specs()
        self.shared: dict[str, str] = dict(self.model_state.get("shared_params") or {})

    # ---- description ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.model_state.get("global_steps") or 0)

    @property
    def ep_size(self) -> int:
        if self.native_moe:
            return self._native_ep
        return max((int(e["ep_size"]) for e in self.autoep_layers), default=1)

    @property
    def num_experts(self) -> int:
        if self.native_moe:
            return max((int(n) for n in self.model_state.get("num_experts") or []), default=0)
        return max((int(e["num_experts"]) for e in self.autoep_layers), default=0)

    @property
    def preset(self) -> str | None:
        ep = self.ds_config.get("expert_parallel") or {}
        return ep.get("preset_model") if ep.get("enabled") else None

    @cached_property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

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
        ``record``, open as ``fd``", covering the tensor in order. ``None`` when the layout is
        not a plain concatenation (no master weights, or an expert placement that is not
        contiguous): use :meth:`read` then.

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
                    if flat.dtype != "float32":
                        return None
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
        """A file descriptor of the file holding ``record``, opened once."""
        key = str(record.path)
        if key not in self._fds:
            self._fds[key] = os.open(record.path, os.O_RDONLY)
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

    def _read_module(self, spec: ParamSpec):
        import torch

        if self.zero_stage == 3:
            raise CheckpointError(f"{self.dir}: ZeRO-3 checkpoints hold no full module weights; "
                                  "read the fp32 master weights (--source master)")
        if spec.module_file is not None:
            t = self._load(spec.module_file).get(spec.name)
            if not isinstance(t, LazyTensor):
                raise CheckpointError(f"{self.dir / spec.module_file}: key '{spec.name}' missing")
            return self._materialize(t).float().reshape(spec.shape)
        if spec.expert is None:
            t = self.model_state["module"].get(spec.name)
            if not isinstance(t, LazyTensor):
                raise CheckpointError(f"{self.dir / self.model_file}: module weight {spec.name} missing")
            return self._materialize(t).float().reshape(spec.shape)
        e = spec.expert
        rows = []
        for g in range(e.num_experts):
            fname = self.expert_files.get((e.layer_id, g))
            if fname is None:
                raise CheckpointError(f"{self.dir}: expert file layer_{e.layer_id}_expert_{g}_mp_rank_00"
                                      "_model_states.pt missing")
            sd = self._load(fname)
            key = f"{e.prefix}.{e.weight}.{g}"
            if not isinstance(sd.get(key), LazyTensor):
                raise CheckpointError(f"{self.dir / fname}: key '{key}' missing")
            rows.append(self._materialize(sd[key]).float())
        return torch.stack(rows).reshape(spec.shape)

    def _materialize(self, t: LazyTensor):
        if self.verify:
            self._verify_record(t.record)
        return t.torch()

    def _slice(self, piece: Piece, verify: bool = True) -> LazyTensor:
        obj: Any = self._load(piece.file)
        try:
            for k in piece.key:
                obj = obj[k]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{self.dir / piece.file}: key {'.'.join(map(str, piece.key))} "
                                  "missing") from None
        if not isinstance(obj, LazyTensor):
            raise CheckpointError(f"{self.dir / piece.file}: {'.'.join(map(str, piece.key))} is "
                                  "not a tensor")
        if piece.start + piece.numel > obj.numel():
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
            _check_crc(record)
            return
        global _CRC_POOL
        if _CRC_POOL is None:
            _CRC_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32")
        self._pending.append(_CRC_POOL.submit(_check_crc, record))

    def wait_verified(self) -> None:
        """Raise the first CRC failure of the records read so far (``verify_async`` mode)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        inline, self._inline = self._inline, {}
        for record, pieces in inline.items():
            self._verified.add(record)
            _check_crc(record, pieces)

    def _load(self, fname: str) -> dict:
        if fname not in self._files:
            self._files[fname] = load(self.dir / fname)
        return self._files[fname]

    # ---- layout discovery ----------------------------------------------------------------
    def _zero_stage(self) -> int:
        if self.optim_files:
            osd = self._load(self.optim_files[min(self.optim_files)]).get("optimizer_state_dict", {})
            if "zero_stage" in osd:
                return int(osd["zero_stage"])
        if self.model_file != MODEL_FILE:  # only ZeRO-3 writes per-rank model-state files
            return 3
        return int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))

    def _expert_info(self) -> dict[str, ExpertInfo]:
        info = {}
        for entry in self.autoep_layers:
            placement = entry.get("expert_placement")
            if placement is not None:
                ranks = {int(r["rank"]): [int(x) for x in r["experts"]] for r in placement["ranks"]}
            else:
                n_local = int(entry["num_local_experts"])
                ranks = {r: list(range(r * n_local, (r + 1) * n_local))
                         for r in range(int(entry["ep_size"]))}
            for w in ("w1", "w2", "w3"):
                name = f"{entry['expert_key_prefix']}.{w}"
                info[name] = ExpertInfo(int(entry["num_experts"]), ranks, int(entry["moe_layer_id"]),
                                        entry["expert_key_prefix"], w)
        return info

    def _spec(self, name: str, local_shape: tuple, experts: dict[str, ExpertInfo]) -> ParamSpec:
        e = experts.get(name)
        if e is None:
            return ParamSpec(name, local_shape, local_shape)
        counts = {len(v) for v in e.placement.values()}
        if counts != {local_shape[0]}:
            raise CheckpointError(f"{self.dir}: non-uniform AutoEP expert placement for {name} is "
                                  "not supported")
        return ParamSpec(name, (e.num_experts, *local_shape[1:]), local_shape, e)

    def _build_specs(self) -> dict[str, ParamSpec]:
        experts = self._expert_info()
        if not self.optim_files:
            if self.bf16:
                raise CheckpointError(f"{self.dir}: bf16 checkpoint without optimizer partitions: "
                                      "no fp32 master weights to read")
            if self.zero_stage > 0:
                raise CheckpointError(f"{self.dir}: ZeRO-{self.zero_stage} checkpoint without its "
                                      "*_optim_states.pt files")
            module = self.model_state["module"]
            buffers = set(self.model_state.get("buffer_names") or [])
            specs = {n: ParamSpec(n, tuple(t.shape), tuple(t.shape))
                     for n, t in module.items() if n not in buffers}
            native = self._native_expert_files() if self.native_moe else {}
            expp = [p for p in self.dir.glob("expp_rank_*_mp_rank_00_optim_states.pt")]
            self._native_ep = max(len(expp), 1)  # ZeRO-0 MoE: one optimizer file per EP rank
            for n, (fname, shape) in native.items():
                specs[n] = ParamSpec(n, shape, shape, module_file=fname)
            return specs
        if self.zero_stage == 3:
            return self._specs_zero3(experts)
        return self._specs_zero12(experts)

    def _native_expert_files(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Global expert parameter name -> (per-expert file, shape), from the expert files."""
        index = {}
        for _, fname in sorted(self.expert_files.items()):
            for name, t in self._load(fname).items():
                if isinstance(t, LazyTensor):
                    index[name] = (fname, tuple(t.shape))
        return index

    def _native_groups(self, fname: str, osd: dict) -> dict[int, tuple[int, int]]:
        """Native-MoE optimizer groups: group index -> (ep size, expert-dp partition count)."""
        groups = (osd.get("base_optimizer_state") or {}).get("param_groups") or []
        counts = osd.get("partition_count")
        out = {}
        for g, group in enumerate(groups):
            if not group.get("moe"):
                continue
            m = re.fullmatch(r"ep_size_(\d+)", str(group.get("name", "")))
            if m is None or not isinstance(counts, list) or g >= len(counts):
                raise CheckpointError(f"{self.dir / fname}: MoE parameter group {g} has no "
                                      "'ep_size_N' name or partition count")
            out[g] = (int(m.group(1)), int(counts[g]))
        return out

    def _specs_zero12(self, experts: dict[str, ExpertInfo]) -> dict[str, ParamSpec]:
        shapes = self.model_state.get("param_shapes")
        specs: dict[str, ParamSpec] = {}
        native = self._native_expert_files() if self.native_moe else {}
        ep = self.ep_size
        before = bool(self.ds_config.get("use_data_before_expert_parallelism", False))
        if self.dp_size % ep:
            raise CheckpointError(f"{self.dir}: dp size {self.dp_size} not divisible by ep size {ep}")
        edp = self.dp_size // ep
        for rank, fname in sorted(self.optim_files.items()):
            osd = self._load(fname).get("optimizer_state_dict")
            if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
                raise CheckpointError(f"{self.dir / fname}: key 'optimizer_state_dict."
                                      "single_partition_of_fp32_groups' missing")
            mappings = osd.get("param_slice_mappings")
            if mappings is None:
                raise CheckpointError(f"{self.dir / fname}: key 'param_slice_mappings' missing "
                                      "(checkpoint from a DeepSpeed older than 0.10?)")
            moe_groups = self._native_groups(fname, osd) if self.native_moe else {}
            for g, mapping in enumerate(mappings):
                if g in moe_groups:
                    self._add_native(specs, rank, fname, g, mapping, moe_groups[g], shapes, native,
                                     before)
                    continue
                for name, frag in mapping.items():
                    is_expert = name in experts
                    if name not in specs:
                        local = self._shape_of(shapes, g, name)
                        specs[name] = self._spec(name, local, experts)
                    ep_rank = ((rank // edp if before else rank % ep) if is_expert else 0)
                    order = (rank % edp if before else rank // ep) if is_expert else rank
                    piece = Piece(fname, ("optimizer_state_dict", "single_partition_of_fp32_groups",
                                          g), int(frag.start), int(frag.numel))
                    specs[name].pieces.setdefault(ep_rank, []).append((order, piece))
        return self._ordered(specs, shapes)

    def _add_native(self, specs, rank, fname, g, mapping, group, shapes, native, before) -> None:
        """Pieces of one rank's native-MoE expert group, under global expert names."""
        ep, edp = group
        if self.dp_size % ep or self.dp_size // ep != edp:
            raise CheckpointError(f"{self.dir / fname}: MoE group {g}: dp size {self.dp_size}, ep "
                                  f"size {ep} and expert-data-parallel size {edp} do not agree")
        self._native_ep = max(self._native_ep, ep)
        ep_rank = rank // edp if before else rank % ep
        order = rank % edp if before else rank // ep
        local = {}
        for name in mapping:
            m = NATIVE_EXPERT_RE.match(name)
            if m is None:
                raise CheckpointError(f"{self.dir / fname}: parameter {name} of MoE group {g} is "
                                      "not a deepspeed_moe expert")
            local[m.group(1)] = max(local.get(m.group(1), 0), int(m.group(2)) + 1)
        for name, frag in mapping.items():
            m = NATIVE_EXPERT_RE.match(name)
            gname = f"{m.group(1)}{ep_rank * local[m.group(1)] + int(m.group(2))}{m.group(3)}"
            if gname not in specs:
                shape = self._shape_of(shapes, g, name)
                specs[gname] = ParamSpec(gname, shape, shape,
                                         module_file=native.get(gname, (None,))[0])
            piece = Piece(fname, ("optimizer_state_dict", "single_partition_of_fp32_groups", g),
                          int(frag.start), int(frag.numel))
            specs[gname].pieces.setdefault(0, []).append((order, piece))

    def _specs_zero3(self, experts: dict[str, ExpertInfo]) -> dict[str, ParamSpec]:
        specs: dict[str, ParamSpec] = {}
        first_shapes = None
        for rank, fname in sorted(self.optim_files.items()):
            mfile = self.zero3_model_files.get(rank)
            if mfile is None:
                raise CheckpointError(f"{self.dir}: zero_pp_rank_{rank}_mp_rank_00_model_states.pt "
                                      "missing")
            mstate = self._load(mfile)
            shapes = mstate.get("param_shapes")
            if shapes is None:
                raise CheckpointError(f"{self.dir / mfile}: key 'param_shapes' missing")
            first_shapes = first_shapes or shapes
            ep_rank_of = {f"{e['expert_key_prefix']}.{w}": int(e.get("ep_rank", 0))
                          for e in mstate.get("ds_autoep_layers") or [] for w in ("w1", "w2", "w3")}
            osd = self._load(fname).get("optimizer_state_dict")
            if not isinstance(osd, dict) or "fp32_flat_groups" not in osd:
                raise CheckpointError(f"{self.dir / fname}: key 'optimizer_state_dict."
                                      "fp32_flat_groups' missing")
            groups = osd.get("ds_zero_partition_groups") or []
            for g, group_shapes in enumerate(shapes):
                meta = groups[g] if g < len(groups) else {}
                count = int(meta.get("partition_count", self.dp_size))
                prank = int(meta.get("partition_rank", rank))
                offset = 0
                for name, shape in group_shapes.items():
                    shape = tuple(int(s) for s in shape)
                    numel = math.prod(shape)
                    part = -(-numel // count)
                    take = max(0, min(part, numel - prank * part))
                    if name not in specs:
                        specs[name] = self._spec(name, shape, experts)
                    ep_rank = ep_rank_of.get(name, 0) if name in experts else 0
                    piece = Piece(fname, ("optimizer_state_dict", "fp32_flat_groups", g), offset, take)
                    specs[name].pieces.setdefault(ep_rank, []).append((prank, piece))
                    offset += part
        return self._ordered(specs, first_shapes)

    def _shape_of(self, shapes, g: int, name: str) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in shapes[g][name])
        except (TypeError, IndexError, KeyError):
            raise CheckpointError(f"{self.dir / self.model_file}: no shape for parameter {name} in "
                                  f"param_shapes[{g}]") from None

    def _ordered(self, specs: dict[str, ParamSpec], shapes) -> dict[str, ParamSpec]:
        """Parameters in module order (the order of the model-states ``module`` dict)."""
        order = [n for n in self.model_state["module"] if n in specs]
        rest = sorted((n for n in specs if n not in set(order)), key=_natural)
        for name in [*order, *rest]:
            spec = specs[name]
            want = set(spec.expert.placement) if spec.expert else {0}
            if set(spec.pieces) != want:
                raise CheckpointError(f"{self.dir}: master weights of {name} missing for EP ranks "
                                      f"{sorted(want - set(spec.pieces))}")
        return {n: specs[n] for n in [*order, *rest]}
