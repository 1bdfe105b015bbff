"""The training loop: one DeepSpeed engine, deterministic data, WSD/cosine LR, checkpoints every V
tokens with sidecars, TensorBoard + metrics.jsonl, resume and fork; loss spikes are watched and
recovered from by :class:`~moe_merge.training.recovery.Recovery`.

Shape legend: B micro batch, S sequence length, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_merge.config.deepspeed import build_ds_config
from moe_merge.config.recipe import RecipeConfig, check_world_size, to_yaml
from moe_merge.errors import ConfigError, SpikeError
from moe_merge.training.data import Batches, TokenData, prepare, validation_windows
from moe_merge.training.distributed import compact_host_allocator, dist_env, init_distributed
from moe_merge.training.ds_workarounds import share_zero3_fp32_masters
from moe_merge.training.init_weights import build_initialised, build_zero3
from moe_merge.training.metrics import (
    MetricsLogger,
    ProgressBar,
    Throughput,
    expert_load_stats,
    host_memory,
)
from moe_merge.training.model import hf_config, import_model_code
from moe_merge.training.ops import cache_cpu_info
from moe_merge.training.origin import Origin
from moe_merge.training.pma_monitor import PMAMonitor
from moe_merge.training.recovery import Recovery
from moe_merge.training.run_dir import RunDir, tag_for
from moe_merge.training.schedule import Schedule

logger = logging.getLogger(__name__)

@dataclass
class StepStats:
    """Per-step values kept on device until the next log/checkpoint step."""
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor


@dataclass
class Tally:
    """The steps since the last log or checkpoint, and the newest global losses."""
    pending: list[StepStats] = field(default_factory=list)
    train_loss: float = math.nan  # LM loss of the newest reduced step (none before the first)
    val_loss: float | None = None


@dataclass(frozen=True)
class Due:
    """What follows optimizer step ``step``: logging the steps since the last log, validation,
    a checkpoint (every V tokens, and at the end unless the recipe says otherwise)."""
    log: bool
    val: bool
    save: bool

    @classmethod
    def at(cls, step: int, cfg: RecipeConfig, end: int, total: int) -> Due:
        every, val_every = cfg.checkpoint_every_steps, cfg.logging.val_every
        return cls(log=step % cfg.logging.log_every == 0 or step == end,
                   val=bool(val_every and step % val_every == 0) or step == end,
                   save=bool(every and step % every == 0) or (
                       step == end and (end < total or cfg.checkpoint.save_final)))


class Trainer:
    """One launch of a recipe: start-up (processes, data, engine, where it starts), then
    :meth:`fit`, the loop."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        compact_host_allocator()
        import_model_code(cfg.model.arch)
        self.memory_at_start = host_memory()  # after the imports, before anything is built
        self._start_processes()
        self.run = RunDir(cfg.run_dir)
        self.origin = Origin(cfg, self.run)
        self.origin.check(self.dist, self.device)  # before anything is written: no run dir
        self._load_data()
        self.schedule = Schedule.from_recipe(cfg)
        self.end = min(self.schedule.total_steps, cfg.train.stop_after_steps
                       or self.schedule.total_steps)
        self.grad_accum = cfg.grad_accum(self.world)
        self.ds_config = build_ds_config(cfg, self.world, self.run.root, on_gpu=not self.on_cpu)
        self.hf_config = hf_config(cfg.model, self.vocab)  # every rank: the imports in parallel
        self._check_memory()
        if self.rank == 0:  # the stored recipe says how many ranks ran (evaluations need it)
            ran = replace(cfg, parallel=replace(cfg.parallel, world_size=self.world))
            self.run.describe(to_yaml(ran), self.ds_config, self.hf_config,
                              self.data.tokenizer_dir)
        self.dist.barrier()
        self._build_engine()
        self.metrics = MetricsLogger(self.run.metrics, self.engine, enabled=self.rank == 0)
        self.pma = (PMAMonitor(self.engine.module, cfg.pma_monitor)
                    if cfg.pma_monitor.enabled else None)
        self.recovery = Recovery(cfg.stability, self.run, self.engine, self.metrics, self.dist,
                                 self._log0)
        self.tally = Tally()
        self.clock = Throughput(cfg.tokens_per_step)
        self.progress = self.origin.restore(self.engine, self.metrics, self._log0,
                                            self.rank == 0)
        self.memory_after_startup = host_memory()

    # ---- start-up ------------------------------------------------------------------------
    def _start_processes(self) -> None:
        """The process group (gloo on CPU) and this rank's device and CPU threads."""
        from deepspeed.accelerator import get_accelerator

        dist_env()
        self.on_cpu = get_accelerator().device_name() == "cpu"
        if self.on_cpu:
            cache_cpu_info()
            local_ws = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ws))
        init_distributed(self.on_cpu)
        self.dist = torch.distributed
        self.rank = self.dist.get_rank()
        self.world = self.dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_world_size(self.cfg, self.world)
        if not self.on_cpu:  # the device of the collectives that run before DeepSpeed's engine
            get_accelerator().set_device(self.local_rank)
        self.device = torch.device(get_accelerator().device_name(self.local_rank))

    def _check_memory(self) -> None:
        """parallel.device_memory against the memory plan at this world size: refused (one
        line, every rank) if it cannot fit, a warning with the changes that fit if it does not."""
        from moe_merge.training.memory_plan import check, gib

        verdict = check(self.cfg, self.world, self.ds_config)
        if verdict is not None and not verdict.fits:
            options = "; ".join(f"{c} (peak {gib(m.peak).strip()})" for c, m in verdict.options)
            self._log0(f"warning: the memory plan does not fit parallel.device_memory="
                       f"{self.cfg.parallel.device_memory} ({gib(verdict.usable).strip()} usable); "
                       f"it fits with: {options}")

    def _load_data(self) -> None:
        """Token cache (one process per node builds it, the others wait), batches, validation."""
        cfg = self.cfg
        built = prepare(cfg.data) if self.local_rank == 0 else None
        self.dist.barrier()
        self.data: TokenData = built or prepare(cfg.data)
        self.vocab = cfg.model.vocab_size or self.data.vocab_size
        self.batches = Batches(self.data.train, cfg.data.seq_len, cfg.seed)
        n_val = -(-cfg.logging.val_batches // self.world) * self.world
        self.val_windows = validation_windows(self.data.val, cfg.data.seq_len,
                                              n_val * cfg.parallel.micro_batch)

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        model = self._build_model()
        if cfg.model.activation_checkpointing:  # transformers' own, non-reentrant
            model.gradient_checkpointing_enable({"use_reentrant": False})
        self.aux_coef = cfg.model.router_aux_loss_coef if cfg.model.is_moe else 0.0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model), config=self.ds_config)
        self.device = self.engine.device
        if cfg.parallel.zero_stage == 3 and cfg.parallel.precision == "fp32":
            share_zero3_fp32_masters(self.optimizer)
        self._check_expert_placement()
        self.load_counters = [m.tokens_per_expert for m in self.engine.module.modules()
                              if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)]

    def _build_model(self) -> torch.nn.Module:
        """The model this rank hands to DeepSpeed, its weights drawn by
        :mod:`~moe_merge.training.init_weights` (the same for every layout). Under ZeRO-3 it is
        built inside ``deepspeed.zero.Init``: each rank only ever holds its own partitions
        and draws only those."""
        cfg, m = self.cfg, self.cfg.model
        init = self.origin.init
        if init is not None and init.format == "hf":  # every value is overwritten at once
            model = build_initialised(self.hf_config, cfg.seed, m.init_std)
            load_hf_weights(model, init.path)
            return model
        if cfg.parallel.zero_stage == 3:
            return build_zero3(self.hf_config, cfg.seed, m.init_std, self.ds_config)
        return build_initialised(self.hf_config, cfg.seed, m.init_std, self._local_experts())

    def _local_experts(self) -> tuple[int, int] | None:
        """The experts AutoEP gives this rank (ZeRO-1/2, EP > 1): DeepSpeed's expert-parallel
        groups are runs of ep_size consecutive ranks, each holding a contiguous block of experts
        (checked after the engine is built: :meth:`_check_expert_placement`)."""
        m, ep = self.cfg.model, self.cfg.parallel.ep_size
        if not m.is_moe or ep == 1:
            return None
        per_rank = m.num_experts // ep
        ep_rank = self.rank % ep
        return ep_rank * per_rank, (ep_rank + 1) * per_rank

    def _check_expert_placement(self) -> None:
        local = self._local_experts()
        if local is None or self.cfg.parallel.zero_stage == 3:
            return
        for name, module in self.engine.module.named_modules():
            ep_rank, n = getattr(module, "ep_rank", None), getattr(module, "num_local_experts", 0)
            if ep_rank is not None and n and (ep_rank * n, (ep_rank + 1) * n) != local:
                raise RuntimeError(f"{name}: AutoEP placed experts {ep_rank * n}.."
                                   f"{(ep_rank + 1) * n - 1} on rank {self.rank}, but "
                                   f"{local[0]}..{local[1] - 1} were drawn")

    def _log0(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[moe_merge] {msg}", flush=True)

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the schedule (or train.stop_after_steps); the run's summary."""
        cfg = self.cfg
        self._log0(f"run dir {self.run.root.resolve()}  |  {self.schedule.total_steps} steps x "
                   f"{cfg.tokens_per_step} tokens, checkpoint every "
                   f"{cfg.checkpoint_every_steps or '-'} steps, grad accum {self.grad_accum}, "
                   f"world {self.world}")
        bar = ProgressBar(self.rank == 0 and cfg.logging.progress, self.schedule.total_steps,
                          self.progress.step, cfg.name)
        if self.origin.init is not None:  # a PMA-init run's start: its exact weights and loss
            self._validate_and_log()
            self.save(self.tally.val_loss)
        elif cfg.checkpoint.save_initial and self.progress.step == 0:
            self.save(None)
        self.clock.restart(self.progress.step)
        while self.progress.step < self.end:
            self.tally.pending.append(self.train_step())
            if self._recovered(self.tally.pending[-1]):
                bar.jump(self.progress.step)
                continue
            due = Due.at(self.progress.step, cfg, self.end, self.schedule.total_steps)
            if due.log or due.save:
                self._reduce_and_log(due.log, bar)
            if due.val:
                self._validate_and_log()
            if due.save:
                self.save(self.tally.val_loss if due.val else None)
                self._monitor(due.val)
            bar.update()
        bar.close()
        return self._summary()

    def train_step(self) -> StepStats:
        cfg, step = self.cfg, self.progress.step
        mb = cfg.parallel.micro_batch
        first = (step + self.progress.data_offset) * cfg.parallel.global_batch + \
            self.rank * mb * self.grad_accum
        rows = torch.from_numpy(self.batches.samples(first, mb * self.grad_accum)).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(step)
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        inject = self.recovery.inject_nan(step + 1)  # a drill: this step's loss and grads NaN
        for micro in range(self.grad_accum):
            lm_loss, aux = self._forward_loss(rows[micro * mb:(micro + 1) * mb], with_aux=True)
            if inject:
                lm_loss = lm_loss * float("nan")
            self.engine.backward(lm_loss + self.aux_coef * aux)
            self.engine.step()
            lm_sum += lm_loss.detach()
            aux_sum += aux.detach()
        self.progress.step += 1
        return StepStats(lm_sum / self.grad_accum, aux_sum / self.grad_accum)

    def _forward_loss(self, window_BS: torch.Tensor, with_aux: bool):
        out = self.engine(input_ids=window_BS[:, :-1])
        logits_BSV = out.logits
        lm_loss = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
                                  window_BS[:, 1:].reshape(-1))
        aux = getattr(out, "aux_loss", None) if with_aux else None
        aux = aux.to(lm_loss.dtype) if isinstance(aux, torch.Tensor) else torch.zeros_like(lm_loss)
        return lm_loss, aux

    def _recovered(self, stats: StepStats) -> bool:
        """The spike watch of the step just taken. True when a recovery has reloaded a
        checkpoint: the steps since are dropped, and so is the PMA monitor's window."""
        if not self.recovery.watching:
            return False
        t = stats.lm_loss.detach().double().reshape(1).clone()
        self.dist.all_reduce(t)
        norm = self.engine.get_global_grad_norm()  # None without ZeRO: the loss alone is judged
        resumed = self.recovery.watch(self.progress, t.item() / self.world,
                                      None if norm is None else float(norm))
        if resumed is None:
            return False
        self.progress = resumed
        self.tally.pending.clear()
        if self.pma is not None:
            self.pma.reset()
        self.clock.restart(resumed.step)
        return True

    def _reduce_and_log(self, log: bool, bar: ProgressBar) -> None:
        """Reduce the pending steps to global losses (the newest goes into the next sidecar);
        with ``log``, their scalars to TensorBoard, metrics.jsonl and the progress bar."""
        tally, step = self.tally, self.progress.step
        t = torch.stack([torch.stack([s.lm_loss for s in tally.pending]),
                         torch.stack([s.aux_loss for s in tally.pending])]).double()
        self.dist.all_reduce(t)
        t /= self.world
        losses, aux = t[0].tolist(), t[1].mean().item()
        tally.pending.clear()
        tally.train_loss = losses[-1]
        if not log:
            return
        scalars = {"train/loss": sum(losses) / len(losses),
                   "train/lr": self.schedule.lr_at(step - 1),
                   "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                   "train/tokens": step * self.cfg.tokens_per_step,
                   "perf/tokens_per_s": self.clock.tokens_per_s(step)}
        scalars.update(self._memory_scalars())
        if self.load_counters:
            load_LE = torch.stack([c.detach().clone() for c in self.load_counters]).double()
            self.dist.all_reduce(load_LE)
            for c in self.load_counters:
                c.zero_()
            scalars["moe/aux_loss"] = aux
            scalars.update(expert_load_stats(load_LE))
            self.metrics.histogram("moe/expert_load", load_LE / load_LE.sum(1, keepdim=True), step)
        self.metrics.log(step, scalars)
        bar.show(scalars)

    def _memory_scalars(self) -> dict[str, float]:
        """Host memory in MiB, the largest over the ranks: resident now, peak so far, and the
        start-up and overall peaks above the resident set after the imports."""
        now, start, startup = host_memory(), self.memory_at_start, self.memory_after_startup
        if not (now and start and startup):
            return {}
        mib = torch.tensor([now["rss"], now["peak"], startup["peak"] - start["rss"],
                            now["peak"] - start["rss"]], dtype=torch.float64,
                           device=self.device) / 2**20
        self.dist.all_reduce(mib, op=self.dist.ReduceOp.MAX)
        return dict(zip(("mem/host_rss_mib", "mem/host_peak_mib",
                         "mem/startup_peak_above_imports_mib", "mem/peak_above_imports_mib"),
                        mib.tolist()))

    @torch.no_grad()
    def validate(self, batches: int = 0) -> float:
        """Mean LM loss over the fixed validation batches (the first ``batches`` of them, all
        if 0), each rank evaluating its share."""
        self.engine.eval()
        mb, windows = self.cfg.parallel.micro_batch, self.val_windows
        mine = windows.reshape(-1, self.world, mb, windows.shape[-1])[:, self.rank]
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

    def _validate_and_log(self) -> None:
        val = self.tally.val_loss = self.validate()
        self.metrics.log(self.progress.step, {"val/loss": val,
                                              "val/ppl": float(torch.tensor(val).exp())})

    def save(self, val_loss: float | None) -> None:
        """The checkpoint of the current step: DeepSpeed's tag, rank 0's sidecar and pruning.
        ``val_loss``: the step's validation loss, if it had one."""
        step, sched = self.progress.step, self.schedule
        self.engine.save_checkpoint(str(self.run.checkpoints), tag=tag_for(step),
                                    client_state=self.progress.client_state())
        self.recovery.saved(step)
        if self.rank == 0:
            info = {"tokens": step * self.cfg.tokens_per_step,
                    "lr": sched.lr_at(step - 1) if step else 0.0,
                    "phase": sched.phase(step - 1) if step else "init", "time": time.time()}
            if math.isfinite(self.tally.train_loss):  # none at a train.init_from start (step 0)
                info["train_loss"] = self.tally.train_loss
            if val_loss is not None:
                info["val_loss"] = val_loss
            self.run.write_sidecar(step, info)
            self.run.prune(self.cfg.checkpoint.keep_last)
        self.dist.barrier()

    def _monitor(self, with_val: bool) -> None:
        """The live PMA monitor at the checkpoint just saved: the merged window's loss."""
        if self.pma is None:
            return
        step = self.progress.step
        self.pma.snapshot(step)
        pma = self.pma.evaluate(lambda: self.validate(self.cfg.pma_monitor.val_batches))
        if pma is not None:
            if with_val:
                pma["pma/val_gap"] = self.tally.val_loss - pma["pma/val_loss"]
            self.metrics.log(step, pma)

    def _summary(self) -> dict:
        step = self.progress.step
        return {"run_dir": str(self.run.root.resolve()), "steps": step,
                "tokens": step * self.cfg.tokens_per_step,
                "final_train_loss": self.tally.train_loss, "final_val_loss": self.tally.val_loss,
                "checkpoints": [str(p) for _, p in self.run.tags()],
                "spikes": self.recovery.spikes, "recoveries": self.recovery.attempts}

    def close(self) -> None:
        """Flush the monitor and tear the process group down before interpreter exit."""
        tb = getattr(self.engine.monitor, "tb_monitor", None)
        if tb is not None and tb.summary_writer is not None:
            tb.summary_writer.close()
        self.dist.barrier()
        self.dist.destroy_process_group()


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
        print(f"[moe_merge] checkpoints:   {trainer.run.checkpoints.resolve()} "
              f"({len(summary['checkpoints'])} tags)", flush=True)
        print(f"[moe_merge] TensorBoard:   tensorboard --logdir {trainer.run.tb.resolve()}",
              flush=True)
    return summary
