"""Spike recovery on a fake engine: synthetic loss sequences drive :class:`Recovery` through the
trainer's loop (step, watch, checkpoint); checked are the tag reloaded, retries going one
checkpoint further back, giving up, the pma merge and the events in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_merge.config.recipe import StabilityConfig
from moe_merge.errors import SpikeError
from moe_merge.training import recovery as recovery_mod
from moe_merge.training.metrics import MetricsLogger
from moe_merge.training.recovery import Recovery
from moe_merge.training.run_dir import Progress, RunDir, tag_for

MODEL = "mp_rank_00_model_states.pt"


class OneRank:
    """torch.distributed as a process group of one rank sees it."""

    def get_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def broadcast_object_list(self, objs: list, src: int = 0) -> None:
        pass

    def all_reduce(self, t: torch.Tensor) -> None:
        pass

    def barrier(self) -> None:
        pass


class Monitor:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def write_events(self, events) -> None:
        self.scalars += events


class FakeEngine:
    """DeepSpeed's engine as the recovery uses it. The model is one number, the step it was
    trained to; a checkpoint is one torch.save file with it and the client state."""
    device = torch.device("cpu")

    def __init__(self):
        self.weight = 0.0
        self.monitor = Monitor()
        self.loads: list[tuple[Path, str, bool]] = []
        self.fail: str | None = None  # "none": load_checkpoint finds nothing; "raise": it raises
        param = torch.nn.Parameter(torch.ones(2))
        self.optimizer = torch.optim.AdamW([param])
        param.grad = torch.ones(2)
        self.optimizer.step()  # Adam moments that a reset must clear

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.weight, **client_state}, d / MODEL)
        (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str, tag: str, load_lr_scheduler_states: bool = True):
        self.loads.append((Path(load_dir), tag, load_lr_scheduler_states))
        if self.fail == "raise":
            raise RuntimeError("size mismatch\nfor layer 0")
        if self.fail == "none":
            return None, None
        state = torch.load(Path(load_dir) / tag / MODEL, weights_only=True)
        self.weight = state["module"]
        return str(Path(load_dir) / tag), state


def setup(tmp_path: Path, **stability) -> tuple[Recovery, FakeEngine, RunDir]:
    st = StabilityConfig(**{"on_spike": "rollback", "min_steps": 4, **stability})
    run, engine = RunDir(tmp_path / "run"), FakeEngine()
    run.root.mkdir(parents=True)
    metrics = MetricsLogger(run.metrics, engine, enabled=True)
    return Recovery(st, run, engine, metrics, OneRank()), engine, run


def train(rec: Recovery, engine: FakeEngine, run: RunDir, loss, end: int, every: int,
          ) -> tuple[list[int], Progress]:
    """The trainer's loop as the recovery sees it: take a step, watch it, checkpoint every
    ``every`` steps. ``loss(step, attempts)`` is the step's loss. Returns the steps executed and
    where the run ended."""
    progress, executed = Progress(), []
    while progress.step < end:
        progress.step += 1
        engine.weight += 1.0
        executed.append(progress.step)
        resumed = rec.watch(progress, loss(progress.step, rec.attempts), 1.0)
        if resumed is not None:
            progress = resumed
            continue
        if progress.step % every == 0:
            engine.save_checkpoint(str(run.checkpoints), tag_for(progress.step),
                                   progress.client_state())
            rec.saved(progress.step)
    return executed, progress


def events(run: RunDir) -> list[dict]:
    return [r for r in map(json.loads, run.metrics.read_text().splitlines()) if "event" in r]


def test_rollback_reloads_the_newest_pre_spike_checkpoint_and_replays(tmp_path):
    rec, engine, run = setup(tmp_path, skip_batches=2)

    def loss(step, attempts):  # a spike at step 8, then (once past it) another at step 11
        return 9.0 if (step, attempts) in ((8, 0), (11, 1)) else 5.0 - 0.01 * step

    executed, end = train(rec, engine, run, loss, end=12, every=3)
    assert executed == [*range(1, 9), *range(7, 12), *range(10, 13)]
    assert engine.loads == [(run.checkpoints, "global_step6", False),
                            (run.checkpoints, "global_step9", False)]
    assert end == Progress(12, 4)  # each recovery skips 2 steps of batches
    assert engine.weight == 12.0  # the reloaded weights, trained on to the end
    assert (rec.spikes, rec.attempts) == (2, 2)
    # trends as at the checkpoint reloaded: every step of the kept trajectory counted once
    assert rec.detector.loss.n == 12
    ev = events(run)
    assert [(e["event"], e["step"]) for e in ev] == [("spike", 8), ("recovery", 8), ("spike", 11),
                                                     ("recovery", 11)]
    assert ev[0]["kind"] == "loss" and ev[0]["loss"] == 9.0 and ev[0]["stability/spike"] == 1.0
    first, second = ev[1], ev[3]
    assert (first["action"], first["checkpoints"], first["resume_step"], first["retry"],
            first["attempt"], first["data_offset"]) == ("rollback", ["global_step6"], 6, 0, 1, 2)
    # the second spike is past the first: a new one, with a fresh count
    assert (second["checkpoints"], second["retry"], second["attempt"]) == (["global_step9"], 0, 2)
    assert {"stability/spike", "stability/recovery", "stability/resume_step"} <= {
        name for name, _, _ in engine.monitor.scalars}
    assert not (run.root / "recovery").exists()


def test_retries_go_one_checkpoint_further_back_then_give_up(tmp_path):
    rec, engine, run = setup(tmp_path, max_retries=2)
    with pytest.raises(SpikeError) as e:
        train(rec, engine, run, lambda step, _: 9.0 if step == 9 else 5.0, end=12, every=2)
    assert str(e.value) == ("loss spike at step 9: 3 recoveries did not get past it "
                            "(stability.on_spike=rollback, max_retries=2); the run stops here, "
                            "its checkpoints are intact")
    assert [tag for _, tag, _ in engine.loads] == [f"global_step{s}" for s in (8, 6, 4)]
    ev = events(run)
    assert [e["event"] for e in ev] == ["spike", "recovery"] * 3 + ["spike", "gave_up"]
    assert [e["retry"] for e in ev if e["event"] == "recovery"] == [0, 1, 2]
    assert [e["resume_step"] for e in ev if e["event"] == "recovery"] == [8, 6, 4]
    assert ev[-1]["retries"] == 3 and ev[-1]["stability/gave_up"] == 1.0 and ev[-1]["step"] == 9
    # with no older checkpoint left, the retries stop early: the one before global_step2
    rec, engine, run = setup(tmp_path / "short", max_retries=5)
    with pytest.raises(SpikeError, match="step 5: no checkpoint is left before it"):
        train(rec, engine, run, lambda step, _: 9.0 if step == 5 else 5.0, end=8, every=2)
    assert [tag for _, tag, _ in engine.loads] == ["global_step4", "global_step2"]


def test_pma_reloads_the_merge_of_the_last_n_pre_spike_checkpoints(tmp_path, monkeypatch):
    rec, engine, run = setup(tmp_path, on_spike="pma", pma_n=3, optimizer_state="reset")
    merged = []

    def fake_merge(inputs: list[Path], out: Path, st: StabilityConfig) -> None:
        """Average the inputs' weights into out/<newest tag>, with a manifest beside it."""
        merged.append((inputs, out, st.pma_strategy))
        weights = [torch.load(p / MODEL, weights_only=True) for p in inputs]
        state = {**weights[-1], "module": sum(w["module"] for w in weights) / len(weights)}
        (out / inputs[-1].name).mkdir(parents=True)
        torch.save(state, out / inputs[-1].name / MODEL)
        (out / "merge_manifest.json").write_text(json.dumps({"inputs": [str(p) for p in inputs]}))

    monkeypatch.setattr(recovery_mod, "merge_checkpoints", fake_merge)
    resumed = {}

    def loss(step, attempts):
        if attempts and "weight" not in resumed:
            resumed["weight"] = engine.weight - 1.0  # the reloaded weights, before this step
        return math.nan if (step, attempts) == (9, 0) else 5.0

    executed, _ = train(rec, engine, run, loss, end=10, every=2)
    out = run.recovery_dir(9, 1)
    assert merged == [([run.tag_dir(s) for s in (4, 6, 8)], out, "sma")]
    assert engine.loads == [(out, "global_step8", False)]
    assert resumed["weight"] == 6.0  # the mean of steps 4, 6 and 8
    assert executed == [*range(1, 10), 9, 10]
    assert (out / "merge_manifest.json").is_file() and not (out / "global_step8").exists()
    rec_event = events(run)[1]
    assert rec_event["checkpoints"] == ["global_step4", "global_step6", "global_step8"]
    assert events(run)[0]["kind"] == "nonfinite"
    state = next(iter(engine.optimizer.state.values()))
    assert all(not v.any() for v in state.values())  # optimizer_state=reset: zero moments


