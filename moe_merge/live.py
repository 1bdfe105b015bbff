"""Live PMA for any DeepSpeed training loop: the merge of the latest checkpoints, in memory.

At each save, :meth:`LivePMA.update` keeps a host copy of the weights this rank holds. Then
:meth:`LivePMA.evaluate` (or ``with pma.merged():``) writes the weighted average of the window
into the model, runs the caller's evaluation and writes the latest weights back, exactly (they
are the newest copy), so training continues bit for bit as without it. The optimizer's master
weights and moments are never touched.

Averaging is linear, so every rank averages what it holds, with no gathering: under ZeRO 0/1/2
the module's weights (the full dense part and, under AutoEP or native MoE, the rank's own
experts), under ZeRO-3 the rank's partition of each parameter; full copies DeepSpeed keeps
gathered (parameters below ``stage3_param_persistence_threshold``) are dropped before and
after, so the forward pass of the evaluation gathers the merged values, and the next training
step the live ones, from the partitions. For fp32
training these are the fp32 master values and the merge is the one ``moe-merge merge`` writes;
for bf16 training they are the bf16 module copies (the merge then averages rounded weights).

A plain DeepSpeed loop::

    import deepspeed, torch
    from moe_merge import LivePMA

    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=model.parameters())
    pma = LivePMA(engine, n=3)                       # SMA of the latest 3 saves

    def eval_loss() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [engine(**batch).loss.item() for batch in eval_batches]
        engine.train()
        return sum(losses) / len(losses)

    for step, batch in enumerate(train_batches, 1):
        engine.backward(engine(**batch).loss)
        engine.step()
        if step % save_every == 0:
            engine.save_checkpoint(out_dir)
            pma.update(step)
            merged = pma.evaluate(eval_loss)         # None until the window is full
            if merged is not None:
                print(step, merged["pma/loss"], eval_loss())

Memory: ((n - 1) * interval + 1) host copies of what the rank holds (1/world of the model
under ZeRO-3). Cost per evaluation: n weighted sums over those copies, plus the caller's
evaluation.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import weighted_sum


def held_tensors(model) -> list[torch.Tensor]:
    """The weights this rank holds of ``model`` (a DeepSpeed engine or a torch module): each
    parameter's tensor, or its ZeRO-3 partition (``ds_tensor``)."""
    module = getattr(model, "module", model)
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]


def _release(params: list) -> None:
    """Drop the gathered full copies of ZeRO-3 parameters (those DeepSpeed keeps whole below
    ``stage3_param_persistence_threshold``, or still gathered), so that the next forward pass
    gathers them from the partitions again: the partitions are what :class:`LivePMA` writes."""
    whole = [p for p in params if getattr(p.ds_status, "name", "") == "AVAILABLE"]
    if whole:
        whole[0].partition(param_list=whole)


def window_selection(n: int = 3, strategy: str = "sma", alpha: float = 0.2, interval: int = 1,
                     min_n: int = 0) -> Selection:
    """The options of :class:`LivePMA`, checked (ValueError naming the bad one), as the
    selection of its window: every ``interval``-th save counted back from the newest, at most
    ``n`` of them."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if not 0 <= min_n <= n or min_n == 1:
        raise ValueError(f"min_n must be 0 or in 2..n={n}, got {min_n}")
    return Selection(strategy, alpha, every=interval, last=n)


class LivePMA:
    """The latest checkpoints of a run, merged in memory on every rank (see the module)."""

    def __init__(self, model, n: int = 3, strategy: str = "sma", alpha: float = 0.2,
                 interval: int = 1, min_n: int = 0):
        self.selection = window_selection(n, strategy, alpha, interval, min_n)
        self.tensors = held_tensors(model)
        module = getattr(model, "module", model)
        self.zero3 = [p for p in module.parameters() if hasattr(p, "ds_tensor")]
        self.keep = (n - 1) * interval + 1
        self.snapshots: deque[tuple[int, list[torch.Tensor]]] = deque(maxlen=self.keep)
        self.min_n = min_n or n

    def reset(self) -> None:
        """Forget the window (e.g. after the run went back to an older checkpoint)."""
        self.snapshots.clear()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Remember the weights of the checkpoint just saved at ``step``."""
        if self.snapshots and step < self.snapshots[-1][0]:
            self.reset()  # the run went back: the window restarts
        elif self.snapshots and step == self.snapshots[-1][0]:
            self.snapshots.pop()  # saved again at the same step: the newer copy counts
        self.snapshots.append((step, [t.detach().to("cpu", copy=True) for t in self.tensors]))

    def window(self) -> list[int]:
        """The steps the merge averages now (fewer than ``min_n``: not merged yet)."""
        return self.selection.choose([s for s, _ in self.snapshots], allow_fewer=True)

    @contextlib.contextmanager
    def merged(self) -> Iterator[dict[str, float] | None]:
        """Inside, the model holds the merged weights (yields what was merged, or None with
        the model untouched while the window holds fewer than ``min_n`` checkpoints); on
        leaving, the latest weights are back."""
        chosen = self.window()
        if len(chosen) < self.min_n:
            yield None
            return
        t0 = time.perf_counter()
        by_step = dict(self.snapshots)
        weights = self.selection.weights_for(len(chosen))
        snaps = [by_step[s] for s in chosen]
        latest = self.snapshots[-1][1]
        try:
            _release(self.zero3)
            with torch.no_grad():
                for i, t in enumerate(self.tensors):
                    merged = torch.from_numpy(weighted_sum([snap[i] for snap in snaps], weights))
                    t.copy_(merged.view(t.shape))
            yield {"pma/n": float(len(chosen)), "pma/first_step": float(chosen[0]),
                   "pma/merge_seconds": time.perf_counter() - t0}
        finally:
            with torch.no_grad():
                for t, saved in zip(self.tensors, latest):
                    t.copy_(saved)
            _release(self.zero3)  # the live values gathered again by the next forward

    def evaluate(self, fn: Callable[[], float]) -> dict[str, float] | None:
        """``fn()`` (a loss) of the merged weights, as ``{"pma/loss": ..., "pma/n": ...,
        "pma/first_step": ..., "pma/seconds": ...}``; None while the window is short."""
        t0 = time.perf_counter()
        with self.merged() as info:
            if info is None:
                return None
            loss = float(fn())
        return {"pma/loss": loss, "pma/n": info["pma/n"], "pma/first_step": info["pma/first_step"],
                "pma/seconds": time.perf_counter() - t0}
