"""The build-lock clean-up and the py-cpuinfo cache DeepSpeed's CPU op loads go through."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from moe_merge.training import ops

INFO = {"arch": "X86_64", "flags": ["avx2", "fma"], "brand_raw": "a CPU"}


@pytest.fixture
def fake_cpuinfo(monkeypatch):
    """A stand-in py-cpuinfo module whose probe counts its calls, on a CPU with a cache key."""
    monkeypatch.setattr(ops, "cpu_key", lambda version: f"key-{version}")

    def install():
        mod = types.ModuleType("cpuinfo")
        mod.CPUINFO_VERSION_STRING = "9.0.0"
        mod.calls = 0

        def get_cpu_info():
            mod.calls += 1
            return dict(INFO)

        mod.get_cpu_info = get_cpu_info
        monkeypatch.setitem(sys.modules, "cpuinfo", mod)
        return mod
    return install


def test_one_probe_per_process_and_none_in_the_next(fake_cpuinfo, tmp_path):
    mod = fake_cpuinfo()
    ops.cache_cpu_info(tmp_path)
    ops.cache_cpu_info(tmp_path)  # a second install keeps the first
    assert mod.get_cpu_info() == INFO and mod.get_cpu_info() == INFO
    assert mod.calls == 1
    (file,) = tmp_path.glob("cpuinfo-*.json")
    assert json.loads(file.read_text()) == INFO
    later = fake_cpuinfo()  # the next launch: a new process, the file already there
    ops.cache_cpu_info(tmp_path)
    assert later.get_cpu_info() == INFO and later.calls == 0


@pytest.mark.parametrize("text", ["{not json", "[]", '{"arch": "X86_64"}',
                                  '{"arch": 1, "flags": []}', '{"arch": "x", "flags": [1]}'])
def test_a_malformed_cache_file_is_probed_again_and_replaced(fake_cpuinfo, tmp_path, text):
    mod = fake_cpuinfo()
    cached = tmp_path / "cpuinfo-key-9.0.0.json"
    cached.write_text(text)
    ops.cache_cpu_info(tmp_path)
    assert mod.get_cpu_info() == INFO and mod.calls == 1
    assert json.loads(cached.read_text()) == INFO
    assert cached.stat().st_mode & 0o777 == 0o644


def test_each_caller_gets_its_own_answer(fake_cpuinfo, tmp_path):
    mod = fake_cpuinfo()
    ops.cache_cpu_info(tmp_path)
    mod.get_cpu_info()["flags"].append("changed by a caller")
    assert mod.get_cpu_info() == INFO and mod.calls == 1


def test_no_key_no_file(fake_cpuinfo, tmp_path, monkeypatch):
    mod = fake_cpuinfo()
    monkeypatch.setattr(ops, "cpu_key", lambda version: None)
    ops.cache_cpu_info(tmp_path)
    assert mod.get_cpu_info() == INFO and mod.get_cpu_info() == INFO and mod.calls == 1
    assert not list(tmp_path.iterdir())


def test_deepspeed_op_builders_ask_through_the_cache(tmp_path, monkeypatch):
    """The real py-cpuinfo and DeepSpeed's CPU op builder: -march and SIMD width asked twice,
    probed once, with the same answers as without the cache (nothing is compiled)."""
    import cpuinfo
    import cpuinfo.cpuinfo as impl
    from deepspeed.ops.op_builder.cpu.fused_adam import FusedAdamBuilder

    probes = []
    real_json = impl.get_cpu_info_json
    monkeypatch.setattr(impl, "get_cpu_info_json", lambda: probes.append(1) or real_json())
    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)  # undone at teardown
    builder = FusedAdamBuilder()
    before = (builder.cpu_arch(), builder.simd_width())
    assert len(probes) == 2
    ops.cache_cpu_info(tmp_path)
    after = [(builder.cpu_arch(), builder.simd_width()) for _ in range(2)]
    assert after == [before, before]
    assert len(probes) == 3


def test_an_unwritable_cache_still_answers(fake_cpuinfo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    mod = fake_cpuinfo()
    ops.cache_cpu_info(blocker / "sub")  # its parent is a file: the cache cannot be made
    assert mod.get_cpu_info() == INFO and mod.get_cpu_info() == INFO and mod.calls == 1
    assert list(tmp_path.iterdir()) == [blocker]


def test_the_key_follows_the_cpu_flags_not_its_clock(tmp_path: Path):
    """Another CPU (other flags, another py-cpuinfo) never reads this one's answer."""
    def key(flags: str, mhz: str) -> str | None:
        proc = tmp_path / "cpuinfo"
        proc.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: {mhz}\n"
                        f"flags\t\t: {flags}\nbogomips\t: {mhz}\n")
        return ops.cpu_key("9.0.0", proc)

    assert key("fpu avx2", "2200.0") == key("fpu avx2", "3100.5")
    assert key("fpu avx2", "2200.0") != key("fpu avx2 avx512f", "2200.0")
    assert ops.cpu_key("9.0.0", proc=tmp_path / "absent") is None
    (tmp_path / "noflags").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert ops.cpu_key("9.0.0", tmp_path / "noflags") is None
    assert ops.cpu_key("9.0.0", tmp_path / "cpuinfo") != ops.cpu_key("9.0.1", tmp_path / "cpuinfo")


def test_a_lock_older_than_any_compile_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "build_dir", lambda name: tmp_path)
    lock = tmp_path / "lock"
    lock.write_text("")
    now = lock.stat().st_mtime
    assert not ops.clear_stale_lock("op", now=now + 60) and lock.exists()
    assert ops.clear_stale_lock("op", now=now + ops.STALE_LOCK_S + 1) and not lock.exists()
    assert not ops.clear_stale_lock("op", now=now)
