"""Load DeepSpeed checkpoint files without running code from them, and without torch.

A ``torch.save`` file is a zip archive: ``<archive>/data.pkl``, the pickled structure, and one
stored (uncompressed) record ``<archive>/data/<key>`` per tensor storage. :func:`load` runs the
structure through the restricted interpreter of :mod:`moe_merge.checkpoint.unpickle`: only the
globals in :data:`ALLOWED` are resolved (tensor rebuilds, storage types, ``OrderedDict``,
``torch.Size``, dtypes, and inert stand-ins for the three small DeepSpeed objects an optimizer
file holds), each called only with the arguments it is written for, and nothing the pickle
builds can change what was checked. Tensors become :class:`LazyTensor`: where their bytes lie
in the file. No tensor data is read here; a merge reads exactly the bytes it needs with
``pread``, and :meth:`LazyTensor.torch` materializes one tensor where torch is wanted.

Where a tensor's bytes lie is decided by the archive alone: the record its storage key names,
that record's offset and size from the zip directory and its local header. The pickle gives
only the key, the element offset, the shape and the strides, and those are checked against the
record (offsets >= 0, every element inside the record, no more elements than the storage
holds). Files are opened only if they are regular files (no FIFOs, devices or sockets) and, when
a root directory is given, only if their real path lies inside it.

Bounds (a checkpoint never needs more): ``data.pkl`` at most :data:`MAX_PICKLE_BYTES`, the
limits of :mod:`~moe_merge.checkpoint.unpickle` on what it builds, at most :data:`MAX_DIMS`
tensor dimensions.

``ALLOWED_GLOBALS`` is the same allowlist for ``torch.load(weights_only=True)``, for the one
place that maps files with torch to write into them (the DeepSpeed-format writer).
"""

from __future__ import annotations

import collections
import math
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_merge.checkpoint import unpickle
from moe_merge.checkpoint.unpickle import Global, StandIn
from moe_merge.errors import CheckpointError

MAX_PICKLE_BYTES = 64 << 20
MAX_DIMS = 32
MAX_SMALL_FILE = 16 << 20  # meta.json, latest and other small text files beside the tensors



