"""The torch-free checkpoint parser against torch.load, and the piecewise CRC-32 check."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections import OrderedDict

import pytest
import torch
from support import crafted

from moe_merge.checkpoint.reader import _check_crc, crc32
from moe_merge.checkpoint.safe_load import LazyTensor, load
from moe_merge.errors import CheckpointError


def test_lazy_tensors_read_back_what_torch_load_reads(tmp_path):
    flat = torch.randn(1000)
    state = {
        "module": OrderedDict(w=torch.randn(4, 6), b=torch.randn(6).to(torch.bfloat16),
                              steps=torch.tensor([3], dtype=torch.int64)),
        "views": [flat[10:20], flat[500:], flat.view(10, 100).t()],  # share one storage
        "param": torch.nn.Parameter(torch.randn(3, 3)),
        "shape": torch.Size([2, 3]),
        "meta": {"step": 7, "name": "x", "lr": 1e-3, "flag": True, "none": None},
    }
    path = tmp_path / "f.pt"
    torch.save(state, path)
    want = dict(crafted.flatten(torch.load(path, weights_only=True)))
    got = dict(crafted.flatten(load(path)))
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, LazyTensor), key
            t = g.torch()
            assert t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w), key
        else:
            assert g == w, key
    views = load(path)["views"]
    assert views[0].record is views[1].record  # one storage, one record
    assert views[0].file_offset == views[0].record.offset + 10 * 4


def test_pieces_crc_combines_and_catches_corruption_in_or_between_pieces(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"x": torch.arange(100_000, dtype=torch.float32)}, path)
    rec = load(path)["x"].record
    data = bytearray(path.read_bytes())
    assert zlib.crc32(data[rec.offset:rec.offset + rec.nbytes]) == rec.crc

    def pieces_of(buf):  # two ranges read (and checksummed) by a caller, gaps around them
        spans = [(rec.offset + 4000, 100_000), (rec.offset + 200_000, 50_000)]
        return [(b, n, crc32(bytes(buf[b:b + n]))) for b, n in spans]

    _check_crc(rec, pieces_of(data))
    _check_crc(rec)
    _check_crc(rec, [(rec.offset, 10, 0), (rec.offset + 5, 10, 0)])  # overlap: checked whole
    for where in (rec.offset + 1000, rec.offset + 150_000):  # in a gap, read from the file
        bad = bytearray(data)
        bad[where] ^= 0xFF
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="CRC-32"):
            _check_crc(rec, pieces_of(data))
    path.write_bytes(data)
    bad = bytearray(data)
    bad[rec.offset + 5000] ^= 0xFF  # inside a piece: the caller's checksum of what it read
    with pytest.raises(CheckpointError, match="CRC-32"):
        _check_crc(rec, pieces_of(bad))


def test_only_allowlisted_globals_are_resolved(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused.*posix.system"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt: not a torch.save zip archive"):
        load(tmp_path / "junk.pt")


# ---- hostile pickles ---------------------------------------------------------------------
# Each crafted input is refused with one line; nothing it asks for is done.

def _tensor_file(tmp_path, name="t.pt", **tensors):
    path = tmp_path / name
    torch.save(tensors or {"x": torch.arange(16, dtype=torch.float32)}, path)
    return path


def _tensor_op(offset, shape, stride) -> bytes:
    """Opcodes that rebuild a tensor over storage "0" (16 floats) and leave it on the stack."""
    def ints(vals):
        return pickle.MARK + b"".join(crafted.int_(v) for v in vals) + pickle.TUPLE

    return (crafted.global_("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
            + crafted.storage_pid("0", 16) + crafted.int_(offset) + ints(shape) + ints(stride)
            + pickle.NEWFALSE + pickle.EMPTY_DICT + pickle.TUPLE + pickle.REDUCE)


def _refused(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as e:
        load(path, **kw)
    assert "\n" not in str(e.value) and str(path.name) in str(e.value)
    return str(e.value)


def test_build_cannot_retarget_a_record_after_its_check(tmp_path):
    """The record a storage key names is the archive's; a BUILD on it (pointing it at another
    file, growing it) is refused, as is a BUILD on a lazy tensor, a class or a function."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOKEN=hunter2" * 100)
    path = _tensor_file(tmp_path)
    _, pkl = crafted.archive_pickle(path)
    retarget = (crafted.storage_pid("0", 16) + crafted.str_dict(
        {"path": str(secret), "offset": 0, "nbytes": 0, "crc": 0}) + pickle.BUILD + pickle.POP)
    attacks = {
        "record": retarget,
        # a lazy tensor: grow its shape after the bounds check
        "tensor": (_tensor_op(0, (4,), (1,)) + pickle.NONE + crafted.str_dict(
            {"shape": 1 << 20}) + pickle.TUPLE2 + pickle.BUILD + pickle.POP),
        "class": (crafted.global_("collections", "OrderedDict") + crafted.str_dict({"x": 1})
                  + pickle.BUILD + pickle.POP),
        "function": (crafted.global_("torch._utils", "_rebuild_tensor_v2") + pickle.NONE
                     + crafted.str_dict({"__defaults__": 1}) + pickle.TUPLE2 + pickle.BUILD
                     + pickle.POP),
        "storage type": (crafted.global_("torch", "FloatStorage") + crafted.str_dict({"a": 1})
                         + pickle.BUILD + pickle.POP),
    }
    for what, extra in attacks.items():
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / f"{what}.pt")
        _refused(bad, "refused.*BUILD on")
    assert load(path)["x"].torch().tolist() == list(range(16))  # the allowlist is unchanged


