"""The seeded mutation fuzzer (tests/support/fuzzing.py) over real checkpoint files: every mutated
checkpoint is refused in one line or merges to the clean output, within a time and memory
bound; and the fuzzer's own parts: the pickle rewrite keeps the archive consistent, cases
replay alone, the oracle flags every kind of failure, the worker's bounds hold.

``MOE_MERGE_FUZZ_SEED`` and ``MOE_MERGE_FUZZ_CASES`` choose another seed or more cases (a
failure's report gives the command that replays it)."""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time
import warnings
import zipfile

import pytest
import torch
from support import crafted, fuzzing

from moe_merge.checkpoint.safe_load import ALLOWED_GLOBALS

pytestmark = pytest.mark.distributed

SEED = int(os.environ.get("MOE_MERGE_FUZZ_SEED", "13"))
CASES = int(os.environ.get("MOE_MERGE_FUZZ_CASES", "300"))


@pytest.fixture(scope="module")
def runs(trained):
    return [trained("moe_z2"), trained("moe_z3")]


def test_rewritten_pickle_keeps_the_archive_consistent(runs, tmp_path):
    src = fuzzing.newest_tags(runs[0])[-1] / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = src.read_bytes()
    pkl = fuzzing.read_pickle(data)
    assert pkl is not None and pkl.endswith(b".")
    with zipfile.ZipFile(src) as zf:
        before = {i.filename: (i.header_offset, zf.read(i)) for i in zf.infolist()}
    memo = b"".join(b"r" + struct.pack("<I", 100_000 + i) for i in range(1000))
    for extra, deflate in [(memo[:5], False), (memo, False), (memo[:15], True)]:
        new = pkl[:-1] + extra + b"."  # the result memoized again: the same structure
        out = tmp_path / f"{len(extra)}{deflate}.pt"
        out.write_bytes(fuzzing.rewrite_pickle(data, new, deflate=deflate))
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None  # every CRC-32 and size right
            assert [i.filename for i in zf.infolist()] == list(before)
            for info in zf.infolist():
                offset, raw = before[info.filename]
                if info.filename.endswith("/data.pkl"):
                    assert zf.read(info) == new
                    assert info.compress_type == (zipfile.ZIP_DEFLATED if deflate
                                                  else zipfile.ZIP_STORED)
                else:
                    assert zf.read(info) == raw
                    assert (info.header_offset - offset) % 64 == 0  # records stay aligned
        if not deflate:  # torch reads it as the original (its reader wants stored records)
            with torch.serialization.safe_globals(ALLOWED_GLOBALS):
                got, want = (dict(crafted.flatten(torch.load(p, weights_only=True)))
                             for p in (out, src))
            assert got.keys() == want.keys()
            tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
            assert len(tensors) > 5
            assert all(torch.equal(got[k], want[k]) for k in tensors)


def test_cases_replay_alone_and_differ(runs, tmp_path):
    fuzzing.prepare(runs, tmp_path)
    a = [fuzzing.make_case(tmp_path, SEED, k) for k in range(40)]
    b = [fuzzing.make_case(tmp_path, SEED, k) for k in reversed(range(40))][::-1]
    assert [(c.file, c.mutation, c.data) for c in a] == [(c.file, c.mutation, c.data) for c in b]
    assert len({c.data for c in a}) > 30  # the cases are not a few repeated ones
    assert {c.fmt for c in a} == set(fuzzing.FORMATS)
    assert {c.source for c in a} == set(fuzzing.SOURCES)
    assert {c.mutation.split()[0] for c in a} >= {"pkl-insert", "truncate"}
    other = fuzzing.make_case(tmp_path, SEED + 1, 0)
    assert (other.file, other.mutation) != (a[0].file, a[0].mutation)


def _stub(kind):
    """A stand-in for moe_merge.cli.main that misbehaves in one way."""
    def main(argv):
        out = argv[argv.index("--out") + 1]
        tag = argv[1]
        if kind == "traceback":
            raise KeyError("missing")
        if kind == "MemoryError":
            raise MemoryError()
        if kind == "timeout":
            time.sleep(3)
        if kind == "two-lines":
            print("moe-merge merge: error: a\nsecond line", file=sys.stderr)
            return 2
        if kind == "unnamed":
            print("moe-merge merge: error: something is wrong", file=sys.stderr)
            return 2
        if kind == "exit-1":
            return 1
        if kind == "output-left":
            os.makedirs(out)
            print(f"moe-merge merge: error: {tag}: refused", file=sys.stderr)
            return 2
        if kind == "leftover":
            os.makedirs(os.path.join(os.path.dirname(out), ".o.tmp-1"))
            print(f"moe-merge merge: error: {tag}: refused", file=sys.stderr)
            return 2
        if kind == "different":
            os.makedirs(out)
            with open(os.path.join(out, "model.safetensors"), "wb") as f:
                f.write(b"not the merge")
            return 0
        if kind == "input-modified":
            with open(os.path.join(tag, "meta.json"), "a") as f:
                f.write(" ")
        if kind == "code-executed":
            open(os.path.join(os.path.dirname(os.path.dirname(out)), "marker"), "w").close()
        if kind == "fd-leak":
            main.kept = open(os.path.join(tag, "meta.json"))  # noqa: SIM115
        if kind == "thread-leak":
            threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
        print(f"moe-merge merge: error: {tag}: refused", file=sys.stderr)
        return 2
    return main