class ZeroStage(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


class FragmentAddress(StandIn):
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address: ``start``, ``numel``."""

    start: int
    numel: int


class LossScaler(StandIn):
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler (state only)."""


ALLOWED_GLOBALS = [
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]

# torch storage type -> (dtype name, bytes per element)
STORAGES = {
    "FloatStorage": ("float32", 4), "DoubleStorage": ("float64", 8), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}


@dataclass(frozen=True, slots=True)
class Record:
    """One stored zip record of tensor bytes: ``nbytes`` from byte ``offset`` of ``path`` (the
    file's real path), all taken from the archive's directory and local header."""
    path: Path
    name: str
    offset: int
    nbytes: int
    crc: int
    dtype: str
    itemsize: int

    def check(self, byte: int, nbytes: int) -> None:
        """Refuse a read of ``nbytes`` at file byte ``byte`` that is not inside this record."""
        if nbytes < 0 or byte < self.offset or byte + nbytes > self.offset + self.nbytes:
            raise CheckpointError(f"{self.path}: a read of {nbytes} bytes at byte {byte} lies "
                                  f"outside record {self.name}")


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of storage that a strided tensor of this shape covers (0 when empty)."""
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0


class LazyTensor:
    """A tensor of a checkpoint file, not read: its record, element offset, shape and strides."""

    __slots__ = ("record", "storage_offset", "shape", "stride")

    def __init__(self, record: Record, storage_offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.record = record
        self.storage_offset = storage_offset
        self.shape = shape
        self.stride = stride

    @property
    def dtype(self) -> str:
        return self.record.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.record.itemsize

    def is_contiguous(self) -> bool:
        expect = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expect:
                return False
            expect *= size
        return True

    @property
    def file_offset(self) -> int:
        """Byte offset of the first element in the file."""
        return self.record.offset + self.storage_offset * self.record.itemsize

    def narrow(self, start: int, length: int) -> LazyTensor:
        """Elements ``start .. start + length`` of this contiguous tensor, flattened."""
        if not self.is_contiguous() or start < 0 or length < 0 or start + length > self.numel():
            raise IndexError(f"{self.record.path}: cannot take [{start}, {start + length}) of a "
                             f"tensor of shape {list(self.shape)}")
        return LazyTensor(self.record, self.storage_offset + start, (length,), (1,))

    def torch(self):
        """The tensor, read from the file into memory (imports torch)."""
        import torch

        dtype = getattr(torch, self.dtype)
        if self.numel() == 0:
            return torch.empty(self.shape, dtype=dtype)
        nbytes = _span(self.shape, self.stride) * self.record.itemsize
        self.record.check(self.file_offset, nbytes)
        raw = torch.empty(nbytes, dtype=torch.uint8)
        fd = open_regular(self.record.path)
        try:
            pread_exact(fd, memoryview(raw.numpy()), self.file_offset, self.record.path)
        finally:
            os.close(fd)
        return raw.view(dtype).as_strided(self.shape, self.stride)


def pread_exact(fd: int, buf: memoryview, offset: int, path: Path | str) -> None:
    """Fill ``buf`` from byte ``offset`` of the open file ``fd`` (``path``, for the error)."""
    done = 0
    while done < len(buf):
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{path}: truncated (no data at byte {offset + done})")
        done += k


# ---- files -------------------------------------------------------------------------------
def real_path(path: Path | str, root: Path | str | None = None) -> Path:
    """``path`` with every symlink resolved; with ``root``, refused unless it lies inside
    ``root``'s real path (a symlink must not lead a checkpoint out of its directory)."""
    path = Path(path)
    if root is None:
        return Path(os.path.realpath(path))
    top = Path(os.path.realpath(root))
    if path.parent == Path(root) and path.name not in ("", ".", ".."):
        try:  # the usual case, a plain entry of the root: one lstat instead of a realpath
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return top / path.name
        except OSError:
            pass  # resolved below; open() then says what is wrong
    real = Path(os.path.realpath(path))
    if real != top and top not in real.parents:
        raise CheckpointError(f"{path}: a symlink to {real}, outside {root}: refused")
    return real


def open_regular(path: Path | str, root: Path | str | None = None) -> int:
    """A read-only file descriptor of ``path``, only if it is a regular file (inside ``root``
    when given). FIFOs, devices and sockets are refused without blocking on them."""
    return _open(path, root)[0]


def _open(path: Path | str, root: Path | str | None = None) -> tuple[int, Path]:
    """:func:`open_regular`, and the real path it opened."""
    real = real_path(path, root)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device, socket or "
                                  "directory): refused")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def read_small(path: Path | str, root: Path | str | None = None,
               limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a small regular file (meta.json, latest, config.json), at most ``limit``."""
    fd = open_regular(path, root)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit} bytes; not a file a checkpoint "
                              "holds")
    return data


# ---- the allowlist -----------------------------------------------------------------------
def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise unpickle.Error(f"{what}: not a tuple of at most {MAX_DIMS} integers")
    if not all(type(v) is int and 0 <= v < 1 << 62 for v in values):
        raise unpickle.Error(f"{what}: not integers in [0, 2**62)")
    return tuple(values)


class StorageRef:
    """What a pickle's persistent id resolves to: one record, found by the archive."""

    __slots__ = ("record",)

    def __init__(self, record: Record):
        object.__setattr__(self, "record", record)

    def __setattr__(self, key, value):
        raise AttributeError("read-only")


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, StorageRef):
        raise unpickle.Error("tensor without a storage record")
    rec = storage.record
    shape, stride = _ints(size, "tensor shape"), _ints(stride, "tensor strides")
    if type(storage_offset) is not int or storage_offset < 0 or len(shape) != len(stride) \
            or any(s < 0 for s in shape) or any(s < 0 for s in stride):
        raise unpickle.Error(f"tensor with a negative offset, size or stride in {rec.name}")
    elements = rec.nbytes // rec.itemsize
    if math.prod(shape) > elements or (math.prod(shape)
                                       and storage_offset + _span(shape, stride) > elements):
        raise unpickle.Error(f"tensor of shape {list(shape)} at element {storage_offset} "
                             f"overruns its record {rec.name} ({elements} elements)")
    return LazyTensor(rec, storage_offset, shape, stride)


