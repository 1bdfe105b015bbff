"""Session fixtures: one data cache and the shared trained runs (see support/runs.py)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
from support.runs import (
    RUNS,
    cli_in_process,
    forked_run_logged,
    launch,
    launch_foreign,
    launch_native,
)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer + memmap cache for the whole session (the stdlib corpus, built once)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_cache):
    """``trained(kind)`` -> run directory of RUNS[kind], trained once per test session.

    With ``MOE_MERGE_TEST_RUNS=DIR`` the runs are kept in DIR and reused by later sessions
    (for day-to-day work; a run is reused only if it finished: ``checkpoints/latest`` exists).
    Tests must not modify them: they copy what they change."""
    keep = os.environ.get("MOE_MERGE_TEST_RUNS")
    root = Path(keep) if keep else tmp_path_factory.mktemp("runs")
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            recipe, overrides = RUNS[kind]
            # a kept run may be wanted by several sessions at once: one trains it, the rest wait
            with open(root / f".{kind}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (keep and (root / kind / "checkpoints" / "latest").is_file()):
                    shutil.rmtree(root / kind, ignore_errors=True)  # an unfinished kept run
                    launch(recipe, [*overrides, f"name={kind}", f"output_dir={root}",
                                    f"data.cache_dir={data_cache}"])
            done[kind] = root / kind
        return done[kind]

    return get


@pytest.fixture(scope="session")
def native_moe(tmp_path_factory):
    """``native_moe(zero)`` -> output dir of tests/native_moe_train.py (a program built on
    ``deepspeed.moe.layer.MoE``, not on moe-merge) at that ZeRO stage, trained once."""
    root = tmp_path_factory.mktemp("native")
    done: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in done:
            done[zero] = launch_native(root / f"z{zero}", zero)
        return done[zero]

    return get


@pytest.fixture(scope="session")
def foreign(tmp_path_factory):
    """``foreign(trainer, zero, ep=1, pma=0)`` -> output dir of a run of
    tests/support/other_trainers.py (``hf``: the transformers Trainer, ``accelerate``: an
    Accelerate loop, both with DeepSpeed; 6 steps, a checkpoint every 2; ``pma=N``: with
    PMACallback(n=N)), trained once per session. Tests must not modify it."""
    root = tmp_path_factory.mktemp("foreign")
    done: dict[tuple, Path] = {}

    def get(trainer: str, zero: int, ep: int = 1, pma: int = 0) -> Path:
        key = (trainer, zero, ep, pma)
        if key not in done:
            done[key] = launch_foreign(root / f"{trainer}_z{zero}_ep{ep}_pma{pma}", trainer,
                                       zero, "--ep", str(ep), "--pma", str(pma))
        return done[key]

    return get


@pytest.fixture
def study_cli(monkeypatch):
    """``study_cli(*args)`` -> ``moe-merge ARGS`` run in the test process with every training
    launch forked from the zygote (as support.runs.launch does), for the studies."""
    from moe_merge.training import launch as launching

    monkeypatch.setattr(launching, "run_logged", forked_run_logged)
    return cli_in_process