def test_code_and_objects_a_checkpoint_does_not_need_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = _tensor_file(tmp_path)
    _, pkl = crafted.archive_pickle(path)
    cmd = crafted.unicode(f"touch {marker}") + pickle.TUPLE1
    calls = {
        "os.system": crafted.global_("os", "system") + cmd + pickle.REDUCE + pickle.POP,
        "posix.system": crafted.global_("posix", "system") + cmd + pickle.REDUCE + pickle.POP,
        "builtins.eval": crafted.global_("builtins", "eval") + cmd + pickle.REDUCE + pickle.POP,
        "builtins.getattr": (crafted.global_("builtins", "getattr") + pickle.POP),
        "copyreg._reconstructor": crafted.global_("copyreg", "_reconstructor") + pickle.POP,
    }
    for name, extra in calls.items():
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / "bad.pt")
        _refused(bad, f"refused, the file asks to run code.*{name}")
    for opcode in (pickle.INST + b"os\nsystem\n", pickle.OBJ, pickle.EXT1 + b"\x01",
                   pickle.PERSID + b"0\n"):
        bad = crafted.rewrite(path, crafted.before_stop(pkl, pickle.MARK + opcode),
                              tmp_path / "bad.pt")
        _refused(bad, "refused")
    # an allowed callable with arguments it is not written for: bytearray(1.5e9), set(3)
    for func, arg in ((("builtins", "bytearray"), crafted.int_(1_500_000_000)),
                      (("builtins", "set"), crafted.int_(3)),
                      (("collections", "OrderedDict"), crafted.int_(3))):
        extra = crafted.global_(*func) + arg + pickle.TUPLE1 + pickle.REDUCE + pickle.POP
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / "bad.pt")
        _refused(bad, "refused, not a checkpoint structure")
    assert not marker.exists()


