"""Hostile checkpoints handed to the trainer: DeepSpeed loads checkpoints with
``torch.load(weights_only=False)``, which runs any pickle, so every tag the trainer gives it
(train.fork_from, train.init_from, resume, spike recovery) is first parsed with the restricted
interpreter, and a refused tag stops the launch in one line naming the file before DeepSpeed
reads it. The payloads would create a marker file if unpickled; the tests assert it is absent.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from support.runs import DECAY, MOE_RECIPE, REPO, TINY_MOE, read_metrics, run_cli, train_losses

from moe_merge.checkpoint import guard
from moe_merge.errors import CheckpointError

MOE_Z2 = [*TINY_MOE, *DECAY, "parallel.zero_stage=2"]  # conftest RUNS["moe_z2"]


class Payload:
    """Unpickled by torch.load(weights_only=False), this creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poison(path: Path, marker: Path) -> None:
    """Replace a checkpoint file with a real torch.save archive whose data.pkl is a payload."""
    path.unlink()
    torch.save({"optimizer_state_dict": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload works: it does create the marker
    assert marker.exists()
    marker.unlink()


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)
    return dst


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def checked_by(tag_dir: Path, name: str, world: int = 2) -> int:
    """The rank that checks file ``name`` of a tag (guard.share)."""
    files = guard.tag_files(tag_dir.parent, tag_dir.name)
    i = [p.name for p in files].index(name)
    return next(r for r in range(world) if i in guard.share(len(files), r, world))


def one_error_line(proc, path: Path) -> str:
    """The launch's report: exactly one line names ``path``, it is the error line, and no
    traceback was printed."""
    out = proc.stdout + proc.stderr
    naming = [line for line in out.splitlines() if str(path) in line]
    assert len(naming) == 1 and naming[0].startswith("error: "), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return naming[0]


def train(*overrides: str):
    return run_cli(["bash", str(REPO / "launch" / "train.sh"), MOE_RECIPE, *MOE_Z2, *overrides])


def test_check_tag_refuses_payloads_special_files_and_escapes(trained, tmp_path):
    ckpts = copy_run(trained("moe_z2") / "checkpoints", tmp_path / "checkpoints")
    tag = ckpts / "global_step8"
    assert [p.name for p in guard.check_tag(ckpts, "global_step8")] == \
        sorted(p.name for p in tag.iterdir())
    marker = tmp_path / "MARKER"

    def refused(name: str, match: str, load_dir: Path = ckpts) -> None:
        with pytest.raises(CheckpointError, match=match) as e:
            guard.check_tag(load_dir, name)
        assert "\n" not in str(e.value)

    opt = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = opt.read_bytes()
    poison(opt, marker)
    refused("global_step8", f"^{re.escape(str(opt))}: refused, the file asks to run code")
    opt.write_bytes(saved)
    os.mkfifo(tag / "extra")  # opened without blocking, refused
    refused("global_step8", f"^{re.escape(str(tag / 'extra'))}: not a regular file")
    (tag / "extra").unlink()
    (tag / "sub").mkdir()  # a tag holds files only
    refused("global_step8", f"^{re.escape(str(tag / 'sub'))}: not a regular file")
    (tag / "sub").rmdir()
    secret = tmp_path / "secret.pt"
    shutil.copy(tag / "mp_rank_00_model_states.pt", secret)
    (tag / "link.pt").symlink_to(secret)  # a file that leads out of the tag
    refused("global_step8", re.escape(f"{tag / 'link.pt'}: a symlink to {secret}, outside {tag}"))
    (tag / "link.pt").unlink()
    (ckpts / "global_step10").symlink_to(tmp_path / "elsewhere")  # a tag that leads out
    shutil.copytree(tag, tmp_path / "elsewhere")
    refused("global_step10", "outside")
    for name in ("../checkpoints/global_step8", "..", "a/b", ""):
        refused(name, "is not one directory name")
    refused("global_step9", "not a checkpoint directory")
    assert guard.check_tag(ckpts, "global_step8")  # clean again
    assert not marker.exists()


class ThreadGroup:
    """torch.distributed's all_reduce and all_gather_object for ranks run as threads."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)
        self.local = threading.local()

    def get_rank(self) -> int:
        return self.local.rank

    def get_world_size(self) -> int:
        return self.world

    def _exchange(self, value) -> list:
        self.slots[self.local.rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor) -> None:
        t.copy_(sum(self._exchange(t.clone())))

    def all_gather_object(self, out: list, obj) -> None:
        out[:] = self._exchange(obj)


def test_ranks_share_the_files_and_all_raise_the_failing_ranks_message(trained, tmp_path,
                                                                       monkeypatch):
    ckpts = copy_run(trained("moe_z2") / "checkpoints", tmp_path / "checkpoints")
    tag = ckpts / "global_step4"
    bad = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert checked_by(tag, bad.name) == 1
    poison(bad, tmp_path / "MARKER")
    group, seen, results = ThreadGroup(2), {0: [], 1: []}, {}
    check_file = guard.check_file

    def recording(path, tag_dir):
        seen[group.get_rank()].append(path.name)
        check_file(path, tag_dir)

    monkeypatch.setattr(guard, "check_file", recording)

    def rank(r: int) -> None:
        group.local.rank = r
        try:
            results[r] = guard.check_tag(ckpts, tag.name, group, "cpu")
        except CheckpointError as e:
            results[r] = str(e)

    for name in ("global_step2", "global_step4"):
        tag = ckpts / name
        for r in seen:
            seen[r].clear()
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        names = sorted(p.name for p in tag.iterdir())
        if name == "global_step2":  # clean: every file checked once, by rank i % 2
            assert results[0] == results[1] == sorted(tag.iterdir())
            assert seen == {r: names[r::2] for r in (0, 1)}
        else:  # rank 0 never opened the poisoned file, yet raises rank 1's message
            assert bad.name not in seen[0] and bad.name in seen[1]
            assert results[0] == results[1] and results[0].startswith(f"{bad}: refused")
    assert not (tmp_path / "MARKER").exists()


# ---- 2-rank launches --------------------------------------------------------------------------
@pytest.mark.distributed
def test_fork_and_init_from_a_poisoned_checkpoint_are_refused_before_deepspeed(trained, tmp_path,
                                                                              data_cache):
    """train.fork_from a tag whose optimizer file (checked by rank 1) is a payload, then
    train.init_from a plain checkpoint (a run directory) whose latest tag holds one (checked by
    rank 0): each launch exits 2 with one line naming the file, the payload never runs, and
    no run directory is created."""
    marker = tmp_path / "MARKER"
    src = copy_run(trained("moe_z2"), tmp_path / "src")
    cases = [("fork", src / "checkpoints" / "global_step4",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt", "train.fork_from", 1),
             ("init", src, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "train.init_from", 0)]
    for name, source, victim, key, rank in cases:
        tag = source if name == "fork" else src / "checkpoints" / "global_step8"
        assert checked_by(tag, victim) == rank
        poison(tag / victim, marker)
        before = snapshot(src)
        proc = train(f"name={name}", f"output_dir={tmp_path / 'out'}",
                     f"data.cache_dir={data_cache}", f"{key}={source}")
        assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
        line = one_error_line(proc, tag / victim)
        assert f"key '{key}': {tag / victim}: refused, the file asks to run code" in line
        assert not marker.exists()
        assert not (tmp_path / "out" / name).exists()
        assert snapshot(src) == before


@pytest.mark.distributed
def test_resume_from_a_poisoned_latest_tag_is_refused_and_the_run_untouched(trained, tmp_path,
                                                                            data_cache):
    marker = tmp_path / "MARKER"
    run = copy_run(trained("moe_z2"), tmp_path / "runs" / "moe_z2")
    victim = run / "checkpoints" / "global_step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    poison(victim, marker)
    before = snapshot(run)
    proc = train("name=moe_z2", f"output_dir={run.parent}", f"data.cache_dir={data_cache}")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    line = one_error_line(proc, victim)
    assert f"key 'train.resume': {victim}: refused" in line
    assert not marker.exists()
    assert snapshot(run) == before


@pytest.mark.distributed
def test_spike_recovery_to_a_poisoned_tag_stops_with_exit_3(trained, tmp_path, data_cache):
    """A copy of moe_z2 cut back to global_step2 (its latest) keeps a global_step4 whose
    optimizer file is a payload. The resumed run (checkpoints every 3 steps now: it writes
    global_step3, not global_step4) spikes at step 5; the rollback picks global_step4, and the
    check refuses it before DeepSpeed reads it: exit 3, one line naming the file."""
    marker = tmp_path / "MARKER"
    orig = trained("moe_z2")
    run = copy_run(orig, tmp_path / "runs" / "moe_z2")
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / f"global_step{step}")
    (run / "checkpoints" / "latest").write_text("global_step2")
    victim = run / "checkpoints" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    poison(victim, marker)
    proc = train("name=moe_z2", f"output_dir={run.parent}", f"data.cache_dir={data_cache}",
                 "stability.on_spike=rollback", "stability.inject_nan_step=5",
                 "checkpoint.every_tokens=768")
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    line = one_error_line(proc, victim)
    assert line.startswith("error: loss spike at step 5: recovery refused: ")
    assert f"{victim}: refused, the file asks to run code" in line
    assert not marker.exists()
    # the resume from global_step2 (checked too) went on as the original run did
    losses, want = train_losses(run), train_losses(orig)
    assert sorted(losses) == [1, 2, 3, 4] and [losses[s] for s in (3, 4)] == pytest.approx(
        [want[s] for s in (3, 4)], rel=1e-6, abs=0)
    events = [(m["step"], m["event"]) for m in read_metrics(run) if "event" in m]
    assert events == [(5, "spike")]
    assert (run / "checkpoints" / "global_step3").is_dir()
