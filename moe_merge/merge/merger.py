"""The streaming merger: M = sum_i w_i M_i over DeepSpeed checkpoints, one tensor at a time.

For each output tensor, the fp32 master values of every selected checkpoint are added, weighted
and widened to float64 (so that N identical checkpoints merge to themselves bit for bit, and the
SMA of two is their correctly rounded midpoint), one cache-sized chunk at a time straight from
the partition files, then rounded once to fp32 and handed to the shard writer. Peak memory: two
fp32 copies of the largest tensor, whatever N is.

The merge itself needs only numpy: files are parsed without torch (see safe_load), values are
read with ``pread`` into cache-sized buffers, and torch is imported only for the layouts that
must be gathered through :meth:`DSCheckpoint.read` and for the DeepSpeed-format output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_merge import __version__
from moe_merge.checkpoint.discover import Tag, find_tags, hf_dir_for, is_tag_dir
from moe_merge.checkpoint.names import (
    OutTensor,
    check_against_hf,
    hf_expected,
    hf_map,
    identity_map,
)
from moe_merge.checkpoint.reader import DSCheckpoint, crc32
from moe_merge.checkpoint.safe_load import Record, pread_exact
from moe_merge.errors import CheckpointError, MergeError
from moe_merge.merge import hf_files
from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import axpy, weighted_sum
from moe_merge.merge.writer import (
    ShardWriter,
    atomic_dir,
    check_apart,
    check_target,
    parse_size,
    plan_shards,
)

log = logging.getLogger(__name__)

FORMATS = ("hf", "safetensors", "deepspeed")
MANIFEST = "merge_manifest.json"
# Elements per accumulation chunk: 2 MiB of float64, which stays in a core's cache while every
# input is added into it (whole-tensor passes run at memory speed, 3-7x slower here).
CHUNK = 1 << 18
PREFETCH_BYTES = 256 << 20  # read-ahead requested beyond the tensor being merged


def plan(ckpts: Sequence[str | Path], selection: Selection = Selection(),
         warn: Callable[[str], None] | None = None) -> tuple[list[Tag], list[float]]:
    """The checkpoints ``selection`` chooses and their effective weights (nothing is read yet);
    ``warn`` is told of each tag left out as not whole (see
    :func:`~moe_merge.checkpoint.discover.find_tags`)."""
    chosen = selection.choose(find_tags(list(ckpts), warn))
    return chosen, selection.weights_for(len(chosen))


def input_dirs(inputs: Sequence[str | Path], tags: Sequence[Tag] = (),
               hf_dir: str | Path | None = None) -> list[tuple[Path, bool]]:
    """The directories an output must stay apart from (see :func:`check_apart`), each with
    whether outputs may lie inside it: every input tag, ``checkpoints/`` directory (or other
    directory of tags) and the HF config directory, strictly; a run directory itself, which
    may hold outputs beside its ``checkpoints/`` (``RUN/merged/NAME``)."""
    dirs: list[tuple[Path, bool]] = []
    for raw in inputs:
        p = Path(raw)
        if is_tag_dir(p):
            dirs.append((p, False))
            if p.parent.name == "checkpoints":
                dirs += [(p.parent, False), (p.parent.parent, True)]
        elif (p / "checkpoints").is_dir():
            dirs += [(p, True), (p / "checkpoints", False)]
        else:  # a directory of checkpoint folders (a Trainer output_dir) may hold outputs
            folders = p.is_dir() and any(t.folder is not None and t.folder.parent == p.resolve()
                                         for t in tags)
            dirs.append((p, folders))
    for t in tags:
        dirs.append((t.path, False))
        if t.folder is not None:
            dirs.append((t.folder, False))
        if t.run_dir is not None:
            dirs += [(t.run_dir / "checkpoints", False), (t.run_dir, True)]
    if hf_dir is not None:
        dirs.append((Path(hf_dir), False))
    return dirs


def _hf_outs(r: DSCheckpoint, hf_dir: Path) -> list[OutTensor]:
    """The HF model's tensors, made from ``r``'s: named, fused and checked against the model
    that ``hf_dir``'s config builds."""
    sig = r.signature()
    try:
        outs = hf_map(sig, r.autoep_layers, r.preset)
    except (CheckpointError, KeyError, TypeError, IndexError) as e:  # from the model states
        why = str(e) if isinstance(e, CheckpointError) else f"ds_autoep_layers: {e!r}"[:200]
        raise CheckpointError(f"{r.dir / r.model_file}: {why}") from None
    expected, tied = hf_expected(hf_dir, sig)
    return check_against_hf(outs, expected, tied, hf_dir)


