"""Read one DeepSpeed checkpoint tag (``global_stepN/``) as full logical fp32 tensors.

:class:`DSCheckpoint` does the file access: it lists the tag's files (regular files, or
symlinks to regular files inside the tag; no FIFOs, devices or symlinks leading out), loads the
pickles the layout needs with :func:`moe_merge.checkpoint.safe_load.load` (no torch, no code
run: tensors are :class:`LazyTensor` records, checked by
:func:`~moe_merge.checkpoint.fields.check_views`), and reads values with ``pread`` where they
are needed. Where each parameter's values lie is parsed from those loaded state dicts by the
pure functions of :mod:`~moe_merge.checkpoint.layouts` (ZeRO-0/1/2/3) and
:mod:`~moe_merge.checkpoint.experts` (AutoEP, native MoE); the CRC-32 of every record read is
checked by :mod:`~moe_merge.checkpoint.verify`.

A merge touches only the fp32 master bytes it needs, never the optimizer moments; torch is
imported only where a torch tensor is returned (:meth:`DSCheckpoint.read`). Read from module
weights (no optimizer partitions) the output is at most :data:`MODULE_BYTES_FACTOR` times the
tag's bytes on disk (tied weights share one storage).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path

from moe_merge.checkpoint import layouts
from moe_merge.checkpoint.fields import check_views
from moe_merge.checkpoint.safe_load import (
    LazyTensor,
    Record,
    load,
    open_regular,
    pread_exact,
    real_path,
)
from moe_merge.checkpoint.specs import ExpertInfo, ParamSpec, Piece, for_state
from moe_merge.checkpoint.verify import Verifier, check_crc, crc32
from moe_merge.errors import CheckpointError

__all__ = ["DSCheckpoint", "ExpertInfo", "ParamSpec", "Piece", "crc32", "MODULE_BYTES_FACTOR"]

MODULE_BYTES_FACTOR = 8  # output bytes read from module weights, per byte of the tag
_for_state = for_state  # the names the DeepSpeed-format writer and the tests import
_check_crc = check_crc


def _path_text(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


class _Loaded(Mapping):
    """The tag's files by name, each loaded (and its views checked) when first looked up."""

    def __init__(self, tag_dir: Path, names: list[str]):
        self._dir = tag_dir
        self._names = set(names)
        self._files: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        obj = self._files.get(name)
        if obj is None:
            if name not in self._names:
                raise KeyError(name)
            obj = load(self._dir / name, root=self._dir)
            check_views(self._dir / name, obj)
            self._files[name] = obj
        return obj

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


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
        self._verifier = Verifier(self.dir, verify, verify_async)
        self._fds: dict[str, int] = {}
        self.files: list[str] = self._list_files()
        tag = layouts.classify(self.dir, self.files)
        self.optim_files = tag.optim_files
        self.zero3_model_files = tag.zero3_model_files
        self.expert_files = tag.expert_files
        self.model_file = tag.model_file
        self._loaded = _Loaded(self.dir, self.files)
        self.model_state = self._loaded[self.model_file]
        self.layout = layouts.describe(tag, self._loaded)
        model = self.layout.model
        self.ds_config: dict = model.ds_config
        self.autoep_layers: list[dict] = model.autoep_layers
        self.shared: dict[str, str] = model.shared
        self.bf16: bool = model.bf16
        self.native_moe: bool = self.layout.native_moe
        self.zero_stage: int = self.layout.zero_stage
        self.dp_size: int = self.layout.dp_size
        self.has_master: bool = self.layout.has_master
        self.params: dict[str, ParamSpec] = self.layout.params
        if not self.has_master:
            self._check_module_bytes()

    # ---- description ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.layout.step

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def preset(self) -> str | None:
        return self.layout.model.preset

    @cached_property
    def bytes_on_disk(self) -> int:
        return sum(os.stat(self.dir / n).st_size for n in self.files)

    @cached_property
    def master_files(self) -> list[str]:
        return [self.optim_files[r] for r in sorted(self.optim_files)]

    def param_counts(self) -> dict[str, int]:
        # experts placed by AutoEP or native MoE, or a model's own fused experts (transformers'
        # mlp.experts.gate_up_proj / down_proj in a run without expert parallelism)
        expert = sum(p.numel for n, p in self.params.items() if p.is_expert or ".experts." in n)
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
            ordered = [for_state(p, state) for _, p in sorted(pieces, key=lambda t: t[0])]
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
                    self._verifier.expect(flat.record)
                    segs.append((offset, p.numel, self._fd(flat.record), flat.file_offset,
                                 flat.record))
                offset += p.numel
        segs.sort(key=lambda s: s[0])
        return segs

    def note_read(self, record: Record, byte: int, nbytes: int, crc: int) -> None:
        """The caller read ``nbytes`` at ``byte`` of a segment of ``record``; their CRC-32."""
        self._verifier.note(record, byte, nbytes, crc)

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

    def check_module(self) -> None:
        """Check every module weight a read with ``source="module"`` takes (per-expert files
        included) without reading one: call before merging from module weights."""
        for spec in self.params.values():
            layouts.module_tensors(self.layout, self._loaded, spec)

    def _read_module(self, spec: ParamSpec):
        import torch

        tensors = [self._materialize(t).float()
                   for t in layouts.module_tensors(self.layout, self._loaded, spec)]
        if spec.expert is None:
            return tensors[0]
        return torch.stack(tensors)

    def _materialize(self, t: LazyTensor):
        self._verifier.check(t.record)
        return t.torch()

    def _slice(self, piece: Piece, verify: bool = True) -> LazyTensor:
        """The elements of ``piece`` (its record's CRC checked, with ``verify``)."""
        t = layouts.piece_tensor(self.layout.tag, self._loaded, piece)
        if verify:
            self._verifier.check(t.record)
        return t

    def wait_verified(self) -> None:
        """Raise the first CRC failure of the records read so far (``verify_async`` mode)."""
        self._verifier.wait()

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

    def _check_module_bytes(self) -> None:
        """Read from module weights, the output is bounded by the bytes of the tag's files."""
        total = sum(p.numel for p in self.params.values()) * 4
        if total > MODULE_BYTES_FACTOR * max(self.bytes_on_disk, 1 << 20):
            raise CheckpointError(f"{self.dir}: its parameters declare {total} bytes of fp32 "
                                  f"weights, more than {MODULE_BYTES_FACTOR} times the "
                                  f"{self.bytes_on_disk} bytes of its files: refused")
