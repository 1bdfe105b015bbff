"""Loss-spike recovery in process (``stability.*``): watch every optimizer step and, on a spike,
reload the newest pre-spike checkpoint (rollback) or the merge of the last ``pma_n`` of them
(pma) through the engine, then continue from its step.

:class:`Recovery` holds all of it: the spike detector and its trends at each checkpoint, the
retry count of the spike being recovered from, the spikes and recoveries so far, and the NaN
drill (``stability.inject_nan_step``). ``engine`` is anything with DeepSpeed's
``load_checkpoint``, ``optimizer``, ``device`` and ``monitor``; ``dist`` is
``torch.distributed`` with a process group up (or a stand-in with its collectives). Rank 0
chooses the checkpoints (its view of the directory) and every rank follows; a failure on any
rank raises :class:`SpikeError` on all of them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe_merge.checkpoint import guard
from moe_merge.config.recipe import StabilityConfig
from moe_merge.errors import CheckpointError, SpikeError
from moe_merge.training.init_from import reset_optimizer_state
from moe_merge.training.metrics import MetricsLogger
from moe_merge.training.run_dir import Progress, RunDir, tag_for
from moe_merge.training.spikes import RetryCount, SpikeDetector, recovery_plan


def merge_checkpoints(inputs: list[Path], out: Path, st: StabilityConfig) -> None:
    """The pma recovery's merge: ``inputs`` averaged by ``stability.pma_strategy`` into ``out``,
    a DeepSpeed checkpoint with the Adam state ``stability.optimizer_state`` names."""
    from moe_merge.merge.merger import OutputOptions, merge
    from moe_merge.merge.selection import Selection

    selection = Selection(st.pma_strategy, st.pma_alpha if st.pma_strategy == "ema" else None)
    output = OutputOptions("deepspeed", overwrite=True, optimizer_state=st.optimizer_state)
    merge(inputs, out, selection, output, progress=False, echo=lambda _: None)


class Recovery:
    """Spike watching and in-process recovery of one launch (see the module docstring)."""

    def __init__(self, st: StabilityConfig, run: RunDir, engine, metrics: MetricsLogger, dist,
                 echo: Callable[[str], None] = lambda _: None):
        self.st, self.run, self.engine, self.metrics, self.dist = st, run, engine, metrics, dist
        self.rank = dist.get_rank()
        self.echo = echo  # rank 0's console
        self.detector = SpikeDetector.from_config(st) if st.on_spike != "off" else None
        self.retry = RetryCount()
        self.attempts = 0  # recoveries so far
        self.spikes = 0
        self._trends: dict[int, tuple] = {}  # the detector's trends at each checkpoint
        self._injected = False

    @property
    def watching(self) -> bool:
        return self.detector is not None

    def inject_nan(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) gets a NaN loss and gradients: the
        drill of ``stability.inject_nan_step``, once per launch (a replayed step is clean)."""
        if self._injected or step != self.st.inject_nan_step:
            return False
        self._injected = True
        return True

    def saved(self, step: int) -> None:
        """The checkpoint of ``step`` was saved: remember the trends a reload of it restores."""
        if self.detector is not None:
            self._trends[step] = self.detector.trends()

    def watch(self, at: Progress, loss: float, grad_norm: float | None) -> Progress | None:
        """Judge the step just taken (``at.step``) by its global loss and gradient norm (the same
        on every rank, so every rank decides alike; ``grad_norm`` None: not available). Returns
        the progress to continue from when a recovery has reloaded a checkpoint, else None."""
        step = at.step
        spike, ended = self.detector.update(step, loss, grad_norm)
        if ended is not None:
            self.metrics.log(step, {"stability/steps_to_trend": float(ended)}, event="on_trend")
            self.echo(f"back on trend at step {step}, {ended} steps after the spike")
        if spike is None:
            return None
        self.spikes += 1
        record = {"kind": spike.kind, "loss": loss, "grad_norm": grad_norm,
                  "loss_trend": spike.loss_trend, "grad_norm_trend": spike.grad_norm_trend}
        self.metrics.log(step, spike.scalars(), event="spike", extra=record)
        self.metrics.text("stability/events", f"step {step}: spike, {spike.describe()}", step)
        self.echo(f"loss spike at step {step}: {spike.describe()}")
        if self.st.on_spike == "continue":
            return None
        return self.recover(step, at.data_offset)

    def recover(self, spike_step: int, data_offset: int) -> Progress:
        """Reload the checkpoint (or merge) the plan names for a spike at ``spike_step``; raises
        SpikeError when none is left or the retries are used up (the run stops there)."""
        st, action = self.st, self.st.on_spike
        retry = self.retry.next(spike_step)
        chosen = self._choose(spike_step)
        if retry > st.max_retries or not chosen:
            self._give_up(spike_step, retry, bool(chosen))
        tags = [tag_for(s) for s in chosen]
        t0 = time.perf_counter()
        load_dir = self.run.checkpoints
        if action == "pma" and len(chosen) > 1:
            load_dir = self.run.recovery_dir(spike_step, self.attempts + 1)
            self._merge(chosen, load_dir)
        self._reload(spike_step, load_dir, tags[-1])
        # a replayed spike is a new one (it gets another recovery); trends as at the checkpoint
        self.detector.restart(self._trends.get(chosen[-1]))
        self.attempts += 1
        self.metrics.attempt = self.attempts
        resumed = Progress(chosen[-1], data_offset + st.skip_batches)
        self.retry.resumed(resumed.step)
        self.dist.barrier()
        if self.rank == 0 and load_dir != self.run.checkpoints:  # keep the manifest, drop the copy
            shutil.rmtree(load_dir / tags[-1], ignore_errors=True)
        self._report(spike_step, resumed, tags, retry, time.perf_counter() - t0)
        return resumed

    def _choose(self, spike_step: int) -> list[int]:
        """The checkpoint steps this recovery reloads, as rank 0 sees the directory."""
        box: list = [None]
        if self.rank == 0:
            candidates = self.retry.candidates(self.run.steps(), spike_step)
            box = [recovery_plan(candidates, self.st.on_spike, self.st.pma_n)]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def _give_up(self, spike_step: int, retry: int, had_checkpoint: bool) -> None:
        st = self.st
        why = (f"{retry} recoveries did not get past it" if had_checkpoint
               else "no checkpoint is left before it")
        self.metrics.log(spike_step, {"stability/gave_up": 1.0}, event="gave_up",
                         extra={"retries": retry})
        raise SpikeError(f"loss spike at step {spike_step}: {why} (stability.on_spike="
                         f"{st.on_spike}, max_retries={st.max_retries}); the run stops here, its "
                         "checkpoints are intact")

    def _merge(self, steps: list[int], out: Path) -> None:
        """Rank 0 writes the merge of ``steps`` as a DeepSpeed checkpoint in ``out``; every rank
        learns whether it succeeded."""
        error = None
        if self.rank == 0:
            try:
                merge_checkpoints([self.run.tag_dir(s) for s in steps], out, self.st)
            except Exception as e:  # reported on every rank below
                error = f"{type(e).__name__}: {e}"
        box = [error]
        self.dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise SpikeError(f"pma recovery: merging {steps} failed: {box[0]}")

    def _reload(self, spike_step: int, load_dir: Path, tag: str) -> None:
        """``load_dir/tag`` checked (:func:`guard.check_tag`) and loaded into the engine, without
        its LR scheduler (the schedule is the recipe's); Adam's moments reset if asked."""
        try:
            guard.check_tag(load_dir, tag, self.dist, self.engine.device)
        except CheckpointError as e:  # every rank raises (check_tag agrees)
            raise SpikeError(f"loss spike at step {spike_step}: recovery refused: {e}") from None
        error = None
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag,
                                                  load_lr_scheduler_states=False)
            if path is None:
                error = "DeepSpeed found no checkpoint"
        except Exception as e:  # agreed on by every rank below, then raised on all of them
            error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.engine.device)
        self.dist.all_reduce(failed)
        if failed.item():
            raise SpikeError(f"recovery from {load_dir / tag} failed"
                             f"{f': {error}' if error else ' on another rank'}")
        if self.st.optimizer_state == "reset":
            reset_optimizer_state(self.engine.optimizer)

    def _report(self, spike_step: int, resumed: Progress, tags: list[str], retry: int,
                seconds: float) -> None:
        st, action = self.st, self.st.on_spike
        record = {"action": action, "spike_step": spike_step, "resume_step": resumed.step,
                  "checkpoints": tags, "retry": retry, "seconds": round(seconds, 3),
                  "optimizer_state": st.optimizer_state, "data_offset": resumed.data_offset}
        self.metrics.log(spike_step, {"stability/recovery": 1.0,
                                      "stability/resume_step": float(resumed.step)},
                         event="recovery", extra=record)
        what = f"the merge ({st.pma_strategy}) of {', '.join(tags)}" if len(tags) > 1 else tags[0]
        self.metrics.text("stability/events", f"step {spike_step}: {action} recovery from "
                                              f"{what}, resumed at step {resumed.step}", spike_step)
        self.echo(f"recovered ({action}, attempt {self.attempts}) from {what}: resumed at step "
                  f"{resumed.step} ({seconds:.1f} s)")
