"""Live PMA for runs of the transformers ``Trainer``: :class:`PMACallback`.

    from moe_merge import PMACallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    trainer.add_callback(PMACallback(trainer))          # SMA of the latest 3 saves
    trainer.train()

At each save (``save_steps``; or every ``every``-th save), just before the Trainer writes the
checkpoint, every rank averages the weights it holds at the latest ``n`` saves (see
:mod:`moe_merge.live`: ZeRO 0-3 and AutoEP, no gathering), the Trainer's own evaluation loop
scores the merged weights on the eval dataset, the live weights are put back, and
``pma/eval_loss`` is logged through the Trainer's loggers (TensorBoard, W&B, ... as
``report_to`` says, and ``trainer_state.json``'s log history) with ``pma/eval_gap``: the live
model's ``eval_loss`` at that step minus it (taken from the Trainer's evaluation when it
evaluates at that step, else measured). Training continues bit for bit as without the callback:
the weights come back exactly, the optimizer is never touched and the random-number state is
restored after the evaluation.

``save_merged=DIR`` writes, when training ends, the merge of the latest ``n`` DeepSpeed
checkpoints on disk (``moe-merge merge OUTPUT_DIR --last n``, the same strategy) as an HF
model; they must still be there (``save_total_limit`` >= the window).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import TrainerCallback

from moe_merge.live import LivePMA, window_selection


class PMACallback(TrainerCallback):
    def __init__(self, trainer, n: int = 3, strategy: str = "sma", alpha: float = 0.2,
                 interval: int = 1, every: int = 1, min_n: int = 0, eval_dataset=None,
                 gap: bool = True, save_merged: str | Path | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.trainer = trainer
        self.options = {"n": n, "strategy": strategy, "alpha": alpha, "interval": interval,
                        "min_n": min_n}
        window_selection(**self.options)  # the options checked now
        self.every, self.gap = every, gap
        self.eval_dataset = eval_dataset
        self.save_merged = Path(save_merged) if save_merged is not None else None
        self.live: LivePMA | None = None
        self.saves = 0
        self.pending: tuple[int, float] | None = None  # (step, merged loss) awaiting eval_loss

    def _eval_loss(self) -> float:
        """The Trainer's evaluation loop on the eval dataset: its mean loss. Nothing is logged
        and the random-number state is as before."""
        trainer = self.trainer
        dataset = self.eval_dataset if self.eval_dataset is not None else trainer.eval_dataset
        if dataset is None:
            raise ValueError("PMACallback needs an eval dataset: pass eval_dataset= to the "
                             "Trainer or to the callback")
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            out = trainer.evaluation_loop(trainer.get_eval_dataloader(dataset),
                                          description="PMA", prediction_loss_only=True,
                                          metric_key_prefix="pma")
        return float(out.metrics["pma_loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not control.should_save:
            return control
        if self.live is None:
            self.live = LivePMA(model if model is not None else self.trainer.model,
                                **self.options)
        step = state.global_step
        self.live.update(step)
        self.saves += 1
        if self.saves % self.every:
            return control
        merged = self.live.evaluate(self._eval_loss)
        if merged is None:
            return control
        logs = {"pma/eval_loss": merged["pma/loss"], "pma/n": merged["pma/n"],
                "pma/first_step": merged["pma/first_step"], "pma/seconds": merged["pma/seconds"]}
        if self.gap:
            if control.should_evaluate and self.eval_dataset is None:
                self.pending = (step, merged["pma/loss"])  # the Trainer evaluates next
            else:
                logs["pma/eval_gap"] = self._eval_loss() - merged["pma/loss"]
        self._log(logs, control)
        return control

    def _log(self, logs: dict, control) -> None:
        """``trainer.log``, which clears ``control.should_log``: kept as it was, so the
        Trainer still logs this step's training loss after the callback has spoken."""
        keep = control.should_log
        self.trainer.log(logs)
        control.should_log = keep

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.pending is not None and self.pending[0] == state.global_step \
                and metrics and "eval_loss" in metrics:
            self._log({"pma/eval_gap": metrics["eval_loss"] - self.pending[1]}, control)
        self.pending = None
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.save_merged is None:
            return control
        if state.is_world_process_zero:
            from moe_merge.merge.merger import merge

            merge([args.output_dir], self.save_merged, window_selection(**self.options),
                  progress=False)
        with contextlib.suppress(RuntimeError, ValueError):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
        return control