def _check_compatible(readers: list[DSCheckpoint]) -> None:
    ref = readers[-1]
    want = ref.signature()
    for r in readers[:-1]:
        have = r.signature()
        for name, shape in want.items():
            if name not in have:
                raise CheckpointError(f"{r.dir}: tensor {name} missing (present in {ref.dir}): "
                                      "checkpoints of different models")
            if have[name] != shape:
                raise CheckpointError(f"{r.dir}: tensor {name} has shape {list(have[name])}, "
                                      f"{ref.dir} has {list(shape)}: checkpoints of different "
                                      "models")
        extra = [n for n in have if n not in want]
        if extra:
            raise CheckpointError(f"{r.dir}: tensor {extra[0]} not in {ref.dir}: checkpoints of "
                                  "different models")


def _read_out(r: DSCheckpoint, o: OutTensor, source: str, out=None):
    """Output tensor ``o`` of checkpoint ``r`` as a torch tensor (its sources concatenated),
    into ``out`` (a torch tensor of its shape) if given."""
    if out is None:
        import torch

        parts = [r.read(s, source) for s in o.sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=o.cat_dim)
    if len(o.sources) == 1:
        return r.read(o.sources[0], source, out=out.view(r.params[o.sources[0]].shape))
    offset = 0
    for s in o.sources:
        size = r.params[s].shape[o.cat_dim]
        r.read(s, source, out=out.narrow(o.cat_dim, offset, size))
        offset += size
    return out


Segment = tuple[int, int, int, int, Record]  # see DSCheckpoint.segments


def _cut(segs: list[Segment], start: int, stop: int, base: int = 0) -> list[Segment]:
    """The parts of ``segs`` (sorted, see :meth:`DSCheckpoint.segments`) inside
    ``[start, stop)``, re-based so that ``start`` lands at ``base``."""
    out = []
    for off, numel, fd, byte, rec in segs:
        lo, hi = max(off, start), min(off + numel, stop)
        if lo < hi:
            out.append((base + lo - start, hi - lo, fd, byte + (lo - off) * 4, rec))
    return out


def _out_segments(r: DSCheckpoint, o: OutTensor, source: str) -> list[Segment] | None:
    """Where the values of output tensor ``o`` lie in ``r``'s master partitions (see
    :meth:`DSCheckpoint.segments`, offsets into the flattened output), or ``None`` when it has
    to be read (and gathered) with :meth:`DSCheckpoint.read` instead."""
    if source != "master":
        return None
    parts = [r.segments(s) for s in o.sources]
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    shapes = [r.params[s].shape for s in o.sources]
    outer = math.prod(o.shape[:o.cat_dim])
    inner = [math.prod(sh[o.cat_dim:]) for sh in shapes]
    if outer * len(parts) > 4096:  # concatenation along a late dim: too many tiny pieces
        return None
    segs, dst = [], 0
    for i in range(outer):
        for p, k in zip(parts, inner):
            segs.extend(_cut(p, i * k, (i + 1) * k, dst))
            dst += k
    return segs


