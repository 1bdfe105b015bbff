"""CRC-32 checks of the tensor records a reader takes values from.

Every stored zip record carries the CRC-32 of its bytes. A :class:`Verifier` checks each record
a reader reads once: whole (:meth:`Verifier.check`, in a background thread when asked), or, for
records whose ranges the caller reads itself and checksums on the way
(:meth:`Verifier.expect`, :meth:`Verifier.note`), by reading only the bytes between those
ranges and combining the CRCs (:meth:`Verifier.wait`). ``enabled=False`` is ``--no-verify``:
nothing is checked.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from moe_merge.checkpoint.safe_load import Record, open_regular, pread_exact
from moe_merge.errors import CheckpointError

try:  # Intel ISA-L's CRC-32: ~4x zlib's speed; same polynomial, same values
    from isal.isal_zlib import crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    crc32, _crc32_combine = zlib.crc32, None

_POOL: ThreadPoolExecutor | None = None

Ranges = list[tuple[int, int, int]]  # (byte, nbytes, crc) of ranges of one record already read


def crc_range(record: Record, start: int, nbytes: int, crc: int = 0,
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


def check_crc(record: Record, pieces: Ranges | None = None, root: Path | None = None) -> None:
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
                crc = crc_range(record, pos, byte - pos, crc, root)
            crc = _crc32_combine(crc, piece_crc, nbytes)
            pos = byte + nbytes
    crc = crc_range(record, pos, end - pos, crc, root)
    if crc != record.crc:
        raise CheckpointError(f"{record.path}: record {record.name} fails its CRC-32 check "
                              "(corrupted file)")


class Verifier:
    """Checks the CRC-32 of every record of files under ``root`` that values are read from,
    once per record. ``background``: whole-record checks run in a worker thread and
    :meth:`wait` raises the first failure."""

    def __init__(self, root: Path, enabled: bool = True, background: bool = False):
        self.root = root
        self.enabled = enabled
        self.background = background
        self._done: set[Record] = set()
        self._pending: list[Future] = []
        self._ranges: dict[Record, Ranges] = {}

    def check(self, record: Record) -> None:
        """Check ``record`` whole, unless it is checked already."""
        if not self.enabled or record in self._done:
            return
        self._done.add(record)
        self._ranges.pop(record, None)
        if not self.background:
            check_crc(record, None, self.root)
            return
        global _POOL
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32")
        self._pending.append(_POOL.submit(check_crc, record, None, self.root))

    def expect(self, record: Record) -> None:
        """The caller reads ranges of ``record`` itself and reports their CRCs with
        :meth:`note`; :meth:`wait` checks the record from those and the bytes between them."""
        if self.enabled and record not in self._done:
            self._ranges.setdefault(record, [])

    def note(self, record: Record, byte: int, nbytes: int, crc: int) -> None:
        """The caller read ``nbytes`` at ``byte`` of ``record``; their CRC-32 is ``crc``."""
        ranges = self._ranges.get(record)
        if ranges is not None:
            ranges.append((byte, nbytes, crc))  # list.append is atomic: callable from threads

    def wait(self) -> None:
        """Raise the first CRC failure of the records checked so far."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        ranges, self._ranges = self._ranges, {}
        for record, pieces in ranges.items():
            self._done.add(record)
            check_crc(record, pieces, self.root)