def _rebuild_parameter(data, *_):
    if not isinstance(data, LazyTensor):
        raise unpickle.Error("parameter without a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state):
    """A tensor pickled with its type and Python attributes: only the tensor is kept."""
    if not (isinstance(func, Global) and func.name == "torch._utils._rebuild_tensor_v2"
            and isinstance(new_type, Global) and isinstance(args, tuple)):
        raise unpickle.Error("_rebuild_from_type_v2 of something other than a tensor")
    return func.call(*args)


def _ordered_dict(items=()):
    if items:
        raise unpickle.Error("OrderedDict built from arguments")
    return collections.OrderedDict()


def _counter(items=None):
    if items is not None and not isinstance(items, dict):
        raise unpickle.Error("Counter of a non-dict")
    return collections.Counter(items or {})


def _size(values=()):
    return _ints(values, "torch.Size")


def _device(kind, index=None):
    if not isinstance(kind, str) or len(kind) > 32 or index is not None and type(index) is not int:
        raise unpickle.Error("torch.device of a non-string")
    return kind if index is None else f"{kind}:{index}"


def _encode(text, encoding="latin1"):  # protocol-2 pickles of bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise unpickle.Error("_codecs.encode of a non-string")
    return text.encode(encoding)


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise unpickle.Error("set of a non-list")
    return set(items)


def _bytearray(data=b"", encoding=None):
    """bytearray(b'...') or bytearray(str, 'latin-1'), never bytearray(n): as long as the
    pickle's own bytes, no longer."""
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin-1"))
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    raise unpickle.Error("bytearray of something other than bytes")


def _zero_stage(value):
    if type(value) is not int or not 0 <= value <= 3:
        raise unpickle.Error("ZeroStageEnum of something other than 0..3")
    return ZeroStage(value)


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): Global("collections.OrderedDict", _ordered_dict),
    ("collections", "Counter"): Global("collections.Counter", _counter),
    ("torch._utils", "_rebuild_tensor_v2"): Global("torch._utils._rebuild_tensor_v2",
                                                   _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): Global("torch._utils._rebuild_parameter",
                                                   _rebuild_parameter),
    ("torch.nn.parameter", "Parameter"): Global("torch.nn.parameter.Parameter",
                                                _rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): Global("torch._tensor._rebuild_from_type_v2",
                                                       _rebuild_from_type),
    ("torch", "Tensor"): Global("torch.Tensor"),
    ("torch", "Size"): Global("torch.Size", _size),
    ("torch", "device"): Global("torch.device", _device),
    ("_codecs", "encode"): Global("_codecs.encode", _encode),
    ("builtins", "set"): Global("builtins.set", _set),
    ("builtins", "bytearray"): Global("builtins.bytearray", _bytearray),
    **{("torch", name): Global(name) for name in STORAGES},  # storage types: only named
    **{("torch", dtype): dtype for dtype, _ in STORAGES.values()},  # dtypes: their names
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): Global(
        "deepspeed.runtime.zero.config.ZeroStageEnum", _zero_stage),
    ("deepspeed.utils.tensor_fragment", "fragment_address"): Global(
        "deepspeed.utils.tensor_fragment.fragment_address", new=FragmentAddress),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): Global(
        "deepspeed.runtime.fp16.loss_scaler.LossScaler", new=LossScaler),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): Global(
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", new=LossScaler),
}


