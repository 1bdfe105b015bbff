"""A seeded mutation fuzzer of real checkpoint files: every mutated checkpoint must be refused
in one line or merge to exactly the clean output.

Corpus: the two newest tags of each given run (2-rank AutoEP runs of the test suite), copied
once into a work directory. Case ``K`` of seed ``S`` is decided by ``random.Random(f"{S}:{K}")``
alone, so any case replays by itself: it picks a run, one of its two tags and one file of that
tag, mutates the file (:func:`mutate`: bit and byte flips anywhere or inside ``data.pkl``,
truncation, splices from another file or the same one, zip header and directory fields, a
DEFLATE-compressed ``data.pkl``, and pickle opcode edits written back with a consistent zip,
among them calls of ``os.system`` and the like, BUILD / SETITEM on allowed objects and huge
constructions) in a fresh copy of the tag (the other files are hard links to the corpus), and
merges the two tags in-process: ``moe-merge merge TAG_A TAG_B --out OUT --format F --source S
--quiet``, ``F`` safetensors and hf (with ``--hf-config`` the run's ``hf/``) by turns, ``S``
master and module by turns where the run holds module weights (not ZeRO-3).

The oracle, for every case, accepts exactly one of

- ``refused``: exit 2, stderr exactly one line starting with ``moe-merge merge: error:`` that
  names an input (a path under the work directory or an input file's name), after at most the
  plan a merge prints before reading (:data:`PLAN`), and no ``OUT``;
- ``identical``: exit 0 and every output file (all but the manifest, which holds paths and
  times) equal, by sha256, to the clean merge's output of the same run, format and source;

and every case must also leave the inputs unchanged (the mutated file included), nothing
beside ``OUT`` or in the working directory, no file written by a payload (the pickles calling
``os.system`` and the like would create a marker file), no leaked file descriptor or thread,
stay within :data:`CASE_SECONDS` (SIGALRM) and :data:`CASE_RSS` (the case's peak RSS, measured
by resetting the process's high-water mark) and raise no ``MemoryError``. Anything else is a
failure, reported with its seed and case number.

The cases run in one worker process under ``RLIMIT_AS`` = :data:`ADDRESS_SPACE` (a clean merge
with torch imported maps about 0.8 GiB and keeps about 250 MB resident); the worker prints one
JSON line per case and a summary. After every failure, and every :data:`RECHECK_EVERY` cases,
the clean merges are repeated, so a case that changes the state of the process for the ones
after it (a poisoned class or cache) is found too. A case that times out or modifies an input
ends the worker, one that kills it (or stays silent for :data:`WATCHDOG` s) is recorded as
such; the parent starts a new worker at the next case.

    python tests/support/fuzzing.py --runs RUN... --seed 1 --cases 300   # a line per case, counts
    python tests/support/fuzzing.py --runs RUN... --seed 1 --case 17 --keep --work DIR  # replay

``--runs`` defaults to ``$MOE_MERGE_TEST_RUNS/moe_z2`` and ``moe_z3`` (the test suite's kept
runs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import gc
import hashlib
import io
import json
import os
import pickle
import pickletools
import queue
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASE_SECONDS = 5.0  # wall time of one case (SIGALRM)
CASE_RSS = 1 << 30  # peak resident memory of one case
ADDRESS_SPACE = 3 << 30  # RLIMIT_AS of the worker
WATCHDOG = 60.0  # the parent kills a worker that reports nothing for this long
RECHECK_EVERY = 50  # repeat the clean merges every this many cases
TAGS_PER_RUN = 2
FORMATS = ("safetensors", "hf")
SOURCES = ("master", "module")
# which file of a tag a case mutates: a group by weight, then a file of it (the 8 expert files
# of a tag are one group; a master-weight merge does not read them)
FILE_GROUPS = {"expert": 2, "optim": 4, "model_states": 3, ".json": 1}
MANIFEST = "merge_manifest.json"
PREFIX = "moe-merge merge: error: "
# The plan a merge prints on stderr before it reads anything (also with --quiet): allowed before
# the one error line of a checkpoint refused while it is read.
PLAN = re.compile(r"merging \d+ checkpoint\(s\) with \w+ -> |checkpoint +step +tokens +weight$|"
                  r"global_step\d+ +-?\d+ ")
OK = ("refused", "identical", "equivalent")


# ---- zip archives ------------------------------------------------------------------------
@dataclass
class ZipLayout:
    """Where the structures of a zip archive lie: (offset, name) of every local header and
    central directory record, the end records, the directory's offset."""

    local: list[tuple[int, str]]
    central: list[tuple[int, str]]
    eocd: int
    eocd64: int | None
    locator: int | None
    cd_offset: int


