"""The torch-free checkpoint parser against torch.load, and the piecewise CRC-32 check."""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict

import pytest
import torch

from moe_merge.checkpoint.reader import _check_crc, crc32
from moe_merge.checkpoint.safe_load import CheckpointError, LazyTensor, load


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


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
    want = dict(_flatten(torch.load(path, weights_only=True)))
    got = dict(_flatten(load(path)))
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
    with pytest.raises(CheckpointError, match="junk.pt: truncated or corrupted"):
        load(tmp_path / "junk.pt")