def test_pickle_costs_are_bounded(tmp_path, monkeypatch):
    from moe_merge.checkpoint import safe_load, unpickle

    path = _tensor_file(tmp_path)
    _, pkl = crafted.archive_pickle(path)
    monkeypatch.setattr(unpickle, "MAX_OBJECTS", 1000)
    monkeypatch.setattr(unpickle, "MAX_ELEMENTS", 1000)
    cases = {
        "objects": pickle.MARK + pickle.EMPTY_DICT * 1001 + pickle.POP_MARK,
        "elements": pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * 1001 + pickle.APPENDS
        + pickle.POP,
        "references": pickle.NONE + pickle.DUP * 1001 + pickle.MARK + pickle.POP_MARK,
        "integer": pickle.LONG4 + struct.pack("<i", 1 << 20) + b"\xff" * (1 << 20) + pickle.POP,
        "nesting": (crafted.unicode("deep") + pickle.EMPTY_LIST * 70 + pickle.APPEND * 69
                    + pickle.SETITEM),
        # the loaded object replaced by a list holding itself
        "cycle": (pickle.POP + pickle.EMPTY_LIST + pickle.BINPUT + b"\x07" + pickle.BINGET
                  + b"\x07" + pickle.APPEND),
    }
    for what, extra in cases.items():
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / f"{what}.pt")
        msg = _refused(bad, "refused, not a checkpoint structure")
        assert {"objects": "objects", "elements": "elements", "references": "references",
                "integer": "bytes", "nesting": "deeper", "cycle": "cycle"}[what] in msg, msg
    # data.pkl declared larger than a checkpoint needs, compressed or not: refused before
    # anything is inflated
    monkeypatch.setattr(safe_load, "MAX_PICKLE_BYTES", 1 << 20)
    bomb = pickle.NONE + pickle.POP  # 4 MiB of a no-op pair, compressed to a few kB
    zipped = crafted.rewrite(path, crafted.before_stop(pkl, bomb * (2 << 20)),
                             tmp_path / "bomb.pt", compress=zipfile.ZIP_DEFLATED)
    assert zipped.stat().st_size < 100_000
    _refused(zipped, "data.pkl declares")


def test_tensor_views_must_lie_inside_their_record(tmp_path):
    path = _tensor_file(tmp_path)
    _, pkl = crafted.archive_pickle(path)
    for offset, shape, stride in ((-4, (4,), (1,)), (12, (8,), (1,)), (0, (1 << 40,), (0,)),
                                  (0, (4, 4), (8, 1)), (0, (4,), (-1,)), (0, (4,), (1, 1))):
        extra = _tensor_op(offset, shape, stride) + pickle.POP
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / "bad.pt")
        _refused(bad, "refused, not a checkpoint structure")
    # a storage declared with another size or type than its record holds
    for extra in (crafted.storage_pid("0", 15) + pickle.POP,
                  crafted.storage_pid("0", 16, "DoubleStorage") + pickle.POP,
                  crafted.storage_pid("../../etc/passwd", 16) + pickle.POP):
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / "bad.pt")
        _refused(bad, "refused, not a checkpoint structure")


def test_only_regular_files_inside_the_root_are_opened(tmp_path):
    path = _tensor_file(tmp_path)
    root = tmp_path / "tag"
    root.mkdir()
    (root / "link.pt").symlink_to(path)  # leaves the tag
    _refused(root / "link.pt", "outside", root=root)
    os.mkfifo(root / "fifo.pt")  # would block an open() for reading
    _refused(root / "fifo.pt", "not a regular file", root=root)
    (root / "zero.pt").symlink_to("/dev/zero")
    _refused(root / "zero.pt", "outside|not a regular file", root=root)
    (root / "inside.pt").symlink_to(root / "fifo.pt")
    _refused(root / "inside.pt", "not a regular file", root=root)
    shutil.copy(path, root / "real.pt")
    (root / "ok.pt").symlink_to("real.pt")  # a link that stays inside is followed
    assert load(root / "ok.pt", root=root)["x"].record.path == (root / "real.pt").resolve()