def _accumulate_chunked(acc: np.ndarray, segs: list[list[Segment]], weights: list[float],
                        notes: list[Callable | None], out: np.ndarray, zero: bool,
                        span: tuple[int, int] | None = None) -> float:
    """``out = acc + sum_i weights[i] * input_i`` over the flattened tensor, one cache-sized
    chunk at a time: each chunk of the float64 accumulator stays in cache while every input's
    float32 values are read (``pread`` from the file into a cache-resident staging buffer),
    widened and added into it; it is then rounded once into ``out``. Returns the float64 sum
    of the result (NaN/Inf if any input value is). ``zero``: ``acc`` holds nothing yet, and
    may be one chunk long (it is reused for every chunk); else it holds the whole tensor's
    partial sum. ``span``: only elements ``[start, stop)`` of the tensor. ``notes[i]``: told
    the CRC-32 of every range read from input i (:meth:`DSCheckpoint.note_read`), or None."""
    start, n = span or (0, out.size)
    chunk = CHUNK
    stage = np.empty(min(chunk, n - start), dtype=np.float32)
    wide = np.empty(len(stage), dtype=np.float64)
    stage_mem = memoryview(stage).cast("B")
    total = 0.0
    cursors = [0] * len(segs)
    for c0 in range(start, n, chunk):
        c1 = min(c0 + chunk, n)
        if zero:
            a = acc[:c1 - c0]
            a.fill(0.0)
        else:
            a = acc[c0:c1]
        for i, (sg, w, note) in enumerate(zip(segs, weights, notes)):
            j = cursors[i]
            while j < len(sg) and sg[j][0] + sg[j][1] <= c0:
                j += 1
            cursors[i] = j
            while j < len(sg) and sg[j][0] < c1:
                off, numel, fd, byte, rec = sg[j]
                lo, hi = max(off, c0), min(off + numel, c1)
                pos, view = byte + (lo - off) * 4, stage_mem[:(hi - lo) * 4]
                pread_exact(fd, view, pos, rec.path)
                if note is not None:  # checksummed while the bytes are in cache
                    note(rec, pos, len(view), crc32(view))
                axpy(a[lo - c0:hi - c0], stage[:hi - lo], w, wide)
                j += 1
        with np.errstate(all="ignore"):  # overflow in the rounding or the sum: not finite
            out[c0:c1] = a
            total += float(a.sum())
    return total


def _prefetch(segs: list[list[Segment] | None]) -> int:
    """Ask the kernel to start reading these byte ranges (POSIX_FADV_WILLNEED): a no-op for
    pages already cached, asynchronous read-ahead for the rest. Returns their size."""
    total = 0
    for sg in segs:
        for _, numel, fd, byte, _ in sg or ():
            total += numel * 4
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, byte, numel * 4, os.POSIX_FADV_WILLNEED)
    return total


def _name_nonfinite(chosen: list[Tag], readers: list[DSCheckpoint], o: OutTensor,
                    source: str) -> None:
    import torch

    for r in readers:
        r.wait_verified()  # a record that fails its CRC is the cause: name it first
    for tag, r in zip(chosen, readers):
        if not torch.isfinite(_read_out(r, o, source)).all():
            raise CheckpointError(f"{tag.path}: tensor {o.name} holds NaN or Inf values "
                                  "(pass --allow-nonfinite to merge anyway)")
    raise CheckpointError(f"tensor {o.name}: the weighted sum is not finite "
                          "(pass --allow-nonfinite to merge anyway)")