def test_pma_with_one_checkpoint_before_the_spike_reloads_it_and_a_failed_merge_stops(
        tmp_path, monkeypatch):
    rec, engine, run = setup(tmp_path, on_spike="pma", pma_n=3)
    train(rec, engine, run, lambda step, a: math.nan if (step, a) == (3, 0) else 5.0, end=4,
          every=2)
    assert engine.loads == [(run.checkpoints, "global_step2", False)]

    def broken(inputs, out, st):
        raise OSError("disk full")

    monkeypatch.setattr(recovery_mod, "merge_checkpoints", broken)
    rec, engine, run = setup(tmp_path / "b", on_spike="pma", pma_n=3)
    with pytest.raises(SpikeError, match=r"^pma recovery: merging \[2, 4\] failed: OSError: disk "):
        train(rec, engine, run, lambda step, _: math.nan if step == 5 else 5.0, end=6, every=2)
    assert engine.loads == []


def test_a_spike_before_any_checkpoint_gives_up(tmp_path):
    rec, engine, run = setup(tmp_path)
    with pytest.raises(SpikeError, match="^loss spike at step 1: no checkpoint is left before it"):
        train(rec, engine, run, lambda step, _: math.nan, end=4, every=2)
    assert engine.loads == []
    assert [e["event"] for e in events(run)] == ["spike", "gave_up"]