def test_every_truncation_and_zip_damage_ends_in_one_line(tmp_path):
    path = _tensor_file(tmp_path, x=torch.arange(8, dtype=torch.float32),
                        meta=OrderedDict(step=3, name="w"))
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    for cut in range(0, len(data), 7):
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load(bad)
        assert "\n" not in str(e.value)
    _, pkl = crafted.archive_pickle(path)
    for i in range(len(pkl)):  # every byte of the pickle set to every opcode-ish value
        for value in (0x00, 0x62, 0x52, 0x71, 0xff):
            mutated = bytearray(pkl)
            mutated[i] = value
            crafted.rewrite(path, bytes(mutated), bad)
            try:
                load(bad)
            except CheckpointError as e:
                assert "\n" not in str(e)
    # an encrypted entry and an unknown compression method: zipfile's own errors, one line
    # (data.pkl is the first entry: its local header at byte 0, its directory entry first)
    raw = path.read_bytes()
    assert raw.startswith(b"PK\x03\x04") and crafted.archive_pickle(path)[0].endswith("data.pkl")
    for field, value in ((8, 1), (10, 99)):  # general-purpose flags (encrypted), method
        damaged = bytearray(raw)
        struct.pack_into("<H", damaged, raw.find(b"PK\x01\x02") + field, value)
        struct.pack_into("<H", damaged, field - 2, value)  # the same field of the local header
        bad.write_bytes(damaged)
        _refused(bad, "truncated or corrupted")


def test_big_endian_archives_are_refused(tmp_path):
    path = _tensor_file(tmp_path)
    with zipfile.ZipFile(path) as zf:
        records = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(tmp_path / "be.pt", "w") as zf:
        for fname, data in records:
            zf.writestr(fname, b"big" if fname.endswith("/byteorder") else data)
    _refused(tmp_path / "be.pt", "big-endian")


def test_a_pickle_before_the_archive_is_refused(tmp_path):
    """torch.load unpickles a file that does not start with a zip record from byte 0 (with
    DeepSpeed: weights_only=False); Python's zipfile would skip such a prefix and find the
    archive behind it. The file is refused, and so is an archive with a name twice."""
    marker = tmp_path / "ran"
    path = _tensor_file(tmp_path)
    cmd = f"touch {marker}".encode()
    payload = (b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")
    bad = tmp_path / "prefixed.pt"
    bad.write_bytes(payload + path.read_bytes())
    _refused(bad, "does not start with a zip record")
    name, pkl = crafted.archive_pickle(path)
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(tmp_path / "twice.pt", "w") as out:
        for info in zf.infolist():
            out.writestr(info.filename, zf.read(info))
        with pytest.warns(UserWarning):  # zipfile: "Duplicate name"
            out.writestr(name, pkl)
    _refused(tmp_path / "twice.pt", "a name twice")
    assert not marker.exists()


def test_hashing_and_copies_cannot_be_made_expensive(tmp_path):
    path = _tensor_file(tmp_path)
    _, pkl = crafted.archive_pickle(path)
    big = pickle.BINBYTES + struct.pack("<I", 1 << 20) + b"x" * (1 << 20)
    cases = {
        # a million-deep tuple: hashing it (as a key, in a set) would overflow the C stack
        "deep tuple": (pickle.MARK + pickle.NONE + pickle.TUPLE1 * 100_000 + pickle.FROZENSET
                       + pickle.POP),
        # integers built to collide in a set: quadratic insertion
        "colliding integers": (pickle.MARK + b"".join(
            pickle.LONG1 + b"\x10" + (k * ((1 << 61) - 1)).to_bytes(16, "little", signed=True)
            for k in range(1, 200)) + pickle.FROZENSET + pickle.POP),
        # one megabyte copied 3000 times by an allowed callable
        "copies": (pickle.EMPTY_LIST + pickle.MARK + big + pickle.BINPUT + b"\x01" + pickle.POP
                   + b"".join(crafted.global_("builtins", "bytearray") + pickle.BINGET + b"\x01"
                              + pickle.TUPLE1 + pickle.REDUCE for _ in range(3000))
                   + pickle.APPENDS + pickle.POP),
    }
    for what, extra in cases.items():
        bad = crafted.rewrite(path, crafted.before_stop(pkl, extra), tmp_path / "bad.pt")
        msg = _refused(bad, "refused, not a checkpoint structure")
        assert {"deep tuple": "deeper", "colliding integers": "64 bits",
                "copies": "elements"}[what] in msg, msg
