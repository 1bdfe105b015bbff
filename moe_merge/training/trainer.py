"""The training loop: one DeepSpeed engine, deterministic data, WSD/cosine LR, checkpoints every V
tokens with sidecars, TensorBoard + metrics.jsonl, resume and fork.

Shape legend: B micro batch, S sequence length, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_merge.checkpoint import guard
from moe_merge.config.deepspeed import build_ds_config
from moe_merge.config.recipe import RecipeConfig, check_world_size, to_dict, to_yaml
from moe_merge.errors import CheckpointError, ConfigError, SpikeError
from moe_merge.training import run_dir as ckpt
from moe_merge.training.data import Batches, TokenData, prepare, validation_windows
from moe_merge.training.distributed import dist_env, init_distributed
from moe_merge.training.init_from import reset_optimizer_state, resolve_init
from moe_merge.training.metrics import MetricsLogger, expert_load_stats
from moe_merge.training.model import build_model, hf_config
from moe_merge.training.pma_monitor import PMAMonitor
from moe_merge.training.schedule import Schedule
from moe_merge.training.spikes import RetryCount, SpikeDetector, recovery_plan

logger = logging.getLogger(__name__)

# Recipe keys a resumed run must share with the run directory's recipe.yaml.
RESUME_INVARIANTS = ("seed", "model", "data.source", "data.seq_len", "data.vocab_size",
                     "data.tokenizer", "data.val_fraction", "parallel.global_batch")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def check_resume_compatible(cfg: RecipeConfig, stored_yaml: Path) -> None:
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(OmegaConf.load(stored_yaml))
    now = to_dict(cfg)
    for key in RESUME_INVARIANTS:
        try:
            old = _lookup(stored, key)
        except (KeyError, TypeError):
            continue
        if old != _lookup(now, key):
            raise ConfigError(f"key '{key}': differs from the run being resumed ({stored_yaml}); "
                              "use a new name, or train.fork_from to branch")


@dataclass
class StepStats:
    """Per-step values kept on device until the next log/checkpoint step."""
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor


class Trainer:
    def __init__(self, cfg: RecipeConfig):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        dist_env()
        self.cfg = cfg
        self.on_cpu = get_accelerator().device_name() == "cpu"
        if self.on_cpu:
            local_ws = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ws))
        init_distributed(self.on_cpu)
        self.dist = torch.distributed
        self.rank = self.dist.get_rank()
        self.world = self.dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_world_size(cfg, self.world)
        if not self.on_cpu:  # the device of the collectives that run before DeepSpeed's engine
            get_accelerator().set_device(self.local_rank)
        self.device = torch.device(get_accelerator().device_name(self.local_rank))
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        try:
            self.resume_tag = (guard.latest_tag(self.ckpt_dir) if cfg.train.resume == "auto"
                               else None)
        except CheckpointError as e:
            raise ConfigError(f"key 'train.resume': {e}") from None
        resuming = self.resume_tag is not None
        if self.run_dir.exists() and not resuming and ckpt.list_tags(self.ckpt_dir):
            raise ConfigError(f"key 'train.resume': run directory {self.run_dir} already has "
                              "checkpoints; set train.resume=auto or choose another name")
        if resuming and (self.run_dir / "recipe.yaml").exists():
            check_resume_compatible(cfg, self.run_dir / "recipe.yaml")
        self.resuming = resuming
        resuming_any = self.resuming or bool(cfg.train.fork_from)
        self.init = (resolve_init(cfg.train.init_from, cfg.train.init_optimizer)
                     if cfg.train.init_from and not resuming_any else None)
        self._check_source()  # before anything is written: a refused source leaves no run dir

        # Data: one process per node builds the cache, the others wait for it.
        if self.local_rank == 0:
            prepare(cfg.data)
        self.dist.barrier()
        self.data: TokenData = prepare(cfg.data)
        self.vocab = cfg.model.vocab_size or self.data.vocab_size
        self.batches = Batches(self.data.train, cfg.data.seq_len, cfg.seed)
        n_val = -(-cfg.logging.val_batches // self.world) * self.world
        self.val_windows = validation_windows(self.data.val, cfg.data.seq_len,
                                              n_val * cfg.parallel.micro_batch)
        self.schedule = Schedule.from_recipe(cfg)
        self.grad_accum = cfg.grad_accum(self.world)

        self.ds_config = build_ds_config(cfg, self.world, self.run_dir, on_gpu=not self.on_cpu)
        if self.rank == 0:
            self._write_run_files()
        self.dist.barrier()

        # Every rank builds the full fp32 model before DeepSpeed partitions it. Building under
        # deepspeed.zero.Init was tried: with AutoEP the experts come out NaN, for dense models
        # transformers' _init_weights no longer applies (see the issue notes).
        model = build_model(cfg.model, self.vocab, cfg.seed)
        if self.init is not None and self.init.format == "hf":
            load_hf_weights(model, self.init.path)
        self.aux_coef = cfg.model.router_aux_loss_coef if cfg.model.is_moe else 0.0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model), config=self.ds_config)
        self.device = self.engine.device
        self.load_counters = [m.tokens_per_expert for m in self.engine.module.modules()
                              if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)]
        self.metrics = MetricsLogger(self.run_dir, self.engine, enabled=self.rank == 0)
        self.pma = (PMAMonitor(self.engine.module, cfg.pma_monitor)
                    if cfg.pma_monitor.enabled else None)
        self.step = 0
        st = cfg.stability
        self.detector = SpikeDetector.from_config(st) if st.on_spike != "off" else None
        self.attempt = 0  # recoveries so far in this launch
        self.retry = RetryCount()
        self.data_offset = 0  # steps of batches skipped by recoveries (stability.skip_batches)
        self._trends: dict[int, tuple] = {}  # the detector's trends at each checkpoint
        self._injected = False
        self.spike_count = 0
        self._restore()

    # ---- run directory -------------------------------------------------------------------
    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(self.run_dir / "recipe.yaml", to_yaml(self.cfg))
        ckpt.write_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        hf_dir = self.run_dir / "hf"
        tmp = self.run_dir / ".hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_config(self.cfg.model, self.vocab).save_pretrained(str(tmp))
        if self.data.tokenizer_dir is not None and self.data.tokenizer_dir.is_dir():
            for f in self.data.tokenizer_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(hf_dir, ignore_errors=True)
        os.replace(tmp, hf_dir)

    def _check_source(self) -> None:
        """The checkpoint this launch will hand to DeepSpeed (resume, fork_from, a DeepSpeed
        init_from), checked by every rank (:func:`guard.check_tag`); a refusal is a
        ConfigError naming the key and the file."""
        cfg = self.cfg
        if self.resuming:
            key, load_dir, tag = "train.resume", self.ckpt_dir, self.resume_tag
        elif cfg.train.fork_from:
            fork = Path(cfg.train.fork_from)
            key, load_dir, tag = "train.fork_from", fork.parent, fork.name
        elif self.init is not None and self.init.format == "deepspeed":
            key, load_dir, tag = "train.init_from", self.init.load_dir, self.init.tag
        else:
            return
        try:
            guard.check_tag(load_dir, tag, self.dist, self.device)
        except CheckpointError as e:
            raise ConfigError(f"key '{key}': {e}") from None

    def _client_state(self, client, key: str, path) -> tuple[int, int]:
        """(step, data_offset) of a loaded checkpoint's client state."""
        try:
            state = client["moe_merge"]
            step, offset = state["step"], state.get("data_offset", 0)
            if type(step) is not int or type(offset) is not int or step < 0 or offset < 0:
                raise TypeError
        except (TypeError, KeyError, AttributeError):
            raise ConfigError(f"key '{key}': {path}: no moe_merge step and data offset (>= 0) "
                              "in its client state") from None
        return step, offset

    def _restore(self) -> None:
        cfg = self.cfg
        if self.resuming:
            path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self.resume_tag)
            self.step, self.data_offset = self._client_state(
                client, "train.resume", self.ckpt_dir / self.resume_tag)
            self._log0(f"resumed from {path} at step {self.step}")
            self.metrics.truncate_after(self.step)
        elif cfg.train.fork_from:
            fork = Path(cfg.train.fork_from)
            path, client = self.engine.load_checkpoint(str(fork.parent), tag=fork.name,
                                                       load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"key 'train.fork_from': DeepSpeed could not load {fork}")
            self.step, self.data_offset = self._client_state(client, "train.fork_from", fork)
            self._log0(f"forked from {fork} at step {self.step}")
            if self.rank == 0:
                ckpt.write_atomic(self.run_dir / "fork.json", json.dumps(
                    {"fork_from": str(fork.resolve()), "step": self.step}, indent=1))
        elif self.init is not None:
            self._init_weights()

    def _init_weights(self) -> None:
        """train.init_from: the merged (or checkpoint) weights at step 0 under this recipe's
        schedule, with the optimizer state the policy asks for; saved as global_step0."""
        src, policy = self.init, self.cfg.train.init_optimizer
        if src.format == "deepspeed":
            try:
                path, _ = self.engine.load_checkpoint(str(src.load_dir), tag=src.tag,
                                                      load_lr_scheduler_states=False)
            except Exception as e:  # DeepSpeed raises many kinds for a layout mismatch
                raise ConfigError(
                    f"key 'train.init_from': DeepSpeed could not load {src.load_dir / src.tag} "
                    f"({' '.join(str(e).split())[:300]}); it must come from a run with this "
                    "model and parallel layout (world size, ZeRO stage, ep_size), or use an HF "
                    "merge (--format hf) with train.init_optimizer=reset") from None
            if path is None:
                raise ConfigError(f"key 'train.init_from': DeepSpeed found no checkpoint in "
                                  f"{src.load_dir / src.tag}")
            if policy == "reset":
                reset_optimizer_state(self.optimizer)
            self.engine.global_steps = 0
            self.engine.global_samples = 0
        self.step = 0
        if self.rank == 0:
            ckpt.write_atomic(self.run_dir / "init.json", json.dumps(src.record(policy), indent=1))
        self._log0(f"initialised from {src.path} ({src.format}"
                   f"{', merged' if src.merged else ''}), optimizer state: {policy}")

    def _log0(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[moe_merge] {msg}", flush=True)

    # ---- one step ------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _forward_loss(self, window_BS: torch.Tensor, with_aux: bool):
        out = self.engine(input_ids=window_BS[:, :-1])
        logits_BSV = out.logits
        lm_loss = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
                                  window_BS[:, 1:].reshape(-1))
        aux = getattr(out, "aux_loss", None) if with_aux else None
        aux = aux.to(lm_loss.dtype) if isinstance(aux, torch.Tensor) else torch.zeros_like(lm_loss)
        return lm_loss, aux

    def train_step(self) -> StepStats:
        cfg, step = self.cfg, self.step
        mb = cfg.parallel.micro_batch
        first = (step + self.data_offset) * cfg.parallel.global_batch + self.rank * mb * \
            self.grad_accum
        rows = torch.from_numpy(self.batches.samples(first, mb * self.grad_accum)).to(self.device)
        self._set_lr(self.schedule.lr_at(step))
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        inject = cfg.stability.inject_nan_step == step + 1 and not self._injected
        for micro in range(self.grad_accum):
            lm_loss, aux = self._forward_loss(rows[micro * mb:(micro + 1) * mb], with_aux=True)
            if inject:  # a drill of the recovery path: this step's loss and gradients are NaN
                lm_loss = lm_loss * float("nan")
                self._injected = True
            self.engine.backward(lm_loss + self.aux_coef * aux)
            self.engine.step()
            lm_sum += lm_loss.detach()
            aux_sum += aux.detach()
        self.step += 1
        return StepStats(lm_sum / self.grad_accum, aux_sum / self.grad_accum)

    @torch.no_grad()
    def validate(self, batches: int = 0) -> float:
        """Mean LM loss over the fixed validation batches (the first ``batches`` of them, all
        if 0), each rank evaluating its share."""
        self.engine.eval()
        mb = self.cfg.parallel.micro_batch
        mine = self.val_windows.reshape(-1, self.world, mb, self.val_windows.shape[-1])[:, self.rank]
        if batches:
            mine = mine[:-(-batches // self.world)]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for window in mine:
            lm_loss, _ = self._forward_loss(torch.from_numpy(window).to(self.device), False)
            total += torch.tensor([lm_loss.item(), 1.0], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        for c in self.load_counters:  # validation routing is not training load
            c.zero_()
        self.engine.train()
        return (total[0] / total[1]).item()

    # ---- the loop ------------------------------------------------------------------------
    def _reduce_steps(self, pending: list[StepStats]) -> tuple[list[float], float]:
        """Global mean LM loss of each pending step, and the mean aux loss over them."""
        t = torch.stack([torch.stack([s.lm_loss for s in pending]),
                         torch.stack([s.aux_loss for s in pending])]).double()
        self.dist.all_reduce(t)
        t /= self.world
        return t[0].tolist(), t[1].mean().item()

    def _expert_load(self) -> torch.Tensor | None:
        if not self.load_counters:
            return None
        load_LE = torch.stack([c.detach().clone() for c in self.load_counters]).double()
        self.dist.all_reduce(load_LE)
        for c in self.load_counters:
            c.zero_()
        return load_LE

    def fit(self) -> dict:
        cfg, sched = self.cfg, self.schedule
        tps = cfg.tokens_per_step
        every = cfg.checkpoint_every_steps
        total = sched.total_steps
        end = min(total, cfg.train.stop_after_steps or total)
        self._log0(f"run dir {self.run_dir.resolve()}  |  {total} steps x {tps} tokens, "
                   f"checkpoint every {every or '-'} steps, grad accum {self.grad_accum}, "
                   f"world {self.world}")
        bar = None
        if self.rank == 0 and cfg.logging.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step",
                       dynamic_ncols=True, mininterval=2.0)
        pending: list[StepStats] = []
        last_loss = float("nan")
        val_loss = None
        if self.init is not None and self.step == 0 and not self.resuming:
            # the start of a PMA-init run: its exact weights and loss, for comparisons
            val_loss = self.validate()
            self.metrics.log(0, {"val/loss": val_loss,
                                 "val/ppl": float(torch.tensor(val_loss).exp())})
            self.save(0, float("nan"), val_loss)
        t_last, step_last = time.perf_counter(), self.step
        while self.step < end:
            pending.append(self.train_step())
            step = self.step
            if self.detector is not None and self._watch(pending[-1]):
                pending.clear()  # the spike's steps are dropped: reloaded from a checkpoint
                t_last, step_last = time.perf_counter(), self.step
                if bar is not None:
                    bar.n = self.step
                    bar.refresh()
                continue
            log_now = step % cfg.logging.log_every == 0 or step == end
            save_now = (every and step % every == 0) or (
                step == end and (end < total or cfg.checkpoint.save_final))
            val_now = (cfg.logging.val_every and step % cfg.logging.val_every == 0) or step == end
            if log_now or save_now:
                losses, aux = self._reduce_steps(pending)
                pending.clear()
                last_loss = losses[-1]
                if log_now:
                    now = time.perf_counter()
                    scalars = {
                        "train/loss": sum(losses) / len(losses),
                        "train/lr": sched.lr_at(step - 1),
                        "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                        "train/tokens": step * tps,
                        "perf/tokens_per_s": (step - step_last) * tps / (now - t_last),
                    }
                    load_LE = self._expert_load()
                    if load_LE is not None:
                        scalars["moe/aux_loss"] = aux
                        scalars.update(expert_load_stats(load_LE))
                        self.metrics.histogram("moe/expert_load",
                                               load_LE / load_LE.sum(1, keepdim=True), step)
                    self.metrics.log(step, scalars)
                    t_last, step_last = now, step
                    if bar is not None:
                        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                        lr=f"{scalars['train/lr']:.2e}",
                                        tok_s=f"{scalars['perf/tokens_per_s']:.0f}", refresh=False)
            if val_now:
                val_loss = self.validate()
                self.metrics.log(step, {"val/loss": val_loss,
                                        "val/ppl": float(torch.tensor(val_loss).exp())})
            if save_now:
                self.save(step, last_loss, val_loss if val_now else None)
                if self.pma is not None:
                    self.pma.snapshot(step)
                    pma = self.pma.evaluate(
                        lambda: self.validate(self.cfg.pma_monitor.val_batches))
                    if pma is not None:
                        if val_now:
                            pma["pma/val_gap"] = val_loss - pma["pma/val_loss"]
                        self.metrics.log(step, pma)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        summary = {"run_dir": str(self.run_dir.resolve()), "steps": self.step,
                   "tokens": self.step * tps, "final_train_loss": last_loss,
                   "final_val_loss": val_loss,
                   "checkpoints": [str(p) for _, p in ckpt.list_tags(self.ckpt_dir)],
                   "spikes": self.spike_count, "recoveries": self.attempt}
        return summary

    # ---- loss spikes -----------------------------------------------------------------------
    def _watch(self, stats: StepStats) -> bool:
        """Feed the step to the spike detector (every rank sees the same global values, so every
        rank decides alike). Returns True when a recovery has reloaded a checkpoint."""
        t = stats.lm_loss.detach().double().reshape(1).clone()
        self.dist.all_reduce(t)
        loss = t.item() / self.world
        norm = self.engine.get_global_grad_norm()  # None without ZeRO: the loss alone is judged
        norm = None if norm is None else float(norm)
        step = self.step
        spike, ended = self.detector.update(step, loss, norm)
        if ended is not None:
            self.metrics.log(step, {"stability/steps_to_trend": float(ended)}, event="on_trend")
            self._log0(f"back on trend at step {step}, {ended} steps after the spike")
        if spike is None:
            return False
        record = {"kind": spike.kind, "loss": loss, "grad_norm": norm,
                  "loss_trend": spike.loss_trend, "grad_norm_trend": spike.grad_norm_trend}
        self.spike_count += 1
        self.metrics.log(step, spike.scalars(), event="spike", extra=record)
        self.metrics.text("stability/events", f"step {step}: spike, {spike.describe()}", step)
        self._log0(f"loss spike at step {step}: {spike.describe()}")
        action = self.cfg.stability.on_spike
        if action == "continue":
            return False
        self._recover(step, action)
        return True

    def _recover(self, spike_step: int, action: str) -> None:
        """Reload the newest pre-spike checkpoint (rollback) or the merge of the last pma_n
        pre-spike checkpoints (pma), in process, and continue from its step. Rank 0 chooses
        (its view of the checkpoint directory) and every rank follows."""
        st = self.cfg.stability
        retry = self.retry.next(spike_step)
        plan = [None, None]
        if self.rank == 0:
            candidates = self.retry.candidates([s for s, _ in ckpt.list_tags(self.ckpt_dir)],
                                               spike_step)
            plan = [recovery_plan(candidates, action, st.pma_n), candidates]
        self.dist.broadcast_object_list(plan, src=0)
        chosen, candidates = plan
        if retry > st.max_retries or not chosen:
            why = (f"{retry} recoveries did not get past it" if chosen
                   else "no checkpoint is left before it")
            self.metrics.log(spike_step, {"stability/gave_up": 1.0}, event="gave_up",
                             extra={"retries": retry})
            raise SpikeError(f"loss spike at step {spike_step}: {why} (stability.on_spike="
                             f"{action}, max_retries={st.max_retries}); the run stops here, its "
                             "checkpoints are intact")
        tags = [ckpt.tag_for(s) for s in chosen]
        t0 = time.perf_counter()
        if action == "pma" and len(chosen) > 1:
            load_dir = self.run_dir / "recovery" / f"spike{spike_step}_attempt{self.attempt + 1}"
            self._merge_for_recovery(chosen, load_dir)
        else:
            load_dir = self.ckpt_dir
        try:
            guard.check_tag(load_dir, tags[-1], self.dist, self.device)
        except CheckpointError as e:  # every rank raises (check_tag agrees)
            raise SpikeError(f"loss spike at step {spike_step}: recovery refused: {e}") from None
        error = None
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tags[-1],
                                                  load_lr_scheduler_states=False)
            if path is None:
                error = "DeepSpeed found no checkpoint"
        except Exception as e:  # agreed on by every rank below, then raised on all of them
            error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        self.dist.all_reduce(failed)
        if failed.item():
            raise SpikeError(f"recovery from {load_dir / tags[-1]} failed"
                             f"{f': {error}' if error else ' on another rank'}")
        if st.optimizer_state == "reset":
            reset_optimizer_state(self.optimizer)
        # a replayed spike is a new one (it gets another recovery); trends as at the checkpoint
        self.detector.restart(self._trends.get(chosen[-1]))
        if self.pma is not None:
            self.pma.snapshots.clear()  # the window restarts on the recovered trajectory
        self.attempt += 1
        self.metrics.attempt = self.attempt
        self.step = chosen[-1]
        self.retry.resumed(self.step)
        self.data_offset += st.skip_batches
        self.dist.barrier()
        if self.rank == 0 and load_dir != self.ckpt_dir:  # keep the manifest, drop the copy
            shutil.rmtree(load_dir / tags[-1], ignore_errors=True)
        seconds = time.perf_counter() - t0
        record = {"action": action, "spike_step": spike_step, "resume_step": self.step,
                  "checkpoints": tags, "retry": retry, "seconds": round(seconds, 3),
                  "optimizer_state": st.optimizer_state, "data_offset": self.data_offset}
        self.metrics.log(spike_step, {"stability/recovery": 1.0,
                                      "stability/resume_step": float(self.step)},
                         event="recovery", extra=record)
        what = f"the merge ({st.pma_strategy}) of {', '.join(tags)}" if len(tags) > 1 else tags[0]
        self.metrics.text("stability/events", f"step {spike_step}: {action} recovery from "
                                              f"{what}, resumed at step {self.step}", spike_step)
        self._log0(f"recovered ({action}, attempt {self.attempt}) from {what}: resumed at step "
                   f"{self.step} ({seconds:.1f} s)")

    def _merge_for_recovery(self, steps: list[int], out: Path) -> None:
        """Rank 0 writes the merge of ``steps`` as a DeepSpeed checkpoint; every rank learns
        whether it succeeded."""
        from moe_merge.merge.merger import merge

        st = self.cfg.stability
        error = None
        if self.rank == 0:
            try:
                merge([self.ckpt_dir / ckpt.tag_for(s) for s in steps], out, fmt="deepspeed",
                      strategy=st.pma_strategy, alpha=st.pma_alpha if st.pma_strategy == "ema"
                      else None, optimizer_state=st.optimizer_state, overwrite=True,
                      progress=False, echo=lambda _: None)
            except Exception as e:  # reported on every rank below
                error = f"{type(e).__name__}: {e}"
        box = [error]
        self.dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise SpikeError(f"pma recovery: merging {steps} failed: {box[0]}")

    def close(self) -> None:
        """Flush the monitor and tear the process group down before interpreter exit."""
        tb = getattr(self.engine.monitor, "tb_monitor", None)
        if tb is not None and tb.summary_writer is not None:
            tb.summary_writer.close()
        self.dist.barrier()
        self.dist.destroy_process_group()

    def save(self, step: int, train_loss: float, val_loss: float | None) -> None:
        tag = ckpt.tag_for(step)
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag,
                                    client_state={"moe_merge": {"step": step,
                                                                "data_offset": self.data_offset}})
        if self.detector is not None:
            self._trends[step] = self.detector.trends()
        if self.rank == 0:
            info = {"tokens": step * self.cfg.tokens_per_step,
                    "lr": self.schedule.lr_at(step - 1) if step else 0.0,
                    "phase": self.schedule.phase(step - 1) if step else "init",
                    "time": time.time()}
            if math.isfinite(train_loss):  # none at a train.init_from start (step 0)
                info["train_loss"] = train_loss
            if val_loss is not None:
                info["val_loss"] = val_loss
            ckpt.write_sidecar(self.ckpt_dir, step, info)
            ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        self.dist.barrier()