FLAGGED = {"traceback": "traceback:KeyError", "MemoryError": "MemoryError",
           "timeout": "timeout", "two-lines": "message:not-one-line",
           "unnamed": "message:names-no-input", "exit-1": "rc:1", "output-left": "output-left",
           "leftover": "leftover", "different": "different-output",
           "input-modified": "input-modified", "code-executed": "code-executed",
           "fd-leak": "fd-leak", "thread-leak": "thread-leak"}


def test_the_oracle_flags_every_kind_of_failure(runs, tmp_path, monkeypatch):
    fuzzing.prepare(runs, tmp_path)
    monkeypatch.chdir(tmp_path)
    old = signal.signal(signal.SIGALRM, fuzzing._alarm)
    try:
        with warnings.catch_warnings():
            w = fuzzing.Worker(tmp_path)
            real = w.main
            # the real merge: an untouched file merges to the clean output, a cut one is refused
            case = fuzzing.make_case(tmp_path, SEED, 0)
            intact = (tmp_path / "corpus" / case.kind / "checkpoints" / case.file).read_bytes()
            same = fuzzing.Case(SEED, 0, case.kind, case.fmt, case.source, case.file, "none",
                                intact)
            assert w.run(same)["outcome"] == "identical"
            cut = fuzzing.Case(SEED, 0, case.kind, case.fmt, case.source, case.file,
                               "truncate", intact[:100])
            rec = w.run(cut)
            assert rec["outcome"] == "refused", rec
            assert case.file.split("/")[1] in rec["detail"]
            for kind, flag in FLAGGED.items():
                w.main = _stub(kind)
                with monkeypatch.context() as m:
                    m.setattr(fuzzing, "CASE_SECONDS", 0.5 if kind == "timeout" else 30)
                    rec = w.run(same)
                assert flag in rec["outcome"].split(":", 1)[1].split("+"), (kind, rec)
                w.main = real
                assert w.run(same)["outcome"] == "identical", kind  # the tree was restored
            assert not w.recheck()
    finally:
        signal.signal(signal.SIGALRM, old)


def misbehave(argv):
    """A stand-in for moe_merge.cli.main in worker processes: case 0 asks for more memory than
    the worker may map, case 1 kills the worker, case 2 touches 1.5 GiB (its time limit off),
    then merges."""
    import __main__
    from moe_merge.cli import main

    case = __main__.CURRENT_CASE
    if case == 0:
        bytearray(8 << 30)
    if case == 1:
        os.abort()
    if case == 2:
        # the memory bound is under test here, not the time one: touching 1.5 GiB took 1 s
        # alone but over the case's 5 s once in a full suite run
        signal.setitimer(signal.ITIMER_REAL, 0)
        blob = b"x" * (3 << 29)
        assert blob[-1:] == b"x"
    return main(argv)


def test_the_worker_bounds_hold_and_a_dead_worker_is_reported(runs, tmp_path):
    res = fuzzing.run(runs, tmp_path, seed=SEED, cases=4,
                      case_main="integration.test_fuzz:misbehave")
    got = [(r["case"], r["outcome"]) for r in res.records]
    assert got[0] == (0, "fail:MemoryError"), res.report()
    assert got[1] == (1, f"fail:worker-died:{-signal.SIGABRT}"), res.report()
    assert got[2][0] == 2 and "memory-peak" in got[2][1], res.report()
    assert got[3][0] == 3 and got[3][1] in fuzzing.OK, res.report()
    assert len(got) == 4 and res.workers == 2


def test_mutated_checkpoints_are_refused_in_one_line_or_merge_unchanged(runs, tmp_path):
    res = fuzzing.run(runs, tmp_path, seed=SEED, cases=CASES)
    report = res.report()
    print(report)
    reported = [r["case"] for r in res.records if r["outcome"] != "fail:poisoned"]
    assert reported == list(range(CASES)), "a case went unreported"
    if res.failures:
        pytest.fail(report, pytrace=False)
    # the mutations reach both sides of the oracle
    assert res.counts["refused"] > CASES // 5 and res.counts["identical"] > CASES // 10, report
