"""The CRC-32 verifier apart from reading: each record checked once, whole or from the ranges
the caller read, in the background when asked, and nothing at all with ``--no-verify``."""

from __future__ import annotations

import pytest
import torch

from moe_merge.checkpoint.safe_load import load
from moe_merge.checkpoint.verify import Verifier, crc32
from moe_merge.errors import CheckpointError


@pytest.fixture
def records(tmp_path):
    """Two records of one torch.save file, and a function corrupting one byte of a record."""
    path = tmp_path / "f.pt"
    torch.save({"x": torch.arange(50_000, dtype=torch.float32), "y": torch.ones(10)}, path)
    sd = load(path, root=tmp_path)

    def corrupt(rec, at: int = 0) -> None:
        data = bytearray(path.read_bytes())
        data[rec.offset + at] ^= 0xFF
        path.write_bytes(data)

    return tmp_path, sd["x"].record, sd["y"].record, corrupt


@pytest.mark.parametrize("background", [False, True])
def test_a_corrupted_record_fails_once_and_others_pass(records, background):
    root, x, y, corrupt = records
    corrupt(x, 1000)
    v = Verifier(root, background=background)
    v.check(y)
    if background:
        v.check(x)  # queued: the failure comes from wait()
        with pytest.raises(CheckpointError, match=f"record {x.name} fails its CRC-32 check"):
            v.wait()
    else:
        with pytest.raises(CheckpointError, match=f"record {x.name} fails its CRC-32 check"):
            v.check(x)
    v.check(x)  # checked already: not again
    v.wait()


def test_ranges_read_by_the_caller_are_combined_with_the_bytes_between(records):
    root, x, _, corrupt = records
    data = root.joinpath("f.pt").read_bytes()
    spans = [(x.offset + 400, 4000), (x.offset + 100_000, 50_000)]
    v = Verifier(root)
    v.expect(x)
    for b, n in spans:
        v.note(x, b, n, crc32(data[b:b + n]))
    v.wait()
    corrupt(x, 20)  # outside the ranges: found in the bytes between them
    v = Verifier(root)
    v.expect(x)
    for b, n in spans:
        v.note(x, b, n, crc32(data[b:b + n]))
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        v.wait()


def test_a_wrong_crc_noted_for_a_range_fails(records):
    root, x, _, _ = records
    v = Verifier(root)
    v.expect(x)
    v.note(x, x.offset, 4000, 0)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        v.wait()


def test_no_verify_checks_nothing(records):
    root, x, _, corrupt = records
    corrupt(x)
    v = Verifier(root, enabled=False)
    v.check(x)
    v.expect(x)
    v.note(x, x.offset, 4, 0)
    v.wait()
