"""The host allocator setting every rank makes at start-up (its effect on a ZeRO-3 rank's
resident set is measured by the 8-rank start-up memory check, not here)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from moe_merge.training import distributed

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_glibc_takes_the_setting():
    code = "from moe_merge.training.distributed import compact_host_allocator as c; print(c())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MOE_MERGE_HOST_MALLOC", "default")
    assert distributed.compact_host_allocator() is False
