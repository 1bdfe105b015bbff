"""Outputs that appear atomically: a temporary directory beside the target, renamed into place
only when complete; sharded safetensors written as the shards fill.

An output never touches its inputs: :func:`check_apart` refuses a target that is, contains or
lies inside an input directory (symlinks resolved on both sides), before anything is created.
A target that is a symlink is replaced as a link: ``--overwrite`` puts the new directory where
the link was and removes the link, never what it points to. Parent directories created for a
target are removed again when the output is not written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moe_merge.errors import MergeError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '512MiB' -> 512 * 2**20 (the convention of transformers)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise MergeError(f"--max-shard-size: cannot read {text!r} (use e.g. 2GB or 500MiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MergeError(f"--max-shard-size must be positive, got {text!r}")
    return size


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove temporary directories of earlier merges into ``target`` that were killed."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` without ``overwrite``, and one that is not a directory
    (a dangling symlink counts as existing)."""
    exists, is_dir = os.path.lexists(target), os.path.isdir(target)
    if exists and not overwrite:
        raise MergeError(f"{target}: output exists (pass --overwrite to replace it)")
    if exists and not is_dir:
        raise MergeError(f"{target}: exists and is not a directory")


def check_apart(target: Path | str, inputs: list[tuple[Path, bool]]) -> None:
    """Refuse an output ``target`` that overlaps an input directory: equal to one, containing
    one, or lying inside one (unless that input's flag says its inside may hold outputs, as a
    run directory's ``merged/`` does). Symlinks are resolved on both sides, so a target that is
    a link to an input is refused like the input itself."""
    target = Path(target)
    real = Path(os.path.realpath(target))
    for path, inside_ok in inputs:
        other = Path(os.path.realpath(path))
        if real == other:
            how = "is"
        elif real in other.parents:
            how = "contains"
        elif not inside_ok and other in real.parents:
            how = "lies inside"
        else:
            continue
        shown = f"{target}" + (f" ({real})" if Path(os.path.abspath(target)) != real else "")
        raise MergeError(f"--out {shown} {how} the input {path}: an output must not replace, "
                         "contain or lie inside its inputs (choose another --out)")


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return those created, outermost first.
    A directory that cannot be created is a one-line MergeError naming it."""
    missing = []
    p = parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if os.path.isdir(d) and not os.path.islink(d):
                continue  # made meanwhile by someone else: theirs, not ours to remove
            _remove_created(created)
            raise MergeError(f"{d}: exists and is not a directory") from None
        except OSError as e:
            _remove_created(created)
            raise MergeError(f"{d}: cannot create the output's directory "
                             f"({e.strerror or type(e).__name__})") from None
        created.append(d)
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the (still empty) directories :func:`_make_parents` created, innermost first."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break  # not empty: something else was put there meanwhile; keep it and its parents


class _Terminated(BaseException):
    pass


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``target``, on any failure
    (exception, Ctrl-C, SIGTERM) it is removed and ``target`` is untouched."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    created = _make_parents(target.parent)
    tmp = _tmp_name(target)
    try:
        clean_stale(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        _remove_created(created)
        raise MergeError(f"{target}: cannot create the output ({e.strerror or type(e).__name__})"
                         ) from None

    def on_term(signum, frame):  # turn SIGTERM into an exception so the cleanup below runs
        raise _Terminated()

    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    try:
        yield tmp
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            if os.path.islink(old):  # the link is replaced, never what it points to
                os.unlink(old)
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except _Terminated:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise SystemExit(143) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


@contextmanager
def atomic_file(target: Path | str) -> Iterator:
    """A binary file object whose contents appear at ``target`` whole, or not at all (written
    beside it, synced, then renamed over it)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plan_shards(specs: list[tuple[str, tuple[int, ...], object]],
                max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a tensor larger than
    that gets a shard of its own), as transformers' ``save_pretrained`` does. Each spec is
    ``(name, shape, dtype)``, the dtype a numpy or torch one (anything with ``itemsize``)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64"}


class ShardWriter:
    """Takes tensors in the planned order and streams each into its safetensors shard.

    Every shard's header is known from the plan (names, dtypes, shapes), so it is written when
    the shard's first tensor arrives and each tensor goes to disk as it is added, hashed
    (sha256) on the way: peak memory is one tensor, not one shard, and nothing is read back.
    The files are plain safetensors (8-byte header length, JSON header padded to 8 bytes,
    tensors back to back in header order), named like transformers' (``model.safetensors`` for
    a single shard, else ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``).
    """

    def __init__(self, out_dir: Path, shards: list[list[str]], metadata: dict[str, str],
                 specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 only: set[int] | None = None, index: bool = True):
        """``only``: the shards this writer writes (the others are another process's, in a
        distributed merge); ``index``: write ``model.safetensors.index.json``."""
        self.out_dir = Path(out_dir)
        self.metadata = metadata
        self.specs = specs
        n = len(shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.shards = shards
        self.shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self.only = set(range(n)) if only is None else set(only)
        self.index = index
        self.remaining = [len(names) if i in self.only else 0 for i, names in enumerate(shards)]
        self.next = [0] * n
        self.open: dict[int, tuple] = {}  # shard -> (file, sha256)
        self.sha256: dict[str, str] = {}
        self.total_size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        # Writing and hashing (both release the GIL) run in one background thread, so they
        # overlap the reading and averaging of the next tensor; at most one tensor in flight.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._last: Future | None = None

    def _header(self, i: int) -> bytes:
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in self.shards[i]:
            shape, dtype = self.specs[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def add(self, name: str, tensor: np.ndarray) -> None:
        i = self.shard_of[name]
        shape, dtype = self.specs[name]
        if (i not in self.only or self.shards[i][self.next[i]] != name
                or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype):
            raise RuntimeError(f"internal error: tensor {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype} out of the planned order or shape")
        self.next[i] += 1
        self.remaining[i] -= 1
        if self._last is not None:
            self._last.result()
        self._last = self._pool.submit(self._write, i, np.ascontiguousarray(tensor),
                                       self.remaining[i] == 0)

    def _write(self, i: int, tensor: np.ndarray, last: bool) -> None:
        if i not in self.open:
            f, h = open(self.out_dir / self.files[i], "wb"), hashlib.sha256()
            head = self._header(i)
            f.write(head)
            h.update(head)
            self.open[i] = (f, h)
        f, h = self.open[i]
        data = memoryview(tensor.reshape(-1)).cast("B")
        f.write(data)
        h.update(data)
        if last:
            f.close()
            self.sha256[self.files[i]] = h.hexdigest()
            del self.open[i]

    def finish(self) -> dict[str, str]:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        left = [n for n, i in self.shard_of.items() if self.remaining[i] > 0]
        if left:
            raise RuntimeError(f"internal error: tensor {left[0]} was never written")
        if len(self.files) > 1 and self.index:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.files[i] for n, i in self.shard_of.items()}}
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")
        return self.sha256