def test_a_poisoned_checkpoint_is_refused_before_the_engine_reads_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "MARKER"), "w"))

    rec, engine, run = setup(tmp_path)
    train(rec, engine, run, lambda step, _: 5.0, end=4, every=2)
    victim = run.tag_dir(4) / MODEL
    torch.save({"module": Payload()}, victim)  # loading it would create MARKER
    with pytest.raises(SpikeError) as e:
        rec.watch(Progress(5), math.nan, 1.0)
    assert str(e.value).startswith(f"loss spike at step 5: recovery refused: {victim}: refused")
    assert engine.loads == [] and not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("fail, why", [
    ("none", "DeepSpeed found no checkpoint"),
    ("raise", "RuntimeError: size mismatch for layer 0"),
])
def test_a_load_that_fails_stops_the_run(tmp_path, fail, why):
    rec, engine, run = setup(tmp_path)
    train(rec, engine, run, lambda step, _: 5.0, end=4, every=2)
    engine.fail = fail
    with pytest.raises(SpikeError) as e:
        rec.watch(Progress(5), math.nan, None)
    assert str(e.value) == f"recovery from {run.tag_dir(4)} failed: {why}"


def test_continue_logs_the_spike_and_its_end_and_reloads_nothing(tmp_path):
    rec, engine, run = setup(tmp_path, on_spike="continue")
    spiky = {9: 9.0, 10: 8.0, 11: 7.5}
    executed, _ = train(rec, engine, run, lambda step, _: spiky.get(step, 5.0), end=14, every=2)
    assert executed == list(range(1, 15)) and engine.loads == []
    ev = events(run)
    assert [(e["event"], e["step"]) for e in ev] == [("spike", 9), ("on_trend", 12)]
    assert ev[1]["stability/steps_to_trend"] == 3.0 and "attempt" not in ev[1]
    assert (rec.spikes, rec.attempts) == (1, 0)


def test_off_watches_nothing_and_the_nan_drill_fires_once(tmp_path):
    rec, _, _ = setup(tmp_path, on_spike="off")
    assert not rec.watching and not rec.inject_nan(1)  # inject_nan_step 0: no drill
    rec.saved(2)  # no detector: nothing to remember
    rec, _, _ = setup(tmp_path / "drill", inject_nan_step=5)
    assert rec.watching
    assert [rec.inject_nan(s) for s in (4, 5, 5, 6)] == [False, True, False, False]