def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on norms and vectors. DeepSpeed's MoE support needs the
    "name" key on every group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"name": "decay", "params": decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def load_hf_weights(model: torch.nn.Module, hf_dir: Path) -> None:
    """Copy an HF model directory's safetensors weights into ``model`` (the recipe's model,
    before DeepSpeed wraps it); a mismatch is a ConfigError naming the tensor."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    own = model.state_dict()
    for name, t in state.items():
        if name not in own:
            raise ConfigError(f"key 'train.init_from': {hf_dir} has tensor {name}, which the "
                              f"recipe's model ({type(model).__name__}) does not")
        if tuple(own[name].shape) != tuple(t.shape):
            raise ConfigError(f"key 'train.init_from': {hf_dir}: {name} has shape "
                              f"{tuple(t.shape)}, the recipe's model {tuple(own[name].shape)}")
    missing = [k for k in own if k not in state
               and not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings",
                                                          False))]
    if missing:
        raise ConfigError(f"key 'train.init_from': {hf_dir} lacks {missing[0]} "
                          f"({len(missing)} tensors missing)")
    model.load_state_dict(state, strict=False)


def run(cfg: RecipeConfig) -> dict:
    try:
        trainer = Trainer(cfg)
    except ConfigError:  # a refusal at start-up (every rank): no gloo threads left at exit
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # the ConfigError is the news, not a teardown that failed
                pass
        raise
    try:
        summary = trainer.fit()
    except SpikeError:
        trainer.close()
        raise
    trainer.close()
    if trainer.rank == 0:
        if summary["final_val_loss"] is None:  # resumed a run that had already finished
            print(f"[moe_merge] nothing to do: the run is complete at step {summary['steps']} "
                  f"({summary['tokens']:,} tokens)", flush=True)
        else:
            print(f"[moe_merge] done: {summary['steps']} steps, {summary['tokens']:,} tokens, "
                  f"final train loss {summary['final_train_loss']:.4f}, val loss "
                  f"{summary['final_val_loss']:.4f}", flush=True)
            if cfg.stability.on_spike != "off":
                print(f"[moe_merge] loss spikes: {summary['spikes']}, recoveries: "
                      f"{summary['recoveries']}", flush=True)
        print(f"[moe_merge] run directory: {summary['run_dir']}", flush=True)
        print(f"[moe_merge] checkpoints:   {trainer.ckpt_dir.resolve()} "
              f"({len(summary['checkpoints'])} tags)", flush=True)
        print(f"[moe_merge] TensorBoard:   tensorboard --logdir {trainer.run_dir.resolve() / 'tb'}",
              flush=True)
    return summary