# ---- the archive -------------------------------------------------------------------------
class _Archive:
    """A torch.save zip archive open for parsing: its records, found by the zip directory."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, size: int, prefix: str):
        self.path, self.zf, self.size, self.prefix = path, zf, size, prefix
        self.records: dict[str, Record] = {}

    def persistent_load(self, pid) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], Global) and pid[1].name in STORAGES
                and isinstance(pid[2], str) and len(pid[2]) <= 64
                and type(pid[4]) is int and pid[4] >= 0):
            raise unpickle.Error(f"unexpected persistent id {str(pid)[:80]}")
        dtype, itemsize = STORAGES[pid[1].name]
        key, numel = pid[2], pid[4]
        rec = self.records.get(key)
        if rec is None:
            rec = self._record(key, dtype, itemsize)
            self.records[key] = rec
        if rec.dtype != dtype or rec.nbytes != numel * itemsize:
            raise unpickle.Error(f"record {rec.name} holds {rec.nbytes} bytes, but a storage "
                                 f"of {numel} x {dtype} is declared for it")
        return StorageRef(rec)

    def _record(self, key: str, dtype: str, itemsize: int) -> Record:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise unpickle.Error(f"record {name} missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise unpickle.Error(f"record {name} is compressed or encrypted")
        offset = _data_offset(self.zf, info)
        if offset + info.file_size > self.size:
            raise unpickle.Error(f"record {name} runs past the end of the file")
        return Record(self.path, name, offset, info.file_size, info.CRC, dtype, itemsize)


def _data_offset(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored record's data starts: after its local header, name and extra field (the
    local header must name the same record as the directory)."""
    fp = zf.fp
    fp.seek(info.header_offset)
    head = fp.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise unpickle.Error(f"bad local header of record {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if fp.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800
                                                      else "cp437"):
        raise unpickle.Error(f"the local header of record {info.filename} names another file")
    return info.header_offset + 30 + name_len + extra_len


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load(path: Path | str, root: Path | str | None = None) -> dict[str, Any]:
    """One checkpoint file's structure, tensors as :class:`LazyTensor` (nothing read).
    ``root``: the directory the file must lie in (symlinks resolved)."""
    path = Path(path)
    fd, real = _open(path, root)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(4) != b"PK\x03\x04":  # what torch.load tests: else it unpickles byte 0
                raise CheckpointError(f"{path}: not a torch.save zip archive (it does not start "
                                      "with a zip record): refused")
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                names = [i.filename for i in infos]
                # the archive as torch's reader sees it: from byte 0 (no bytes before the first
                # record, which Python's zipfile would skip), named by its first entry, each
                # name once (readers disagree on which of two entries of one name is meant)
                if not infos or min(i.header_offset for i in infos) != 0 \
                        or len(set(names)) != len(names):
                    raise CheckpointError(f"{path}: a zip archive with bytes before its first "
                                          "record or a name twice: refused")
                prefix = names[0].split("/", 1)[0] + "/"
                pkls = [i for i in infos if i.filename == f"{prefix}data.pkl"]
                if len(pkls) != 1 or sum(n.endswith("/data.pkl") for n in names) != 1:
                    raise CheckpointError(f"{path}: not a torch.save file (no single "
                                          "<archive>/data.pkl record)")
                info = pkls[0]
                if info.file_size > MAX_PICKLE_BYTES or info.compress_size > size:
                    raise CheckpointError(f"{path}: data.pkl declares {info.file_size} bytes, "
                                          f"more than the {MAX_PICKLE_BYTES} a checkpoint needs")
                order = zf.NameToInfo.get(f"{prefix}byteorder")
                if order is not None and order.file_size <= 16 \
                        and zf.read(order).strip() not in (b"little", b""):
                    raise CheckpointError(f"{path}: tensors stored big-endian; not supported")
                with zf.open(info) as pf:
                    data = pf.read(MAX_PICKLE_BYTES + 1)
                if len(data) > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{path}: data.pkl is larger than "
                                          f"{MAX_PICKLE_BYTES} bytes")
                archive = _Archive(real, zf, size, prefix)
                obj = unpickle.loads(data, ALLOWED, archive.persistent_load)
    except CheckpointError:
        raise
    except unpickle.Error as e:
        first = _first_line(e)
        if "Unsupported global" in first:
            raise CheckpointError(f"{path}: refused, the file asks to run code or build objects "
                                  f"that a checkpoint does not need ({first})") from None
        raise CheckpointError(f"{path}: refused, not a checkpoint structure ({first})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
            TypeError,
            KeyError, IndexError, AttributeError, struct.error, RuntimeError,
            NotImplementedError, OverflowError, MemoryError, RecursionError, LookupError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file (holds a "
                              f"{type(obj).__name__}, not a dict)")
    return obj


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")  # the files of a tag that hold pickles


def check_file(path: Path | str, root: Path | str) -> None:
    """One entry of a checkpoint tag: a regular file inside ``root`` (symlinks resolved) and,
    if it holds a pickle (:data:`PICKLE_SUFFIXES`), one the restricted interpreter parses."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        load(path, root)
    else:
        os.close(open_regular(path, root))