def zip_layout(data: bytes) -> ZipLayout | None:
    """The layout of ``data`` if it is a well-formed zip archive without a comment, else None."""
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0 or eocd + 22 != len(data):
        return None
    n_total, _, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    locator = eocd - 20 if data[eocd - 20:eocd - 16] == b"PK\x06\x07" else None
    eocd64 = None
    if locator is not None:
        eocd64 = struct.unpack_from("<Q", data, locator + 8)[0]
        if data[eocd64:eocd64 + 4] != b"PK\x06\x06":
            return None
        n_total, cd_offset = struct.unpack_from("<QxxxxxxxxQ", data, eocd64 + 32)
    central, local, pos = [], [], cd_offset
    for _ in range(n_total):
        if data[pos:pos + 4] != b"PK\x01\x02":
            return None
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        name = data[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
        central.append((pos, name))
        local.append((struct.unpack_from("<I", data, pos + 42)[0], name))
        pos += 46 + nlen + xlen + clen
    return ZipLayout(sorted(local), central, eocd, eocd64, locator, cd_offset)


def pickle_span(data: bytes) -> tuple[int, int, zipfile.ZipInfo] | None:
    """(start, end, info) of the ``<archive>/data.pkl`` bytes in ``data`` (stored or not)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    except (zipfile.BadZipFile, StopIteration, ValueError, struct.error, OSError):
        return None
    h = info.header_offset
    nlen, xlen = struct.unpack_from("<HH", data, h + 26)
    start = h + 30 + nlen + xlen
    return start, start + info.compress_size, info


def read_pickle(data: bytes) -> bytes | None:
    """The (uncompressed) ``data.pkl`` of a torch.save archive, or None."""
    span = pickle_span(data)
    if span is None:
        return None
    start, end, info = span
    raw = data[start:end]
    return zlib.decompress(raw, -15) if info.compress_type == zipfile.ZIP_DEFLATED else raw


def rewrite_pickle(data: bytes, new: bytes, deflate: bool = False) -> bytes:
    """``data`` (a torch.save archive) with ``data.pkl`` replaced by ``new`` and everything
    else consistent: CRC-32 and sizes in the local header, data descriptor and directory; the
    records after it shifted by a multiple of 64 bytes (the torch padding field of the
    pickle's local header absorbs the rest), so they stay aligned; every other byte kept.
    ``deflate``: store ``new`` DEFLATE-compressed."""
    lay = zip_layout(data)
    span = pickle_span(data)
    if lay is None or span is None:
        raise ValueError("not a zip archive with a data.pkl")
    start, end, info = span
    h = info.header_offset
    after = [o for o, _ in lay.local if o > h]
    nxt = after[0] if after else lay.cd_offset
    nlen = struct.unpack_from("<H", data, h + 26)[0]
    extra = data[h + 30 + nlen:start]
    if deflate:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = c.compress(new) + c.flush()
    else:
        payload = new
    crc = zlib.crc32(new)
    desc = bytearray(data[end:nxt])
    if desc[:4] == b"PK\x07\x08":
        wide = len(desc) >= 24
        struct.pack_into("<IQQ" if wide else "<III", desc, 4, crc, len(payload), len(new))
    head = bytearray(data[h:h + 30 + nlen])
    if deflate:
        struct.pack_into("<H", head, 8, zipfile.ZIP_DEFLATED)
    if any(struct.unpack_from("<III", head, 14)):  # sizes in the local header, not only after
        struct.pack_into("<III", head, 14, crc, len(payload), len(new))
    delta = len(head) + len(payload) + len(desc) + len(extra) - (nxt - h)
    if extra[:2] == b"FB" and struct.unpack_from("<H", extra, 2)[0] == len(extra) - 4:
        pad = (len(extra) - 4 - delta) % 64
        delta += pad - (len(extra) - 4)
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    struct.pack_into("<H", head, 28, len(extra))
    out = bytearray(data[:h] + head + extra + payload + desc + data[nxt:])
    def shift(pos: int) -> int:
        return pos + delta if pos >= nxt else pos

    for pos, name in lay.central:
        p = shift(pos)
        off = struct.unpack_from("<I", out, p + 42)[0]
        if off == 0xFFFFFFFF:
            raise ValueError("zip64 offsets: not supported")
        if off > h:
            struct.pack_into("<I", out, p + 42, off + delta)
        if name == info.filename:
            struct.pack_into("<III", out, p + 16, crc, len(payload), len(new))
            if deflate:
                struct.pack_into("<H", out, p + 10, zipfile.ZIP_DEFLATED)
    if lay.eocd64 is not None:
        p = shift(lay.eocd64)
        struct.pack_into("<Q", out, p + 48, struct.unpack_from("<Q", out, p + 48)[0] + delta)
        p = shift(lay.locator)
        struct.pack_into("<Q", out, p + 8, struct.unpack_from("<Q", out, p + 8)[0] + delta)
    p = shift(lay.eocd)
    if struct.unpack_from("<I", out, p + 16)[0] != 0xFFFFFFFF:
        struct.pack_into("<I", out, p + 16, struct.unpack_from("<I", out, p + 16)[0] + delta)
    return bytes(out)


# ---- pickle opcodes ----------------------------------------------------------------------
def ops_of(pkl: bytes) -> list[tuple[str, object, bytes]]:
    """(opcode name, argument, raw bytes) of every opcode of a pickle."""
    found = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in found[1:]] + [len(pkl)]
    return [(op.name, arg, pkl[pos:end]) for (op, arg, pos), end in zip(found, ends)]


def enc_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    return (b"\x8a" + bytes([len(raw)]) if len(raw) < 256
            else b"\x8b" + struct.pack("<i", len(raw))) + raw


def enc_str(s: str | bytes) -> bytes:
    raw = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def enc_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def storages(ops: list[tuple[str, object, bytes]]) -> list[tuple[str, str, int]]:
    """(storage type, record key, element count) of the persistent ids of a torch pickle."""
    out = []
    for i in range(len(ops) - 4):
        name, arg = ops[i][:2]
        if name == "GLOBAL" and str(arg).startswith("torch ") and str(arg).endswith("Storage") \
                and ops[i + 1][0] in ("BINUNICODE", "SHORT_BINUNICODE"):
            j = i + 2 + (ops[i + 2][0] in ("BINPUT", "LONG_BINPUT", "MEMOIZE"))
            num = next((ops[k][1] for k in range(j, min(j + 4, len(ops)))
                        if ops[k][0] in ("BININT", "BININT1", "BININT2", "LONG1")), None)
            if isinstance(num, int):
                out.append((str(arg).split(" ")[1], str(ops[i + 1][1]), num))
    return out


def payloads(marker: Path, ops: list[tuple[str, object, bytes]], rng: random.Random
             ) -> dict[str, bytes]:
    """Opcode sequences an attacker would insert: calls of dangerous globals (that would
    create ``marker``), writes into allowed objects (BUILD, SETITEM), huge constructions and
    lengths, deep nesting, and every opcode the torch pickles do not use."""
    cmd, code = f"touch {marker}", f"open({str(marker)!r}, 'w').close()"

    def call(module: str, name: str, *args: bytes) -> bytes:
        return enc_global(module, name) + b"(" + b"".join(args) + b"tR"

    stor = storages(ops)
    kind, key, numel = rng.choice(stor) if stor else ("FloatStorage", "0", 16)
    pid = (b"(" + enc_str("storage") + enc_global("torch", kind) + enc_str(key) + enc_str("cpu")
           + enc_int(numel) + b"tQ")
    retarget = b"}(" + enc_str("path") + enc_str("/etc/hostname") + enc_str("offset") \
        + enc_int(0) + enc_str("nbytes") + enc_int(0) + enc_str("crc") + enc_int(0) + b"ub"
    tensor = (enc_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + enc_int(0)
              + b"(" + enc_int(numel * 2) + b"t(" + enc_int(1) + b"t\x89" + enc_global(
                  "collections", "OrderedDict") + b")RtR")
    depth = rng.choice([100, 1000, 100_000])
    return {
        "os.system": call("os", "system", enc_str(cmd)),
        "posix.system": call("posix", "system", enc_str(cmd)),
        "builtins.eval": call("builtins", "eval", enc_str(code)),
        "builtins.exec": call("builtins", "exec", enc_str(code)),
        "subprocess.getoutput": call("subprocess", "getoutput", enc_str(cmd)),
        "builtins.__import__": call("builtins", "__import__", enc_str("os")),
        "builtins.getattr": call("builtins", "getattr", enc_global("torch._utils",
                                                                   "_rebuild_tensor_v2"),
                                 enc_str("__globals__")),
        "torch.load": call("torch", "load", enc_str("/etc/hostname")),
        "stack_global os.system": enc_str("os") + enc_str("system") + b"\x93(" + enc_str(cmd)
        + b"tR",
        "inst os.system": b"(" + enc_str(cmd) + b"ios\nsystem\n",
        "obj os.system": b"(" + enc_global("os", "system") + enc_str(cmd) + b"o",
        "newobj os.system": enc_global("os", "system") + b"(" + enc_str(cmd) + b"t\x81",
        "reduce allowed with junk": call("torch._utils", "_rebuild_tensor_v2", enc_str("x")),
        "persistent id": pid,
        "build on record": pid + retarget,
        "tensor past its record": tensor,
        "build on global": enc_global("torch._utils", "_rebuild_tensor_v2") + b"}(" + enc_str(
            "__defaults__") + b"(" + enc_int(1) + b"tub",
        "build on class": enc_global("deepspeed.utils.tensor_fragment", "fragment_address")
        + b"}(" + enc_str("start") + enc_int(5) + b"ub",
        "setitem on class": enc_global("collections", "OrderedDict") + enc_str("__init__")
        + b"Ns",
        "build slots": enc_global("collections", "OrderedDict") + b")R(N}t" + b"b",
        "bytearray(1.5e9)": call("builtins", "bytearray", enc_int(1_500_000_000)),
        "bytearray(-1)": call("builtins", "bytearray", enc_int(-1)),
        "set(huge list)": enc_global("builtins", "set") + b"(](" + b"N" * 10_000 + b"etR",
        "encode huge": call("_codecs", "encode", enc_str("A" * 100_000), enc_str("latin1")),
        "torch.Size huge": call("torch", "Size", b"(" + enc_int(2**62) + enc_int(2**62) + b"t"),
        "torch.device junk": call("torch", "device", enc_int(7)),
        "long string": enc_str("A" * rng.choice([1000, 1_000_000])),
        "long int": b"\x8b" + struct.pack("<i", 100_000) + b"\x7f" * 100_000,
        "LONG4 claims 2 GB": b"\x8b" + struct.pack("<i", 2**31 - 1),
        "BINUNICODE claims 4 GB": b"X" + struct.pack("<I", 0xFFFFFFF0),
        "BINBYTES8 claims 2**62": b"\x8e" + struct.pack("<Q", 2**62),
        "BINUNICODE8 claims 2**62": b"\x8d" + struct.pack("<Q", 2**62),
        "BYTEARRAY8 claims 2**40": b"\x96" + struct.pack("<Q", 2**40),
        "FRAME 2**40": b"\x95" + struct.pack("<Q", 2**40),
        "deep lists": b"]" * depth + b"a" * (depth - 1),
        "deep tuples": b"(" * depth + b"t" * depth,
        "deep dicts": (b"}" + enc_str("k")) * depth + b"s" * depth,
        "marks": b"(" * depth,
        "dups": b"N" + b"2" * depth,
        "memo far": b"N" + b"r" + struct.pack("<I", 2**31) + b"j" + struct.pack("<I", 2**31),
        "memo get missing": b"h\xff",
        "long memo get missing": b"j" + struct.pack("<I", 123456),
        "pop mark without mark": b"1",
        "stop": b".",
        "next buffer": b"\x97",
        "readonly buffer": b"N\x98",
        "ext1": b"\x82\x01",
        "ext4": b"\x84" + struct.pack("<I", 2**31),
        "persid text": b"Pabc\n",
        "binpersid junk": enc_str("x") + b"Q",
        "frozenset": b"(" + b"N" * 3 + b"\x91",
        "additems": b"\x8f(" + b"N" + b"\x90",
        "float text": b"F1e999\n",
        "int text": b"I" + b"9" * 5000 + b"\n",
        "long text": b"L" + b"9" * 5000 + b"L\n",
        "string text": b"S'abc'\n",
        "unicode text": b"Vab\\u00ff\n",
        "dict of mark": b"(" + enc_str("k") + b"d",
        "list of mark": b"(Nl",
        "setitems odd": b"}(" + b"N" * 3 + b"u",
        "append on dict": b"}Na",
        "build on int": enc_int(3) + b"}b",
        "reduce of none": b"N)R",
        "proto 5 midway": b"\x80\x05",
    }


VALUE_OPS = ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE",
             "SHORT_BINUNICODE", "NEWTRUE", "NEWFALSE", "NONE", "EMPTY_LIST", "EMPTY_DICT",
             "EMPTY_TUPLE")
OTHER_VALUES = {
    "None": b"N", "True": b"\x88", "False": b"\x89", "0": b"K\x00", "-1": b"J\xff\xff\xff\xff",
    "2**70": enc_int(2**70), "1.5": b"G" + struct.pack(">d", 1.5),
    "nan": b"G" + struct.pack(">d", float("nan")), "'x'": enc_str("x"), "''": enc_str(""),
    "[]": b"]", "{}": b"}", "()": b")", "[1, 2]": b"](K\x01K\x02e", "{'a': 1}": b"}" + enc_str(
        "a") + b"K\x01s", "(0, 0)": b"K\x00K\x00\x86", "OrderedDict()": enc_global(
        "collections", "OrderedDict") + b")R", "torch.Size([2])": enc_global("torch", "Size")
    + b"(](K\x02etR", "torch.float32": enc_global("torch", "float32"),
}


def mutate_pickle(rng: random.Random, pkl: bytes, marker: Path, strings: list[str]
                  ) -> tuple[bytes, str]:
    """One opcode-level mutation of ``pkl``: replace an opcode, duplicate or delete one with
    its argument, change an integer / float / string argument, or insert a payload."""
    ops = ops_of(pkl)
    raws = [raw for _, _, raw in ops]
    kind = rng.choices(["opcode", "dup", "del", "int", "float", "str", "type", "swap",
                        "insert"], [5, 4, 5, 10, 3, 8, 8, 4, 14])[0]
    values = [i for i, (n, _, _) in enumerate(ops) if n in VALUE_OPS]
    if kind == "type" and values:  # a value of another type: None, a string, a container...
        i = rng.choice(values)
        new = rng.choice(sorted(OTHER_VALUES))
        raws[i] = OTHER_VALUES[new]
        return b"".join(raws), f"pkl-type #{i} {ops[i][0]} {str(ops[i][1])[:30]!r} -> {new}"
    if kind == "swap" and len(values) > 1:  # two values trade places
        i, j = sorted(rng.sample(values, 2))
        raws[i], raws[j] = raws[j], raws[i]
        return b"".join(raws), (f"pkl-swap #{i} {str(ops[i][1])[:30]!r} <-> #{j} "
                                f"{str(ops[j][1])[:30]!r}")
    if kind == "int":
        values = ("BININT", "BININT1", "BININT2", "LONG1")  # shapes, offsets, sizes, ranks
        memo = ("BINGET", "BINPUT", "LONG_BINGET", "LONG_BINPUT", "PROTO")
        pick = values if rng.random() < 0.75 else memo
        idx = [i for i, (n, _, _) in enumerate(ops) if n in pick]
        if idx:
            i = rng.choice(idx)
            name, v = ops[i][:2]
            new = rng.choice([0, 1, -1, 2, 3, 7, 8, 255, 256, v + 1, v - 1, v * 2, -v, v // 2,
                              2**31 - 1, -2**31, 2**32, 2**63 - 1, 2**64, 10**12, 3 * 10**7,
                              20000, 1 << rng.randrange(80), rng.randrange(-2**40, 2**40)])
            if name in ("BINGET", "BINPUT", "LONG_BINGET", "LONG_BINPUT"):
                new = abs(new) % 2**32
                raws[i] = (b"h" if name.endswith("GET") else b"q") + bytes([new]) if new < 256 \
                    else (b"j" if name.endswith("GET") else b"r") + struct.pack("<I", new)
            elif name == "PROTO":
                raws[i] = b"\x80" + bytes([abs(new) % 256])
            else:
                raws[i] = enc_int(new)
            return b"".join(raws), f"pkl-int {name} #{i}: {v} -> {new}"
        kind = "insert"
    if kind == "float":
        idx = [i for i, (n, _, _) in enumerate(ops) if n == "BINFLOAT"]
        if idx:
            i = rng.choice(idx)
            new = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308,
                              5e-324, ops[i][1] * 2, -ops[i][1]])
            raws[i] = b"G" + struct.pack(">d", new)
            return b"".join(raws), f"pkl-float #{i}: {ops[i][1]} -> {new}"
        kind = "insert"
    if kind == "str":
        idx = [i for i, (n, _, _) in enumerate(ops)
               if n in ("BINUNICODE", "SHORT_BINUNICODE", "GLOBAL")]
        i = rng.choice(idx)
        name, old = ops[i][:2]
        if name == "GLOBAL":
            new = rng.choice(["os system", "builtins eval", "posix system", "builtins getattr",
                              "torch load", "numpy.core.multiarray _reconstruct",
                              "collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                              "torch._utils _rebuild_parameter", "torch FloatStorage",
                              "torch ByteStorage", "torch DoubleStorage", "torch HalfStorage",
                              "torch BoolStorage", "builtins bytearray", "builtins set",
                              "torch Size", "deepspeed.runtime.zero.config ZeroStageEnum",
                              "deepspeed.runtime.fp16.loss_scaler LossScaler",
                              "deepspeed.utils.tensor_fragment fragment_address", "torch",
                              "os\nsystem", " ", "torch._utils  _rebuild_tensor_v2"])
            raws[i] = b"c" + new.replace(" ", "\n", 1).encode() + b"\n"
        else:
            new = rng.choice([*rng.sample(strings, min(3, len(strings))), "", "0", "-1", "1e9",
                              "../../etc/passwd", "/etc/passwd", "/proc/self/environ",
                              "/dev/zero", "a\nb", "x" * 1000, str(old).upper(),
                              str(old) + "\x00", "nan", "cpu", "cuda:0", "storage"])
            raw = rng.choice([new.encode("utf-8"), b"\xff\xfe" + new.encode()]) \
                if rng.random() < 0.1 else new.encode("utf-8")
            raws[i] = enc_str(raw)
        return b"".join(raws), f"pkl-str {name} #{i}: {str(old)[:40]!r} -> {new[:40]!r}"
    if kind == "opcode":
        i = rng.randrange(len(ops))
        op = rng.choice(pickletools.opcodes)
        raws[i] = op.code.encode("latin-1") + raws[i][1:]
        return b"".join(raws), f"pkl-opcode #{i}: {ops[i][0]} -> {op.name}"
    if kind == "dup":
        i = rng.randrange(1, len(ops))
        raws.insert(i, raws[i])
        return b"".join(raws), f"pkl-dup #{i} {ops[i][0]}"
    if kind == "del":
        i = rng.randrange(len(ops))
        del raws[i]
        return b"".join(raws), f"pkl-del #{i} {ops[i][0]}"
    snippets = payloads(marker, ops, rng)
    name = rng.choice(sorted(snippets))
    i = rng.choice([len(ops) - 1, rng.randrange(1, len(ops))])
    pop = rng.random() < 0.5
    raws.insert(i, snippets[name] + (b"0" if pop else b""))
    return b"".join(raws), f"pkl-insert {name!r}{' +POP' if pop else ''} before #{i} {ops[i][0]}"


# ---- file mutations ----------------------------------------------------------------------
ZIP_FIELDS = {  # structure -> (field name, offset, struct format)
    "local": [("version", 4, "<H"), ("flags", 6, "<H"), ("method", 8, "<H"), ("crc", 14, "<I"),
              ("csize", 18, "<I"), ("usize", 22, "<I"), ("name_len", 26, "<H"),
              ("extra_len", 28, "<H")],
    "central": [("version", 6, "<H"), ("flags", 8, "<H"), ("method", 10, "<H"),
                ("crc", 16, "<I"), ("csize", 20, "<I"), ("usize", 24, "<I"),
                ("name_len", 28, "<H"), ("extra_len", 30, "<H"), ("comment_len", 32, "<H"),
                ("disk", 34, "<H"), ("offset", 42, "<I")],
    "eocd": [("disk", 4, "<H"), ("cd_disk", 6, "<H"), ("entries_disk", 8, "<H"),
             ("entries", 10, "<H"), ("cd_size", 12, "<I"), ("cd_offset", 16, "<I"),
             ("comment_len", 20, "<H")],
    "eocd64": [("size", 4, "<Q"), ("entries_disk", 24, "<Q"), ("entries", 32, "<Q"),
               ("cd_size", 40, "<Q"), ("cd_offset", 48, "<Q")],
    "locator": [("eocd64_offset", 8, "<Q"), ("disks", 16, "<I")],
}


def mutate_zip(rng: random.Random, data: bytes) -> tuple[bytes, str] | None:
    """One field of a local header, directory record or end record set to an edge value."""
    lay = zip_layout(data)
    if lay is None:
        return None
    where = rng.choice(["local", "local", "central", "central", "eocd", "eocd64", "locator"])
    if where in ("local", "central"):
        pos, name = rng.choice(getattr(lay, where))
        if rng.random() < 0.4:  # the pickle's, most of the time
            pos, name = next((p, n) for p, n in getattr(lay, where) if n.endswith("data.pkl"))
    else:
        pos, name = getattr(lay, where), where
        if pos is None:
            return None
    field_name, off, fmt = rng.choice(ZIP_FIELDS[where])
    (old,) = struct.unpack_from(fmt, data, pos + off)
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    if field_name == "flags":
        new = old ^ rng.choice([0x1, 0x8, 0x40, 0x800, 0x2000, 0x1 | 0x40])
    elif field_name == "method":
        new = rng.choice([1, 8, 9, 12, 14, 93, 95, 99, 0xFFFF])
    else:
        new = rng.choice([0, 1, top, top - 1, old + 1, old - 1, old * 2, old // 2, old + 64,
                          len(data), rng.randrange(top + 1)]) % (top + 1)
    out = bytearray(data)
    struct.pack_into(fmt, out, pos + off, new)
    return bytes(out), f"zip {where} {name} {field_name}: {old} -> {new}"


def _range(rng: random.Random, n: int) -> tuple[int, int]:
    length = min(n, int(rng.expovariate(1 / 64)) + 1 if rng.random() < 0.8
                 else rng.randrange(1, max(2, n // 2)))
    start = rng.randrange(0, max(1, n - length + 1))
    return start, length


def mutate_bytes(rng: random.Random, data: bytes, other: bytes, kind: str
                 ) -> tuple[bytes, str]:
    out = bytearray(data)
    if kind == "flip-pkl":
        span = pickle_span(data)
        lo, hi = (span[0], span[1]) if span else (0, len(data))
    else:
        lo, hi = 0, len(data)
    if kind in ("flip-bits", "flip-pkl"):
        where = []
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            p = rng.randrange(lo, max(lo + 1, hi))
            if p < len(out):
                b = rng.randrange(8)
                out[p] ^= 1 << b
                where.append(f"{p}.{b}")
        return bytes(out), f"{kind} {' '.join(where)}"
    if kind == "flip-bytes":
        where = []
        for _ in range(rng.choice([1, 2, 4])):
            p = rng.randrange(len(out))
            out[p] = rng.choice([0, 0xFF, rng.randrange(256)])
            where.append(f"{p}={out[p]}")
        return bytes(out), f"flip-bytes {' '.join(where)}"
    if kind == "truncate":
        at = rng.choice([rng.randrange(len(data)), len(data) - rng.randrange(1, 200),
                         rng.randrange(min(len(data), 4096))])
        at = max(0, at)
        return bytes(out[:at]), f"truncate at {at} of {len(data)}"
    src = other if rng.random() < 0.5 else data
    s, n = _range(rng, len(src))
    chunk = src[s:s + n]
    which = "other" if src is other else "self"
    if kind == "splice-over":
        p = rng.randrange(len(out))
        out[p:p + len(chunk)] = chunk
        return bytes(out[:len(data)]), f"splice-over {which}[{s}:{s + n}] at {p}"
    if kind == "splice-insert":
        p = rng.randrange(len(out) + 1)
        out[p:p] = chunk
        return bytes(out), f"splice-insert {which}[{s}:{s + n}] at {p}"
    p, n = _range(rng, len(data))
    del out[p:p + n]
    return bytes(out), f"splice-delete [{p}:{p + n}]"


def mutate_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = {}
    keys = sorted(obj) if isinstance(obj, dict) else []
    key = rng.choice([*keys, "step", "step", "tokens", "extra"])
    value = rng.choice([-1, 0, 7, 8, 9, "8", "junk", None, [], {}, True, 1e308, 10**30,
                        999999999999, 2.5, float("nan"), "global_step8"])
    if rng.random() < 0.15:
        obj = [obj] if rng.random() < 0.5 else "text"
        what = f"json top-level -> {type(obj).__name__}"
    elif rng.random() < 0.15 and key in keys:
        del obj[key]
        what = f"json del {key}"
    else:
        obj[key] = value
        what = f"json {key} = {value!r}"
    return json.dumps(obj).encode(), what


BYTE_KINDS = {"flip-bits": 8, "flip-bytes": 6, "flip-pkl": 8, "truncate": 8, "splice-over": 5,
              "splice-insert": 4, "splice-delete": 4}
MUTATORS = {**BYTE_KINDS, "zip-field": 12, "zip-deflate": 2, "pickle": 54}
JSON_MUTATORS = {"flip-bits": 2, "flip-bytes": 2, "truncate": 2, "splice-over": 1, "json": 5}


def mutate(rng: random.Random, data: bytes, other: bytes, marker: Path, is_json: bool
           ) -> tuple[bytes, str]:
    """One seeded mutation of a checkpoint file's bytes; returns the bytes and what was done."""
    table = JSON_MUTATORS if is_json else MUTATORS
    kind = rng.choices(list(table), list(table.values()))[0]
    if kind == "json":
        return mutate_json(rng, data)
    if kind == "zip-field":
        done = mutate_zip(rng, data)
        if done is not None:
            return done
        kind = "flip-bits"
    if kind in ("zip-deflate", "pickle"):
        pkl = read_pickle(data)
        if pkl is not None:
            if kind == "zip-deflate":
                return rewrite_pickle(data, pkl, deflate=True), "zip-deflate data.pkl"
            strings = sorted({str(a) for n, a, _ in ops_of(pkl) if n == "BINUNICODE"})
            new, what = mutate_pickle(rng, pkl, marker, strings)
            return rewrite_pickle(data, new), what
        kind = "flip-bits"
    return mutate_bytes(rng, data, other, kind)


# ---- the corpus and the cases ------------------------------------------------------------
def newest_tags(run: Path, n: int = TAGS_PER_RUN) -> list[Path]:
    tags = [p for p in (run / "checkpoints").iterdir()
            if re.fullmatch(r"global_step\d+", p.name) and p.is_dir()]
    return sorted(tags, key=lambda p: int(p.name[len("global_step"):]))[-n:]


def prepare(runs: list[Path], work: Path) -> None:
    """Copy the newest tags and the hf/ directory of each run into ``work/corpus``."""
    shutil.rmtree(work / "corpus", ignore_errors=True)
    for run in runs:
        dst = work / "corpus" / run.name
        for tag in newest_tags(run):
            shutil.copytree(tag, dst / "checkpoints" / tag.name)
        shutil.copytree(run / "hf", dst / "hf")


@dataclass
class Case:
    seed: int
    case: int
    kind: str  # the run's name
    fmt: str
    source: str
    file: str  # tag/file, relative to the run's checkpoints/
    mutation: str
    data: bytes = field(repr=False)


def make_case(work: Path, seed: int, case: int) -> Case:
    """Case ``case`` of ``seed``: decided by ``random.Random(f"{seed}:{case}")`` alone."""
    rng = random.Random(f"{seed}:{case}")
    corpus = work / "corpus"
    kind = rng.choice(sorted(p.name for p in corpus.iterdir()))
    tags = sorted((corpus / kind / "checkpoints").iterdir(), key=lambda p: p.name)
    tag = rng.choice(tags)
    groups = collections.defaultdict(list)
    for p in sorted(tag.iterdir()):
        groups[next(g for g in FILE_GROUPS if g in p.name)].append(p)
    group = rng.choices(list(groups), [FILE_GROUPS[g] for g in groups])[0]
    path = rng.choice(groups[group])
    all_files = sorted(p for p in corpus.glob("*/checkpoints/*/*"))
    other = rng.choice(all_files).read_bytes()
    data, what = mutate(rng, path.read_bytes(), other, work / "marker",
                        path.suffix == ".json")
    return Case(seed, case, kind, FORMATS[case % 2], source(kind, case),
                f"{tag.name}/{path.name}", what, data)


def source(kind: str, case: int) -> str:
    """--source of a case: master and module by turns where the run holds full module weights
    (ZeRO-3 runs do not)."""
    return "master" if kind.endswith("z3") or case // 2 % 2 == 0 else "module"


def snapshot(*dirs: Path) -> dict[str, tuple]:
    """Every entry under ``dirs``: (inode, size, mtime) of files, the names in directories."""
    out = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            out[root] = tuple(sorted(subdirs + files))
            for f in files:
                st = os.lstat(os.path.join(root, f))
                out[os.path.join(root, f)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def digest(out: Path) -> dict[str, str]:
    """sha256 of every output file but the manifest."""
    res = {}
    for root, _, files in os.walk(out):
        for f in files:
            p = Path(root) / f
            if f != MANIFEST:
                res[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


class CaseTimeout(BaseException):
    """Raised by SIGALRM in a case that takes longer than :data:`CASE_SECONDS`."""


def _alarm(signum, frame):
    raise CaseTimeout()


class Capture:
    """Redirect ``sys.stdout`` / ``sys.stderr`` and file descriptors 1 and 2 (what C code
    writes) into temporary files while a case runs."""

    def __init__(self):
        self.files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}  # noqa: SIM115
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.streams = {fd: io.TextIOWrapper(os.fdopen(f.fileno(), "wb", closefd=False),
                                             write_through=True, encoding="utf-8",
                                             errors="strict" if fd == 1 else "backslashreplace")
                        for fd, f in self.files.items()}
        self.old = (sys.stdout, sys.stderr)

    def __enter__(self):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, f in self.files.items():
            f.seek(0)
            f.truncate()
            os.dup2(f.fileno(), fd)
        self.old = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self.streams[1], self.streams[2]
        return self

    def __exit__(self, *exc):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # an unencodable message: still restore
                stream.flush()
        sys.stdout, sys.stderr = self.old
        for fd in (1, 2):
            os.dup2(self.saved[fd], fd)

    def text(self, fd: int) -> str:
        f = self.files[fd]
        f.seek(0)
        return f.read().decode("utf-8", "replace")


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) << 10 if m else None
    except OSError:
        return None


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _open_files() -> list[str]:
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out[3:]


class Worker:
    """Runs cases in this process: the case trees (hard links to the corpus), the clean
    merges' digests, and the oracle. The process must have run :func:`process_setup` on it
    (its working directory, the SIGALRM handler, the warning filters)."""

    def __init__(self, work: Path, keep: bool = False, case_main=None):
        from moe_merge.cli import main

        self.main, self.work, self.keep = main, work, keep
        self.case_main = case_main  # a stand-in for main in the cases (the harness's tests)
        self.corpus, self.cases = work / "corpus", work / "case"
        self.out_parent, self.cwd, self.marker = work / "out", work / "cwd", work / "marker"
        shutil.rmtree(self.out_parent, ignore_errors=True)
        self.out_parent.mkdir(parents=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.kinds = sorted(p.name for p in self.corpus.iterdir())
        for kind in self.kinds:
            self.link_tree(kind)
        self.capture = Capture()
        self.combos = sorted({(k, f, source(k, i)) for k in self.kinds for f in FORMATS
                              for i in range(4)})
        # computed by the first worker of a run; a later one repeats two clean merges (which
        # also starts what a merge keeps for the process, such as the CRC-32 thread, before
        # the baselines below), and all of them if the code changed meanwhile
        cache = work / "reference.json"
        self.reference = {tuple(k.split("/")): v for k, v in json.loads(
            cache.read_text()).items()} if cache.is_file() else {}
        warm = [c for c in self.combos if c[0] == self.kinds[0]][:2]
        if not self.reference or any(self.clean(*c) != self.reference.get(c) for c in warm):
            self.reference = {c: self.clean(*c, keep=True) for c in self.combos}
            cache.write_text(json.dumps({"/".join(k): v for k, v in self.reference.items()}))
        gc.collect()
        self.threads, self.nfds = threading.active_count(), _fds()

    def link_tree(self, kind: str) -> None:
        dst = self.cases / kind
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.corpus / kind / "checkpoints", dst / "checkpoints",
                        copy_function=os.link)

    def argv(self, kind: str, fmt: str, src: str, out: Path) -> list[str]:
        tags = sorted((self.cases / kind / "checkpoints").iterdir(), key=lambda p: p.name)
        argv = ["merge", *map(str, tags), "--out", str(out), "--format", fmt, "--source", src,
                "--quiet"]
        return [*argv, "--hf-config", str(self.corpus / kind / "hf")] if fmt == "hf" else argv

    def clean(self, kind: str, fmt: str, src: str, keep: bool = False) -> dict[str, str]:
        """The digest of the clean merge; ``keep``: its output becomes the reference one."""
        out = self.out_parent / "o"
        with self.capture:
            rc = self.main(self.argv(kind, fmt, src, out))
        if rc != 0:
            raise RuntimeError(f"the clean merge of {kind} ({fmt}, {src}) failed: "
                               f"{self.capture.text(2)}")
        res = digest(out)
        if keep:
            ref = self.work / "ref" / f"{kind}_{fmt}_{src}"
            shutil.rmtree(ref, ignore_errors=True)
            ref.parent.mkdir(exist_ok=True)
            os.replace(out, ref)
        else:
            shutil.rmtree(out)
        return res

    def differences(self, out: Path, c: Case) -> str:
        """How an output differs from the clean one: the files, and for safetensors files
        whether the tensors differ or only the bytes (order, header)."""
        from safetensors.numpy import load_file

        ref = self.work / "ref" / f"{c.kind}_{c.fmt}_{c.source}"
        want, got = self.reference[(c.kind, c.fmt, c.source)], digest(out)
        notes = [f"files {sorted(set(want) ^ set(got))}"] if set(want) != set(got) else []
        for name in sorted(set(want) & set(got)):
            if want[name] == got[name]:
                continue
            if not name.endswith(".safetensors") or not (ref / name).is_file():
                notes.append(f"{name} differs")
                continue
            try:
                a, b = load_file(ref / name), load_file(out / name)
            except Exception as e:  # noqa: BLE001 - an unreadable output is a difference
                notes.append(f"{name} unreadable ({type(e).__name__}: {str(e)[:80]})")
                continue
            bad = sorted(set(a) ^ set(b)) + [k for k in a if k in b and (
                a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes()
                != b[k].tobytes())]
            notes.append(f"{name}: tensors {bad[:4]} differ ({len(bad)})" if bad else
                         f"{name}: the same tensors, other bytes (order or header)")
        return "; ".join(notes)

    @staticmethod
    def equivalent(detail: str) -> bool:
        """Whether :meth:`differences` found the same tensors in every differing file (only
        their order in the file, or the header, changed): e.g. a renamed entry of the module
        dict, which only orders the output."""
        notes = detail.split("; ")
        return bool(notes) and all(n.endswith("the same tensors, other bytes (order or header)")
                                   for n in notes)

    def recheck(self) -> list[str]:
        """The (run, format) pairs whose clean merge no longer gives the reference output."""
        return ["/".join(c) for c in self.combos if self.clean(*c) != self.reference[c]]

    def names_input(self, line: str) -> bool:
        if str(self.work) in line or str(self.work.resolve()) in line:
            return True
        names = {p.name for p in self.corpus.glob("*/checkpoints/*/*")}
        return any(n in line for n in names)

    def run(self, c: Case) -> dict:
        target = self.cases / c.kind / "checkpoints" / c.file
        target.unlink()
        target.write_bytes(c.data)
        out = self.out_parent / "o"
        before = snapshot(self.cases / c.kind, self.corpus / c.kind)
        hwm = _hwm_reset()
        rec = {"seed": c.seed, "case": c.case, "run": c.kind, "fmt": c.fmt,
               "source": c.source, "file": c.file, "mutation": c.mutation}
        fails, detail, rc = [], "", None
        t0 = time.perf_counter()
        with self.capture:
            try:
                signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
                try:
                    rc = (self.case_main or self.main)(self.argv(c.kind, c.fmt, c.source, out))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except CaseTimeout:
                fails.append("timeout")
                detail = _tb_tail()
            except MemoryError:
                fails.append("MemoryError")
                detail = _tb_tail()
            except BaseException as e:  # noqa: BLE001 - the oracle: nothing may escape
                fails.append(f"traceback:{type(e).__name__}")
                detail = _tb_tail()
        rec["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        peak = _hwm() if hwm else None
        rec["rss_mb"] = None if peak is None else round(peak / 2**20, 1)
        err = self.capture.text(2)
        if rc == 2:
            lines = err.splitlines()
            while lines and PLAN.match(lines[0]):
                del lines[0]
            if len(lines) != 1 or not err.endswith("\n") or not lines[0].startswith(PREFIX):
                fails.append("message:not-one-line")
            elif not self.names_input(lines[0]):
                fails.append("message:names-no-input")
            elif "MemoryError" in lines[0]:
                fails.append("MemoryError")
            if out.exists():
                fails.append("output-left")
            detail = err.strip()[-600:] if fails else (lines[-1] if lines else "")
            outcome = "refused"
        elif rc == 0:
            outcome = "identical"
            if not out.is_dir():
                fails.append("different-output")
                detail = "no output"
            elif digest(out) != self.reference[(c.kind, c.fmt, c.source)]:
                detail = self.differences(out, c)
                if self.equivalent(detail):
                    outcome = "equivalent"  # the same model, its tensors in another order
                else:
                    fails.append("different-output")
        elif rc is not None:
            fails.append(f"rc:{rc}")
            detail = err.strip()[-600:]
        leftover = sorted(set(os.listdir(self.out_parent)) - {"o"}) + os.listdir(self.cwd)
        if leftover:
            fails.append("leftover")
            detail += f" | leftover: {leftover}"
        if self.marker.exists():
            fails.append("code-executed")
            self.marker.unlink()
        changed = [k for k, v in snapshot(self.cases / c.kind, self.corpus / c.kind).items()
                   if before.get(k) != v]
        changed += [k for k in before if not os.path.lexists(k)]
        if target.is_file() and target.read_bytes() != c.data:
            changed.append(str(target))
        if changed:
            fails.append("input-modified")
            detail += f" | changed: {sorted(set(changed))[:5]}"
        if threading.active_count() > self.threads or _fds() > self.nfds:
            gc.collect()  # pools and files held only by a reference cycle (a traceback)
        for _ in range(100):  # threads still running 1 s after the merge returned
            if threading.active_count() <= self.threads:
                break
            time.sleep(0.01)
        else:
            fails.append("thread-leak")
            detail += f" | threads: {[t.name for t in threading.enumerate()]}"
            self.threads = threading.active_count()
        if _fds() > self.nfds:
            gc.collect()  # the threads' last references gone only now
        if _fds() > self.nfds:
            fails.append("fd-leak")
            detail += f" | open: {_open_files()}"
            self.nfds = _fds()
        if peak is not None and peak > CASE_RSS:
            fails.append("memory-peak")
        rec["outcome"] = f"fail:{'+'.join(dict.fromkeys(fails))}" if fails else outcome
        rec["detail"] = detail
        if not self.keep:
            for d in (self.out_parent, self.cwd):  # one case's leftovers fail only that case
                for name in os.listdir(d):
                    shutil.rmtree(d / name, ignore_errors=True)
                    if os.path.lexists(d / name):
                        os.unlink(d / name)
            if changed:
                self.link_tree(c.kind)
            else:
                target.unlink(missing_ok=True)
                os.link(self.corpus / c.kind / "checkpoints" / c.file, target)
        return rec


def _tb_tail() -> str:
    """The deepest frame in moe_merge, the last frame and the exception, one line each."""
    etype, e, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "moe_merge" in f.filename and "/tests/" not in f.filename]
    picked = ([ours[-1]] if ours else []) + ([frames[-1]] if frames and (
        not ours or frames[-1] is not ours[-1]) else [])
    lines = [f"at {_where(f)}: {f.line}" for f in picked]
    return "\n".join([*lines, f"{etype.__name__}: {str(e)[:300]}"])


def _where(f: traceback.FrameSummary) -> str:
    path = Path(f.filename)
    rel = path.relative_to(REPO) if REPO in path.parents else path.name
    return f"{rel}:{f.lineno} in {f.name}"


def process_setup(work: Path) -> None:
    """What a worker process sets once: its working directory (checked for leftovers), the
    SIGALRM handler of the time limit, warnings shown every time (so each case prints the
    same whatever ran before it)."""
    cwd = work / "cwd"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    os.chdir(cwd)
    signal.signal(signal.SIGALRM, _alarm)
    warnings.simplefilter("always")
    warnings.simplefilter("ignore", ResourceWarning)  # leaked files are counted instead


CURRENT_CASE = -1  # the case being run (read by the harness's tests)


def worker_main(work: Path, seed: int, start: int, stop: int, keep: bool,
                case_main: str | None = None) -> int:
    """The worker: cases ``start .. stop - 1``, one JSON line each on stdout, then a summary.
    The clean merges are repeated after every failure; exit 3 after a case that may have left
    the process or the corpus unusable (a timeout, a modified input)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401 - a case that needs torch first is not charged its import
    except ImportError:
        pass
    process_setup(work)
    stub = None
    if case_main:
        import importlib

        mod, _, name = case_main.partition(":")
        stub = getattr(importlib.import_module(mod), name)
    faulthandler.enable(os.fdopen(os.dup(2), "w"))  # a crash's traceback, to the parent
    w = Worker(work, keep, stub)
    setup = time.perf_counter() - t0
    print(json.dumps({"ready": True, "setup_s": round(setup, 2)}), file=proto)
    counts: collections.Counter = collections.Counter()
    global CURRENT_CASE
    for k in range(start, stop):
        CURRENT_CASE = k
        try:
            c = make_case(work, seed, k)
        except Exception as e:  # noqa: BLE001 - a mutator bug: reported like a failure
            rec = {"seed": seed, "case": k, "outcome": "fail:harness", "mutation": "?",
                   "detail": f"{type(e).__name__}: {e}", "ms": 0}
        else:
            try:
                rec = w.run(c)
            except Exception as e:  # noqa: BLE001 - a bug of the oracle: reported, go on
                rec = {"seed": seed, "case": k, "run": c.kind, "outcome": "fail:harness",
                       "mutation": c.mutation, "ms": 0, "detail": f"{type(e).__name__}: {e}"}
                w.link_tree(c.kind)
        counts[rec["outcome"]] += 1
        print(json.dumps(rec), file=proto)
        if keep and "run" in rec:
            print(json.dumps({"kept": str(w.cases / rec["run"])}), file=proto)
        fatal = any(f in rec["outcome"] for f in ("timeout", "input-modified"))
        if (k + 1 - start) % RECHECK_EVERY == 0 or k == stop - 1 or fatal \
                or rec["outcome"] not in OK:
            bad = w.recheck()
            if bad:
                print(json.dumps({"seed": seed, "case": k, "outcome": "fail:poisoned",
                                  "mutation": f"cases up to {k}", "ms": 0,
                                  "detail": f"clean merges now differ: {bad}"}), file=proto)
                proto.flush()
                os._exit(3)
        if fatal:
            proto.flush()
            os._exit(3)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"summary": True, "counts": dict(counts), "setup_s": round(setup, 2),
                      "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}), file=proto)
    return 0


# ---- the parent --------------------------------------------------------------------------
@dataclass
class Result:
    seed: int
    records: list[dict]
    seconds: float
    peak_rss_mb: float
    workers: int
    replay: str  # the command that replays case {case}

    @property
    def counts(self) -> collections.Counter:
        return collections.Counter(r["outcome"] for r in self.records)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if r["outcome"] not in OK]

    def report(self) -> str:
        """The outcome counts, then the failures grouped by cause (each with a replay)."""
        head = (f"fuzz seed {self.seed}: {len(self.records)} cases in {self.seconds:.1f} s, "
                f"{self.workers} worker(s), peak RSS {self.peak_rss_mb:.0f} MB")
        lines = [head]
        lines += [f"  {n:5d}  {o}" for o, n in sorted(self.counts.items())]
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        for r in self.failures:
            groups[(r["outcome"], _cause(r.get("detail", "")))].append(r)
        for (outcome, cause), rs in sorted(groups.items(), key=lambda g: -len(g[1])):
            r = rs[0]
            lines.append(f"\n{outcome} x{len(rs)} "
                         f"(cases {', '.join(str(x['case']) for x in rs[:12])}"
                         f"{' ...' if len(rs) > 12 else ''})")
            lines.append(f"  e.g. {r.get('run')} {r.get('fmt')} {r.get('file')}: "
                         f"{r['mutation']}")
            lines.append(f"  replay: {self.replay.format(case=r['case'])}")
            lines += [f"  | {x}" for x in (r.get("detail") or "").splitlines()[-4:]]
        return "\n".join(lines)


def _cause(detail: str) -> str:
    """A failure's cause for grouping: its first frame in moe_merge and the exception type, or
    the message without its paths and numbers."""
    lines = detail.strip().splitlines()
    if lines and lines[0].startswith("at "):
        return f"{lines[0].split(':')[0]} {lines[-1].split(':')[0]}"
    return re.sub(r"/\S+|\d+", "#", lines[-1] if lines else "")[:120]


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _limits() -> None:  # preexec_fn of the worker
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(runs: list[Path], work: Path, seed: int, cases: int, start: int = 0,
        keep: bool = False, echo=None, case_main: str | None = None) -> Result:
    """Run cases ``start .. start + cases - 1`` of ``seed`` over the newest tags of ``runs``
    (copied into ``work``) in bounded worker processes; ``echo(record)`` is called per case.
    ``case_main``: ``module:function`` run instead of ``moe_merge.cli.main`` in the cases."""
    work = Path(work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    runs = [Path(r).absolute() for r in runs]
    prepare(runs, work)
    (work / "reference.json").unlink(missing_ok=True)
    replay = (f"{sys.executable} {Path(__file__).resolve()} --runs "
              f"{' '.join(map(str, runs))} --seed {seed} --case {{case}}")
    records: list[dict] = []
    t0, peak, workers, k, stop = time.perf_counter(), 0.0, 0, start, start + cases
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    while k < stop:
        workers += 1
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", "--work", str(work),
                 "--seed", str(seed), "--start", str(k), "--stop", str(stop),
                 *(["--keep"] if keep else []),
                 *(["--case-main", case_main] if case_main else [])],
                stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_limits, text=True)  # noqa: PLW1509 - it only calls setrlimit
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            summary, ready, line = None, False, ""
            while True:
                try:
                    line = lines.get(timeout=WATCHDOG)
                except queue.Empty:
                    proc.kill()
                    rec = {"seed": seed, "case": k, "outcome": "fail:hang", "mutation": "?",
                           "ms": WATCHDOG * 1000, "detail": f"no report for {WATCHDOG} s"}
                    records.append(rec)
                    if echo:
                        echo(rec)
                    k += 1
                    break
                if line is None:
                    break
                msg = json.loads(line)
                if msg.get("ready"):
                    ready = True
                elif msg.get("summary"):
                    summary = msg
                elif "kept" in msg:
                    if echo:
                        echo(msg)
                else:
                    if msg["outcome"] != "fail:poisoned":
                        k = msg["case"] + 1
                    records.append(msg)
                    if echo:
                        echo(msg)
            proc.wait()
            if not ready and line is None:
                errf.seek(0)
                tail = errf.read().decode("utf-8", "replace").strip()[-3000:]
                raise RuntimeError(f"the fuzz worker failed to start ({proc.returncode}):\n{tail}")
            if summary:
                peak = max(peak, summary["peak_rss_mb"])
            if proc.returncode not in (0, 3) and k < stop and line is None:
                errf.seek(0)
                tail = errf.read().decode("utf-8", "replace").strip().splitlines()[-6:]
                rec = {"seed": seed, "case": k, "outcome": f"fail:worker-died:{proc.returncode}",
                       "mutation": "?", "ms": 0, "detail": "\n".join(tail)}
                records.append(rec)
                if echo:
                    echo(rec)
                k += 1
            if proc.returncode == 3 and any("input-modified" in r["outcome"] or "poisoned" in
                                            r["outcome"] for r in records[-2:]):
                prepare(runs, work)
    peak = max([peak, *(r.get("rss_mb") or 0 for r in records)])
    return Result(seed, records, time.perf_counter() - t0, peak, workers, replay)


def default_runs() -> list[Path]:
    root = os.environ.get("MOE_MERGE_TEST_RUNS")
    if not root:
        raise SystemExit("error: pass --runs RUN... (or set MOE_MERGE_TEST_RUNS to the test "
                         "suite's kept runs)")
    return [Path(root) / "moe_z2", Path(root) / "moe_z3"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, default=None,
                    help="run directories (default $MOE_MERGE_TEST_RUNS/moe_z2 and moe_z3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--case", type=int, default=None, help="replay this one case")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and the "
                                                        "mutated case tree")
    ap.add_argument("--quiet", action="store_true", help="only the counts and failures")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case-main", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.work, a.seed, a.start, a.stop, a.keep, a.case_main)
    work = a.work or Path(tempfile.mkdtemp(prefix="moe_merge_fuzz_"))
    start, cases = (a.case, 1) if a.case is not None else (a.start, a.cases)

    def echo(rec: dict) -> None:
        if not a.quiet or rec.get("outcome", "").startswith("fail") and a.case is None:
            print(json.dumps(rec) if a.case is None else json.dumps(rec, indent=1), flush=True)

    try:
        res = run(a.runs or default_runs(), work, a.seed, cases, start, keep=a.keep, echo=echo)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(res.report())
    return 0 if not res.failures else 1


if __name__ == "__main__":
    sys.exit(main())
