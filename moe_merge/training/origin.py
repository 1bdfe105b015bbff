"""Where a launch starts: a new run, the run's latest tag (``train.resume=auto``), a tag of
another run (``train.fork_from``), or ``train.init_from`` weights at step 0; each checked before
DeepSpeed reads it, and restored into the engine after it is built.
"""

from __future__ import annotations

from pathlib import Path

from moe_merge.checkpoint import guard
from moe_merge.config.recipe import RecipeConfig, to_dict
from moe_merge.errors import CheckpointError, ConfigError
from moe_merge.training.init_from import reset_optimizer_state, resolve_init
from moe_merge.training.metrics import MetricsLogger
from moe_merge.training.run_dir import Progress, RunDir

# Recipe keys a resumed run must share with the run directory's recipe.yaml.
RESUME_INVARIANTS = ("seed", "model", "data.source", "data.seq_len", "data.vocab_size",
                     "data.tokenizer", "data.val_fraction", "parallel.global_batch")
# Model keys that say how the model is computed, not what it is: a resume may change them.
MODEL_RUNTIME_KEYS = ("activation_checkpointing", "attn_implementation")


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
        new = _lookup(now, key)
        if key == "model" and isinstance(old, dict):
            old = {k: v for k, v in old.items() if k not in MODEL_RUNTIME_KEYS}
            new = {k: v for k, v in new.items() if k not in MODEL_RUNTIME_KEYS}
        if old != new:
            raise ConfigError(f"key '{key}': differs from the run being resumed ({stored_yaml}); "
                              "use a new name, or train.fork_from to branch")


class Origin:
    """Where a launch starts: a new run, the run's latest tag (train.resume=auto), a tag of
    another run (train.fork_from), or train.init_from weights at step 0."""

    def __init__(self, cfg: RecipeConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.resume_tag = self._resume_tag()
        fresh = self.resume_tag is None and not cfg.train.fork_from
        self.init = (resolve_init(cfg.train.init_from, cfg.train.init_optimizer)
                     if cfg.train.init_from and fresh else None)

    def _resume_tag(self) -> str | None:
        """The tag train.resume=auto continues from (None: a new run, which may not reuse a
        directory holding checkpoints); its recipe must agree with the stored one."""
        try:
            tag = self.run.latest() if self.cfg.train.resume == "auto" else None
        except CheckpointError as e:
            raise ConfigError(f"key 'train.resume': {e}") from None
        if tag is None and self.run.tags():
            raise ConfigError(f"key 'train.resume': run directory {self.run.root} already has "
                              "checkpoints; set train.resume=auto or choose another name")
        if tag is not None and self.run.recipe.exists():
            check_resume_compatible(self.cfg, self.run.recipe)
        return tag

    def check(self, dist, device) -> None:
        """The checkpoint this launch will hand to DeepSpeed (resume, fork_from, a DeepSpeed
        init_from), checked by every rank (:func:`guard.check_tag`); a refusal is a
        ConfigError naming the key and the file."""
        fork = Path(self.cfg.train.fork_from) if self.cfg.train.fork_from else None
        if self.resume_tag is not None:
            key, load_dir, tag = "train.resume", self.run.checkpoints, self.resume_tag
        elif fork is not None:
            key, load_dir, tag = "train.fork_from", fork.parent, fork.name
        elif self.init is not None and self.init.format == "deepspeed":
            key, load_dir, tag = "train.init_from", self.init.load_dir, self.init.tag
        else:
            return
        try:
            guard.check_tag(load_dir, tag, dist, device)
        except CheckpointError as e:
            raise ConfigError(f"key '{key}': {e}") from None

    def restore(self, engine, metrics: MetricsLogger, echo, rank0: bool) -> Progress:
        """Load the checkpoint this launch continues (resume) or branches from (fork_from), or
        the train.init_from weights (``engine`` holds HF ones already); where training starts.
        ``echo``: rank 0's console; ``rank0``: this rank writes fork.json / init.json."""
        ckpts, fork = self.run.checkpoints, self.cfg.train.fork_from
        if self.resume_tag is not None:
            path, client = engine.load_checkpoint(str(ckpts), tag=self.resume_tag)
            progress = Progress.from_client_state(client, "train.resume", ckpts / self.resume_tag)
            echo(f"resumed from {path} at step {progress.step}")
            metrics.truncate_after(progress.step)
        elif fork:
            fork = Path(fork)
            path, client = engine.load_checkpoint(str(fork.parent), tag=fork.name,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"key 'train.fork_from': DeepSpeed could not load {fork}")
            progress = Progress.from_client_state(client, "train.fork_from", fork)
            echo(f"forked from {fork} at step {progress.step}")
            if rank0:
                self.run.write_json("fork.json", {"fork_from": str(fork.resolve()),
                                                  "step": progress.step})
        else:
            progress = Progress()
            if self.init is not None:
                self._init_weights(engine, echo, rank0)
        return progress

    def _init_weights(self, engine, echo, rank0: bool) -> None:
        """train.init_from: the merged (or checkpoint) weights at step 0 under this recipe's
        schedule, with the optimizer state the policy asks for (saved as global_step0 by fit)."""
        src, policy = self.init, self.cfg.train.init_optimizer
        if src.format == "deepspeed":
            load_init_checkpoint(engine, src)
            if policy == "reset":
                reset_optimizer_state(engine.optimizer)
            engine.global_steps = 0
            engine.global_samples = 0
        if rank0:
            self.run.write_json("init.json", src.record(policy))
        echo(f"initialised from {src.path} ({src.format}"
             f"{', merged' if src.merged else ''}), optimizer state: {policy}")


def load_init_checkpoint(engine, src) -> None:
    """The DeepSpeed checkpoint of a train.init_from source into ``engine`` (without its LR
    scheduler); a layout it cannot take is a ConfigError naming the key."""
    try:
        path, _ = engine.load_checkpoint(str(src.load_dir), tag=src.tag,
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
