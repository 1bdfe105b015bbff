"""Crafting hostile checkpoint files from real ones: replace or extend the pickle of a
``torch.save`` archive while keeping its tensor records byte for byte."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path


def archive_pickle(path: Path) -> tuple[str, bytes]:
    """The name and bytes of the ``<archive>/data.pkl`` record of a torch.save file."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return name, zf.read(name)


def rewrite(path: Path, pkl: bytes, out: Path | None = None,
            compress: int = zipfile.ZIP_STORED) -> Path:
    """Write ``path``'s archive to ``out`` (default: over ``path``) with ``pkl`` as its
    data.pkl; every other record is copied unchanged and stored."""
    out = out or path
    name, _ = archive_pickle(path)
    with zipfile.ZipFile(path) as zf:
        records = [(i.filename, zf.read(i)) for i in zf.infolist()]
    tmp = out.with_name(out.name + ".crafting")
    with zipfile.ZipFile(tmp, "w") as zf:
        for fname, data in records:
            zf.writestr(zipfile.ZipInfo(fname), pkl if fname == name else data,
                        compress_type=compress if fname == name else zipfile.ZIP_STORED)
    tmp.replace(out)
    return out


def before_stop(pkl: bytes, extra: bytes) -> bytes:
    """``pkl`` with ``extra`` opcodes run just before its STOP (the top of the stack is the
    loaded object; ``extra`` must leave the stack as it found it)."""
    assert pkl.endswith(pickle.STOP)
    return pkl[:-1] + extra + pickle.STOP


def unicode(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def int_(value: int) -> bytes:
    return pickle.LONG1 + bytes([8]) + value.to_bytes(8, "little", signed=True)


def storage_pid(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    """A persistent id naming storage ``key``: ``('storage', torch.<storage>, key, 'cpu',
    numel)``, resolved by BINPERSID (leaves the storage object on the stack)."""
    return (pickle.MARK + unicode("storage") + global_("torch", storage) + unicode(key)
            + unicode("cpu") + int_(numel) + pickle.TUPLE + pickle.BINPERSID)


def str_dict(items: dict) -> bytes:
    """A dict of str keys and str / int values."""
    body = b""
    for k, v in items.items():
        body += unicode(k) + (unicode(v) if isinstance(v, str) else int_(v))
    return pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS


def poke_records(path: Path, value: bytes) -> None:
    """Overwrite the first bytes of every tensor record of a torch zip file in place."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= len(value)]
    with open(path, "r+b") as f:
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len = int.from_bytes(f.read(2), "little")
            extra_len = int.from_bytes(f.read(2), "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            f.write(value)


def flatten(obj, prefix=""):
    """``(dotted key, leaf)`` of nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj
