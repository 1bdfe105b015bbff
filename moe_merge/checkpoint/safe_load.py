"""Load DeepSpeed checkpoint files without running code from them, and without torch.

A ``torch.save`` file is a zip archive: ``<archive>/data.pkl``, the pickled structure, and one
stored (uncompressed) record ``<archive>/data/<key>`` per tensor storage. :func:`load` unpickles
the structure with a restricted unpickler: only the globals in :data:`ALLOWED` are resolved
(tensor rebuilds, storage types, ``OrderedDict``, ``torch.Size``, dtypes, and inert stand-ins for
the three small DeepSpeed objects an optimizer file holds), and any other global -- a pickle
asking to run code or to build an object a checkpoint does not need -- is refused before
anything is called. Tensors become :class:`LazyTensor`: where their bytes lie in the file. No
tensor data is read here; a merge reads exactly the bytes it needs with ``pread``, and
:meth:`LazyTensor.torch` materializes one tensor where torch is wanted.

``ALLOWED_GLOBALS`` is the same allowlist for ``torch.load(weights_only=True)``, for the one
place that maps files with torch to write into them (the DeepSpeed-format writer).
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged; the message is one line naming the file."""


class ZeroStage(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


class FragmentAddress:
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address: ``start``, ``numel``."""

    start: int
    numel: int


class LossScaler:
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


@dataclass(frozen=True)
class Record:
    """One stored zip record of tensor bytes: ``nbytes`` from byte ``offset`` of ``path``."""
    path: Path
    name: str
    offset: int
    nbytes: int
    crc: int
    dtype: str
    itemsize: int


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
        if not self.is_contiguous() or start < 0 or start + length > self.numel():
            raise IndexError(f"{self.record.path}: cannot take [{start}, {start + length}) of a "
                             f"tensor of shape {list(self.shape)}")
        return LazyTensor(self.record, self.storage_offset + start, (length,), (1,))

    def torch(self):
        """The tensor, read from the file into memory (imports torch)."""
        import torch

        dtype = getattr(torch, self.dtype)
        if self.numel() == 0:
            return torch.empty(self.shape, dtype=dtype)
        raw = torch.empty(_span(self.shape, self.stride) * self.record.itemsize, dtype=torch.uint8)
        with open(self.record.path, "rb") as f:
            pread_exact(f.fileno(), memoryview(raw.numpy()), self.file_offset, self.record.path)
        return raw.view(dtype).as_strided(self.shape, self.stride)


def pread_exact(fd: int, buf: memoryview, offset: int, path: Path | str) -> None:
    """Fill ``buf`` from byte ``offset`` of the open file ``fd`` (``path``, for the error)."""
    done = 0
    while done < len(buf):
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{path}: truncated (no data at byte {offset + done})")
        done += k


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, Record):
        raise pickle.UnpicklingError("tensor without a storage record")
    shape, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if (int(storage_offset) + _span(shape, stride)) * storage.itemsize > storage.nbytes:
        raise pickle.UnpicklingError(f"tensor of shape {list(shape)} overruns its record "
                                     f"{storage.name}")
    return LazyTensor(storage, int(storage_offset), shape, stride)


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, new_type, args, state):
    """A tensor pickled with its type and Python attributes: only the tensor is kept."""
    return func(*args)


class _StorageType(str):
    """A torch storage class named in a pickle: only its name is kept."""


def _encode(text: str, encoding: str = "latin1") -> bytes:  # protocol-2 pickles of bytes
    return text.encode(encoding)


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): "Tensor",
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "bytearray"): bytearray,
    **{("torch", name): _StorageType(name) for name in STORAGES},
    **{tuple(path.rsplit(".", 1)): cls for cls, path in ALLOWED_GLOBALS},
}
_DTYPE_NAMES = {dtype for dtype, _ in STORAGES.values()}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, path: Path, prefix: str):
        super().__init__(file)
        self._zf, self._path, self._prefix = zf, path, prefix
        self._records: dict[str, Record] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _DTYPE_NAMES:
            return name
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        key = str(pid[2])
        if key not in self._records:
            dtype, itemsize = STORAGES[pid[1]]
            name = f"{self._prefix}data/{key}"
            try:
                info = self._zf.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"record {name} missing") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise pickle.UnpicklingError(f"record {name} is compressed")
            if info.file_size < int(pid[4]) * itemsize:
                raise pickle.UnpicklingError(f"record {name} is shorter than its storage")
            self._records[key] = Record(self._path, name, _data_offset(self._zf, info),
                                        info.file_size, info.CRC, dtype, itemsize)
        return self._records[key]


def _data_offset(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored record's data starts: after its local header, name and extra field."""
    fp = zf.fp
    fp.seek(info.header_offset)
    head = fp.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise pickle.UnpicklingError(f"bad local header of record {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load(path: Path | str) -> dict[str, Any]:
    """One checkpoint file's structure, tensors as :class:`LazyTensor` (nothing read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise CheckpointError(f"{path}: not a torch.save file (no data.pkl record)")
            with zf.open(pkl) as f:
                obj = _Unpickler(f, zf, path, pkl[:-len("data.pkl")]).load()
            end = max((i.header_offset + 30 + len(i.filename) + i.file_size
                       for i in zf.infolist()), default=0)
            if end > size:
                raise CheckpointError(f"{path}: truncated or corrupted (records run past the "
                                      f"end of the file, {size} bytes)")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in first:
            raise CheckpointError(f"{path}: refused, the file asks to run code or build objects "
                                  f"that a checkpoint does not need ({first})") from None
        raise CheckpointError(f"{path}: truncated or corrupted ({first})") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, struct.error) as e:
        if isinstance(e, CheckpointError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file (holds a "
                              f"{type(obj).__name__}, not a dict)")
    return obj