def describe(tags: list[Tag], weights: list[float]) -> str:
    names = [f"{t.folder.name}/{t.name}" if t.folder is not None else t.name for t in tags]
    width = max([22, *map(len, names)])
    lines = [f"{'checkpoint':<{width}} {'step':>8} {'tokens':>14} {'weight':>10}"]
    for t, name, w in zip(tags, names, weights):
        tok = f"{t.tokens:,}" if t.tokens is not None else "-"
        lines.append(f"{name:<{width}} {t.step:>8} {tok:>14} {w:>10.6f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class OutputOptions:
    """What :func:`merge` writes: ``fmt`` (hf: a transformers directory; safetensors: the
    state dict under the checkpoint's own names; deepspeed: a checkpoint in the newest input's
    layout), ``hf_config`` (the directory whose HF config.json an hf output follows; default
    the run's hf/), ``max_shard_size`` (largest safetensors shard), ``overwrite`` (replace an
    existing output) and ``optimizer_state`` (Adam moments of a deepspeed output: reset,
    latest or merged). Checked when made."""

    fmt: str = "hf"
    hf_config: str | Path | None = None
    max_shard_size: str | int = "2GB"
    overwrite: bool = False
    optimizer_state: str = "latest"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise MergeError(f"--format: unknown format {self.fmt!r} (choose from "
                             f"{', '.join(FORMATS)})")
        parse_size(self.max_shard_size)

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


@dataclass
class _Job:
    """One merge, filled in step by step: what it takes (``chosen``, ``weights``), where from
    (``readers``, ``hf_dir``), what it writes (``outs``, ``copies``)."""

    out: Path
    selection: Selection
    output: OutputOptions
    source: str
    chosen: list[Tag]
    weights: list[float]
    hf_dir: Path | None
    readers: list[DSCheckpoint] = field(default_factory=list)
    outs: list[OutTensor] = field(default_factory=list)
    copies: list[hf_files.HFFile] = field(default_factory=list)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def merge(ckpts: Sequence[str | Path], out: str | Path, selection: Selection = Selection(),
          output: OutputOptions = OutputOptions(), *, source: str = "master",
          verify: bool = True, allow_nonfinite: bool = False, progress: bool = True,
          echo: Callable[[str], None] | None = None, distributed: bool = False) -> dict:
    """Merge the checkpoints ``selection`` chooses among ``ckpts`` into ``out``, written as
    ``output`` says; returns the manifest (also written there).

    ``source``: master (the fp32 weights of the optimizer partitions) or module. ``verify``:
    check the CRC-32 of every record read. ``allow_nonfinite``: merge NaN or Inf values
    instead of refusing them. ``distributed``: this process is one rank of a merge started by
    a launcher (deepspeed, torchrun); the output shards are shared out among the ranks, each
    reads only the bytes of its own shards, and rank 0 writes the index and manifest and moves
    the output into place. The output is the same, bit for bit, as a one-process merge's.
    ``out`` must be on a file system every rank sees."""
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    if distributed and output.fmt == "deepspeed":
        raise MergeError("--distributed writes hf or safetensors output; --format deepspeed is "
                         "written by one process")
    rank, world, dist, own_group = _init_distributed() if distributed else (0, 1, None, False)
    try:
        if rank:
            echo = lambda s: None  # noqa: E731 - rank 0 speaks for all
        job = _resolve(ckpts, Path(out), selection, output, source, echo)
        try:
            _open(job, verify, echo)
            return _write(job, rank, world, dist, verify, allow_nonfinite, progress, echo)
        finally:
            job.close()
    finally:
        if own_group:  # gloo's threads left running at interpreter exit can abort the process
            dist.destroy_process_group()


def _resolve(ckpts: Sequence[str | Path], out: Path, selection: Selection,
             output: OutputOptions, source: str, echo: Callable[[str], None]) -> _Job:
    """Check the options and the output's place, choose the checkpoints and find the HF
    config; nothing is opened yet."""
    if source not in ("master", "module"):
        raise MergeError(f"--source: unknown source {source!r} (master or module)")
    check_target(out, output.overwrite)
    chosen, weights = plan(ckpts, selection, echo)
    hf_dir = hf_dir_for(chosen, output.hf_config)
    check_apart(out, input_dirs(ckpts, chosen, hf_dir))  # before anything is opened
    return _Job(out, selection, output, source, chosen, weights, hf_dir)


def _open(job: _Job, verify: bool, echo: Callable[[str], None]) -> None:
    """Open every chosen checkpoint, check that they are of one model and can be read from
    ``job.source``, and list the output tensors (and HF files to copy) from the newest."""
    for t in job.chosen:
        job.readers.append(DSCheckpoint(t.path, verify=verify, verify_async=True))
    _check_compatible(job.readers)
    for r in job.readers:
        if job.source == "module" or not r.has_master:
            r.check_module()  # every module weight checked before a line is said
    if job.source == "master":
        for t, r in zip(job.chosen, job.readers):
            if not r.has_master:
                echo(f"warning: {t.path} has no optimizer partitions; reading its module "
                     "weights" + (" (bf16, rounded)" if r.bf16 else ""))
    newest, fmt = job.readers[-1], job.output.fmt
    if fmt == "hf":
        if job.hf_dir is None:
            raise MergeError(f"{job.chosen[-1].path}: no hf/config.json in the run directory; "
                             "pass --hf-config DIR (a directory with the model's HF "
                             "config.json)")
        job.outs = _hf_outs(newest, job.hf_dir)
        job.copies = hf_files.plan_copy(job.hf_dir)
        if left := hf_files.skipped(job.hf_dir):
            echo(f"note: not copied from {job.hf_dir} (not an HF config or tokenizer file): "
                 f"{', '.join(left)}")
    else:
        job.outs = identity_map(newest.signature())
    if fmt == "deepspeed" and job.source != "master":
        raise MergeError("--format deepspeed writes fp32 master weights: use --source master")


def _write(job: _Job, rank: int, world: int, dist, verify: bool, allow_nonfinite: bool,
           progress: bool, echo: Callable[[str], None]) -> dict:
    """Merge this rank's share of the output tensors into a temporary directory that rank 0
    owns, gather every rank's result, write the manifest and move the output into place."""
    f32 = np.dtype(np.float32)
    shards = plan_shards([(o.name, o.shape, f32) for o in job.outs], job.output.shard_bytes)
    mine, outs_mine = _my_share(job.outs, shards, rank, world)
    bar = None
    try:
        # Rank 0 owns the temporary directory (every rank writes its shards into it) and
        # moves it into place once every rank has finished without error.
        with (atomic_dir(job.out, job.output.overwrite) if rank == 0
              else contextlib.nullcontext()) as tmp:
            # said once the output could be created (a failure to create it is one line)
            echo(f"merging {len(job.chosen)} checkpoint(s) with {job.selection.describe()} -> "
                 f"{job.out} ({job.output.fmt})\n" + describe(job.chosen, job.weights))
            t0 = time.time()
            if progress and rank == 0:
                from tqdm import tqdm

                total = sum(math.prod(o.shape) * 4 for o in outs_mine) * len(job.readers)
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge",
                           file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            if world > 1:
                box = [str(tmp) if rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                tmp = Path(box[0])
            try:
                sha, error = _write_files(job, tmp, shards, mine, outs_mine, rank == 0,
                                          verify, allow_nonfinite, bar), None
            except (CheckpointError, MergeError) as e:
                if world == 1:
                    raise
                sha, error = {}, e
            if world > 1:
                sha = _all_or_none(dist, world, sha, error)
            manifest = _manifest(job, sha, world)
            if rank == 0:
                hf_files.copy_files(job.copies, tmp)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if world > 1:
            dist.barrier()  # the output is in place when any rank returns
    finally:
        if bar is not None:
            bar.close()
    echo(f"wrote {job.out} in {time.time() - t0:.1f} s ({len(sha)} file(s)"
         f"{f', {world} ranks' if world > 1 else ''})")
    return manifest


def _my_share(outs: list[OutTensor], shards: list[list[str]], rank: int, world: int
              ) -> tuple[set[int] | None, list[OutTensor]]:
    """The shards this rank writes (None: all) and the output tensors in them."""
    if world == 1:
        return None, outs
    nbytes = {o.name: math.prod(o.shape) * 4 for o in outs}
    mine = {i for i, r in enumerate(assign_shards(shards, nbytes, world)) if r == rank}
    owned = {name for i in mine for name in shards[i]}
    return mine, [o for o in outs if o.name in owned]


def _write_files(job: _Job, tmp: Path, shards: list[list[str]], mine: set[int] | None,
                 outs_mine: list[OutTensor], index: bool, verify: bool, allow_nonfinite: bool,
                 bar) -> dict[str, str]:
    """Merge ``outs_mine`` into the files of ``tmp`` (``index``: also the shard index);
    returns the sha256 of every file written."""
    f32 = np.dtype(np.float32)
    if job.output.fmt == "deepspeed":
        from moe_merge.merge.ds_writer import DeepSpeedWriter

        writer = DeepSpeedWriter(job.readers[-1], tmp, job.output.optimizer_state)
    else:
        writer = ShardWriter(tmp, shards, metadata={"format": "pt"},
                             specs={o.name: (tuple(o.shape), f32) for o in job.outs},
                             only=mine, index=index)
    _merge_tensors(job, outs_mine, writer, verify, allow_nonfinite, bar)
    for r in job.readers:
        r.wait_verified()  # a corrupted record read above fails the merge here
    if job.output.fmt != "deepspeed":
        return writer.finish()
    writer.finish()
    from moe_merge.merge.writer import sha256_file

    return {f"{writer.tag_dir.name}/{f.name}": sha256_file(f)
            for f in sorted(writer.tag_dir.iterdir()) if f.is_file()}


def _all_or_none(dist, world: int, sha: dict[str, str], error: Exception | None
                 ) -> dict[str, str]:
    """Every rank learns every rank's result: all fail (with the first rank's error), or none
    does and each gets the sha256 of every rank's files."""
    results = [None] * world
    dist.all_gather_object(results, (sha, None if error is None else
                                     (type(error).__name__, str(error))))
    failed = next((err for _, err in results if err is not None), None)
    if failed is not None:
        raise (MergeError if failed[0] == "MergeError" else CheckpointError)(failed[1])
    return {k: v for part, _ in results for k, v in part.items()}


def _manifest(job: _Job, sha: dict[str, str], world: int) -> dict:
    fmt = job.output.fmt
    return {
        "tool": f"moe-merge {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": fmt,
        "strategy": job.selection.kind,
        "alpha": job.selection.alpha,
        "source": job.source,
        "optimizer_state": job.output.optimizer_state if fmt == "deepspeed" else None,
        "inputs": [{"path": str(t.path), "tag": t.name, "step": t.step, "tokens": t.tokens,
                    "weight": wi, "zero_stage": r.zero_stage, "dp_size": r.dp_size,
                    "ep_size": r.ep_size, "bf16": r.bf16}
                   for t, r, wi in zip(job.chosen, job.readers, job.weights)],
        "weights": job.weights,
        "hf_config": str(job.hf_dir) if job.hf_dir else None,
        "params": job.readers[-1].param_counts(),
        "ranks": world,
        "files": {name: {"sha256": digest} for name, digest in sorted(sha.items())},
    }


def _init_distributed():
    """(rank, world size, torch.distributed, whether this call created the process group) of a
    merge started by a launcher (deepspeed, torchrun: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT in the environment). The ranks exchange only small objects, over gloo on any
    machine."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise MergeError("--distributed: no RANK / WORLD_SIZE in the environment; start the "
                         "merge with a launcher (deepspeed --module moe_merge.cli merge ...)")
    import datetime

    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), dist, created


def assign_shards(shards: list[list[str]], nbytes: dict[str, int], world: int) -> list[int]:
    """The rank that merges each output shard: largest shards first, each to the rank with the
    fewest bytes so far (deterministic, so every rank computes the same answer)."""
    sizes = [sum(nbytes[n] for n in names) for names in shards]
    load, owner = [0] * world, [0] * len(shards)
    for i in sorted(range(len(shards)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _merge_tensors(job: _Job, outs: list[OutTensor], writer, verify: bool,
                   allow_nonfinite: bool, bar) -> None:
    """Merge ``outs`` (of ``job``'s) in order and hand each to ``writer``.

    Inputs whose values lie in plain runs of their master partitions (the usual layouts) are
    added chunk by chunk straight from the files into a cache-sized float64 accumulator;
    others are first read (gathered) into a float32 staging buffer and added whole into a
    tensor-sized one. The float32 results go to the shard writer from two buffers used in turn
    (it holds at most one tensor). Two threads share each tensor's chunks (numpy and pread
    release the GIL)."""
    if not outs:
        return
    readers, chosen, w, source = job.readers, job.chosen, job.weights, job.source
    fmt, optimizer_state = job.output.fmt, job.output.optimizer_state
    f32 = np.dtype(np.float32)
    most = max(math.prod(o.shape) for o in outs)
    chunk_acc = np.empty(min(CHUNK, most), dtype=np.float64)
    chunk_acc2 = np.empty(min(CHUNK, most), dtype=np.float64)
    acc_buf = stage_buf = None
    out_bufs = [np.empty(0, f32), np.empty(0, f32)]
    # Read-ahead: the kernel is asked for the bytes of the next tensors (up to PREFETCH_BYTES
    # ahead) while this one is being added, so that reads from disk overlap the work.
    ahead = {}
    ahead_bytes = fetched = 0
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge")
    try:
        for k, o in enumerate(outs):
            n = math.prod(o.shape)
            while fetched < len(outs) and (fetched <= k or ahead_bytes < PREFETCH_BYTES):
                upcoming = [_out_segments(r, outs[fetched], source) for r in readers]
                ahead[fetched] = (upcoming, _prefetch(upcoming))
                ahead_bytes += ahead[fetched][1]
                fetched += 1
            segs, nbytes = ahead.pop(k)
            ahead_bytes -= nbytes
            direct = [(sg, wi, r.note_read if verify else None)
                      for sg, wi, r in zip(segs, w, readers) if sg is not None]
            gathered = [(r, wi) for sg, r, wi in zip(segs, readers, w) if sg is None]
            acc = chunk_acc
            if gathered:
                import torch

                if acc_buf is None:
                    acc_buf = np.empty(most, dtype=np.float64)
                    stage_buf = np.empty(most, dtype=np.float32)
                acc = acc_buf[:n]
                acc.fill(0.0)
                for r, wi in gathered:
                    _read_out(r, o, source, out=torch.from_numpy(stage_buf[:n]).view(o.shape))
                    axpy(acc, stage_buf[:n], wi, chunk_acc)
            if fmt != "deepspeed":
                if out_bufs[k % 2].size < n:
                    out_bufs[k % 2] = np.empty(most, dtype=f32)
                merged = out_bufs[k % 2][:n]
            else:
                merged = np.empty(n, dtype=f32)
            args = ([d[0] for d in direct], [d[1] for d in direct], [d[2] for d in direct],
                    merged)
            mid = -(-n // (2 * CHUNK)) * CHUNK  # the second half goes to a helper thread
            if mid >= n:
                total = _accumulate_chunked(acc, *args, zero=not gathered)
            else:
                other = helper.submit(_accumulate_chunked, chunk_acc2 if not gathered else acc,
                                      *args, zero=not gathered, span=(mid, n))
                total = _accumulate_chunked(acc, *args, zero=not gathered, span=(0, mid))
                total += other.result()
            if bar is not None:
                bar.update(n * 4 * len(readers))
            # A NaN or Inf in any input makes the weighted sum non-finite (0 * Inf is NaN), and
            # a float64 sum of float32 values cannot overflow: one cheap reduction.
            if not allow_nonfinite and not math.isfinite(total):
                _name_nonfinite(chosen, readers, o, source)
            merged = merged.reshape(o.shape)
            if fmt != "deepspeed":
                writer.add(o.name, merged)
                continue
            import torch

            moments = None
            if optimizer_state == "merged":
                moments = {state: torch.from_numpy(weighted_sum(
                    (r.read(o.name, state=state) for r in readers), w).reshape(o.shape)
                ).to(torch.float32) for state in ("exp_avg", "exp_avg_sq")}
            writer.write(o.name, torch.from_numpy(merged), moments)
    finally:
        helper.shutdown()


def hf_state(tag_dir: str | Path, hf_dir: str | Path, source: str = "master"
             ) -> dict:
    """One checkpoint tag as the HF model's state dict in memory (fp32, full logical tensors,
    HF names): what ``merge([tag])`` writes (hf output), without writing it. For studies that
    merge and evaluate many combinations of the same small checkpoints."""
    r = DSCheckpoint(tag_dir, verify=False)
    try:
        return {o.name: _read_out(r, o, source).reshape(o.shape).clone()
                for o in _hf_outs(r, Path(hf_dir))}
    finally:
        r.close()
