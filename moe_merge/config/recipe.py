"""Recipe schema and loading.

Dataclasses are the schema, YAML files are data. Loading goes: structured schema -> recipe YAML
-> ``key=value`` overrides -> dataclass objects -> validation. Every problem surfaces as one
:class:`ConfigError` that names the recipe file and the key. OmegaConf is used only here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_merge.errors import ConfigError
from moe_merge.merge.strategies import OPTIMIZER_POLICIES, STRATEGIES

MOE_ARCHS = ("qwen3_moe", "mixtral")
DENSE_ARCHS = ("qwen3", "llama")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SPIKE_ACTIONS = ("off", "continue", "rollback", "pma")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    arch: str = "qwen3_moe"
    """HF architecture: qwen3_moe or mixtral (MoE), qwen3 or llama (dense)."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes the tokenizer's (data.vocab_size)."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    head_dim: int = 32
    """Per-head dimension."""
    intermediate_size: int = 512
    """FFN width of dense layers (dense archs)."""
    moe_intermediate_size: int = 128
    """FFN width of one expert (MoE archs)."""
    num_experts: int = 8
    """Routed experts per MoE layer (MoE archs)."""
    top_k: int = 2
    """Experts each token is routed to."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss added to the LM loss."""
    max_position_embeddings: int = 4096
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the LM head."""
    init_std: float = 0.02
    """Std of the normal initialisation."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input in the forward pass and recompute the block in
    the backward pass (transformers' gradient checkpointing, non-reentrant): activation memory
    falls to the layer inputs plus one block's, for about a third more compute. The losses and
    gradients are those of a run without it."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (torch's scaled_dot_product_attention, which picks a fused kernel
    on GPUs), eager (plain matmul + softmax), or flash_attention_2 (needs the flash-attn package
    and a GPU)."""

    @property
    def is_moe(self) -> bool:
        return self.arch in MOE_ARCHS


@dataclass
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (this Python's own standard-library sources, no download), or a path: a .txt
    file, a .jsonl file, a directory of such files, or a pre-tokenized .bin (uint16/uint32)."""
    jsonl_key: str = "text"
    """Field holding the text in JSONL records."""
    bin_dtype: str = "uint16"
    """Token dtype of a pre-tokenized .bin source (uint16 or uint32)."""
    tokenizer: str = ""
    """HF tokenizer directory to use; empty trains a byte-level BPE on the training split."""
    vocab_size: int = 4096
    """Vocabulary of the locally trained tokenizer (and of a .bin source)."""
    tokenizer_train_bytes: float = 4e6
    """Bytes of training text the local tokenizer is trained on."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (split by a hash of the document id)."""
    cache_dir: str = ""
    """Where tokenizers and token memmaps are cached; empty: $MOE_MERGE_CACHE or
    ~/.cache/moe_merge."""


@dataclass
class OptimizerConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class ScheduleConfig:
    kind: str = "wsd"
    """wsd (warmup-stable-decay) or cosine."""
    warmup_tokens: float = 0.0
    """Tokens of linear warmup from 0 to train.lr."""
    decay_tokens: float = 0.0
    """WSD: tokens of decay at the end of train.max_tokens (0: no decay, constant LR to the end)."""
    decay_shape: str = "1-sqrt"
    """WSD decay shape: linear, cosine or 1-sqrt."""
    min_lr_ratio: float = 0.0
    """LR at the end of the decay, as a fraction of train.lr."""


@dataclass
class ParallelConfig:
    world_size: int = 0
    """Ranks the recipe is written for (launch/train.sh starts this many); 0: whatever the
    launcher starts. The trainer refuses a launch with a different count."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3; picks the bundled zero<stage>.json unless ds_config is set."""
    ds_config: str = ""
    """DeepSpeed engine-settings JSON: a file, or a bundled name (gpu_zero2.json); empty:
    zero<stage>."""
    ep_size: int = 1
    """Expert-parallel size (DeepSpeed AutoEP); 1 keeps every expert on every rank."""
    micro_batch: int = 8
    """Sequences per rank per micro step."""
    global_batch: int = 16
    """Sequences per optimizer step over all ranks (= micro_batch x grad_accum x world_size)."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 compute with fp32 master weights; needs ZeRO stage 1-3)."""
    device_memory: str = ""
    """Memory of one rank's device (80GB, 80GiB; on CPU, the host memory per rank): --dry-run
    says whether the run fits and what to change if not, and a launch that cannot fit at any
    micro batch is refused before any rank starts. Empty: not checked."""


@dataclass
class CheckpointConfig:
    every_tokens: float = 0.0
    """Save a checkpoint every this many tokens (the paper's interval V); 0 saves only at the
    end."""
    keep_last: int = 0
    """Keep only the newest k checkpoints; 0 keeps all."""
    save_final: bool = True
    """Also save at the end of training."""
    save_initial: bool = False
    """Also save the initial weights as global_step0 (before the first step of a new run)."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Steps between train-metric log lines (TensorBoard and metrics.jsonl)."""
    val_every: int = 50
    """Steps between validation passes; 0 disables (a final one still runs)."""
    val_batches: int = 8
    """Fixed validation batches (micro_batch sequences each) per validation pass."""
    tensorboard: bool = True
    """Write TensorBoard events to <run>/tb through DeepSpeed's monitor."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class PMAMonitorConfig:
    enabled: bool = False
    """At every checkpoint, merge the latest checkpoints in memory, evaluate the merged weights
    on the fixed validation batches and log pma/val_loss: the predicted annealed loss."""
    strategy: str = "sma"
    """sma, wma or ema (arXiv 2505.12082)."""
    n: int = 4
    """Checkpoints merged (the paper's N)."""
    interval: int = 1
    """Merge every k-th checkpoint: the merge interval V is k x checkpoint.every_tokens."""
    alpha: float = 0.2
    """EMA coefficient (strategy ema)."""
    min_n: int = 0
    """Start logging once this many checkpoints are in the window; 0: only full windows of n."""
    val_batches: int = 0
    """Validation batches per merged evaluation; 0: logging.val_batches."""


@dataclass
class StabilityConfig:
    on_spike: str = "off"
    """off: no spike detection. continue: detect loss spikes every step and log them.
    rollback: on a spike, reload the newest checkpoint before it and continue from there.
    pma: on a spike, merge the last pma_n checkpoints before it, reload the merge and continue."""
    loss_factor: float = 1.3
    """A step's loss above loss_factor x its running trend is a spike."""
    grad_norm_factor: float = 10.0
    """A step's gradient norm (before clipping) above grad_norm_factor x its running trend is a
    spike; 0 disables this test. Non-finite loss or gradient norm is always a spike."""
    trend_beta: float = 0.9
    """Smoothing of the running trends (EMA of the per-step values outside spikes)."""
    min_steps: int = 20
    """Steps of history before the detector may fire."""
    pma_n: int = 3
    """Checkpoints merged by the pma recovery (the paper: the 3 before the collapse)."""
    pma_strategy: str = "sma"
    """sma, wma or ema."""
    pma_alpha: float = 0.2
    """EMA coefficient (pma_strategy ema)."""
    optimizer_state: str = "latest"
    """Adam state after a recovery: latest (the newest pre-spike checkpoint's moments), merged
    (pma: averaged with the same weights) or reset (zero moments)."""
    max_retries: int = 3
    """Retries for one spike after its first recovery, each one checkpoint further back; when
    the run has not got past the spike after 1 + max_retries recoveries, it stops (exit 3)."""
    skip_batches: int = 0
    """After each recovery, skip the batches of this many steps: the replay sees new data (the
    LR schedule is unchanged). 0: replay the same batches (the paper's setting)."""
    inject_nan_step: int = 0
    """Testing: make the loss of this optimizer step NaN once per launch (a drill of the
    recovery path); 0: never."""


@dataclass
class TrainConfig:
    max_tokens: float = 1e6
    """Token budget of the run (the step count is max_tokens / tokens per step)."""
    lr: float = 1e-3
    """Peak learning rate."""
    resume: str = "auto"
    """auto: continue from <run>/checkpoints/latest if present; never: refuse an existing run."""
    stop_after_steps: int = 0
    """End this launch after this many optimizer steps in total, saving a checkpoint (for
    time-limited allocations; the schedule still spans max_tokens). 0: run to max_tokens."""
    fork_from: str = ""
    """A global_stepN directory of another run to start from (weights, optimizer, step count),
    with this recipe's schedule: e.g. an annealing branch from step N."""
    init_from: str = ""
    """Start this run at step 0, with this recipe's schedule (its warmup included), from the
    weights of a merge output (``moe-merge merge --format hf|deepspeed``: PMA-init) or of a
    plain checkpoint (a global_stepN directory, a checkpoints/ directory or a run directory:
    its latest tag). The start is saved as global_step0 and described in init.json."""
    init_optimizer: str = "reset"
    """Adam state at init_from: reset (zero moments and step count, as a fresh optimizer),
    latest (the newest checkpoint's moments: a plain checkpoint, or a merge written with
    --optimizer-state latest) or merged (a merge written with --optimizer-state merged)."""


@dataclass
class RecipeConfig:
    name: str = MISSING
    """Run name; the run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1234
    """Seed for initialisation (data order is a function of the seed and the step)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pma_monitor: PMAMonitorConfig = field(default_factory=PMAMonitorConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def tokens_per_step(self) -> int:
        return self.parallel.global_batch * self.data.seq_len

    @property
    def total_steps(self) -> int:
        return int(self.train.max_tokens) // self.tokens_per_step

    @property
    def checkpoint_every_steps(self) -> int:
        """0 when periodic checkpoints are off."""
        return int(self.checkpoint.every_tokens) // self.tokens_per_step

    def grad_accum(self, world_size: int) -> int:
        return self.parallel.global_batch // (self.parallel.micro_batch * world_size)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                data: Any = None) -> RecipeConfig:
    """Load and validate a recipe. Raises ConfigError naming the file and the offending key.
    ``data``: the recipe's contents already loaded from ``path`` (e.g. with a section removed)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    schema = OmegaConf.structured(RecipeConfig)
    if data is None:
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # yaml scanner/parser errors
            raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    try:
        merged = OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_omegaconf_message(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{path}: override '{item}' is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: override '{item}': {_omegaconf_message(e)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_omegaconf_message(e)}") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ == "ConfigKeyError" or "not in struct" in msg or "Key '" in msg:
        return f"unknown key '{key}'" if key else msg
    if type(e).__name__ == "MissingMandatoryValue":
        return f"key '{key}' is required"
    return f"key '{key}': {msg}" if key else msg


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"key '{key}': {msg}")


def parse_size(text: str, key: str) -> int:
    """``80GB`` (10^9 bytes), ``80GiB`` (2^30), ``512MiB``, ``1.5TB``, or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.I)
    if not m:
        raise ConfigError(f"key '{key}': '{text}' is not a size such as 80GB or 80GiB")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0])
    value = float(m.group(1)) * scale
    if value <= 0:
        raise ConfigError(f"key '{key}': '{text}' must be more than 0 bytes")
    return int(value)


def _integral(value: float, key: str) -> None:
    _require(value >= 0 and math.isfinite(value) and float(value).is_integer(), key,
             f"must be a non-negative whole number of tokens, got {value}")


def validate(cfg: RecipeConfig, world_size: Optional[int] = None) -> None:
    """Check value ranges and cross-section arithmetic. ``world_size`` defaults to the recipe's."""
    m, d, p, s, t, c = cfg.model, cfg.data, cfg.parallel, cfg.schedule, cfg.train, cfg.checkpoint
    _require(cfg.name != "" and "/" not in cfg.name, "name", "must be a non-empty name without '/'")
    _require(m.arch in MOE_ARCHS + DENSE_ARCHS, "model.arch",
             f"'{m.arch}' is not one of {', '.join(MOE_ARCHS + DENSE_ARCHS)}")
    for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _require(getattr(m, k) > 0, f"model.{k}", "must be positive")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: the tokenizer's)")
    _require(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
             f"'{m.attn_implementation}' is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if m.attn_implementation == "flash_attention_2":
        _require(_flash_attention_2_available(), "model.attn_implementation",
                 "flash_attention_2 needs the flash-attn package and a CUDA GPU, and this "
                 "machine has not both; use sdpa")
    if m.activation_checkpointing and m.arch in MOE_ARCHS + DENSE_ARCHS:
        _require(_supports_checkpointing(m.arch), "model.activation_checkpointing",
                 f"transformers' {m.arch} model does not support gradient checkpointing")
    if m.is_moe:
        _require(m.num_experts > 0 and m.moe_intermediate_size > 0, "model.num_experts",
                 "MoE archs need num_experts > 0 and moe_intermediate_size > 0")
        _require(0 < m.top_k <= m.num_experts, "model.top_k",
                 f"must be in 1..model.num_experts={m.num_experts}, got {m.top_k}")
    else:
        _require(m.intermediate_size > 0, "model.intermediate_size", "must be positive")
    _require(d.seq_len > 1, "data.seq_len", "must be > 1")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _require(d.bin_dtype in ("uint16", "uint32"), "data.bin_dtype", "must be uint16 or uint32")
    _require(d.vocab_size >= 256 + 1, "data.vocab_size", "must be > 256 (byte-level BPE)")
    _require(len(cfg.optimizer.betas) == 2 and all(0 <= b < 1 for b in cfg.optimizer.betas),
             "optimizer.betas", "must be two numbers in [0, 1)")
    _require(cfg.optimizer.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")
    _require(t.lr > 0, "train.lr", "must be positive")
    _require(t.resume in ("auto", "never"), "train.resume", "must be auto or never")
    _integral(t.max_tokens, "train.max_tokens")
    if t.fork_from:
        fork = Path(t.fork_from)
        _require(fork.is_dir() and fork.name.startswith("global_step"), "train.fork_from",
                 f"{fork} is not a global_stepN checkpoint directory")
    _require(not (t.fork_from and t.init_from), "train.init_from",
             "set train.fork_from (continue a run's schedule) or train.init_from (start a new "
             "schedule at step 0), not both")
    if t.init_from:
        _require(Path(t.init_from).exists(), "train.init_from", f"{t.init_from}: no such directory")
    _require(t.init_optimizer in OPTIMIZER_POLICIES, "train.init_optimizer",
             f"'{t.init_optimizer}' is not one of {', '.join(OPTIMIZER_POLICIES)}")
    _require(t.stop_after_steps >= 0, "train.stop_after_steps", "must be >= 0")
    _require(s.kind in ("wsd", "cosine"), "schedule.kind", f"'{s.kind}' is not wsd or cosine")
    _require(s.decay_shape in DECAY_SHAPES, "schedule.decay_shape",
             f"'{s.decay_shape}' is not one of {', '.join(DECAY_SHAPES)}")
    _integral(s.warmup_tokens, "schedule.warmup_tokens")
    _integral(s.decay_tokens, "schedule.decay_tokens")
    _require(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    _require(s.warmup_tokens + (s.decay_tokens if s.kind == "wsd" else 0) <= t.max_tokens,
             "schedule.warmup_tokens", "warmup + decay exceed train.max_tokens")
    _require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    _require(p.precision in ("fp32", "bf16"), "parallel.precision", "must be fp32 or bf16")
    _require(not (p.precision == "bf16" and p.zero_stage == 0), "parallel.precision",
             "bf16 needs parallel.zero_stage 1, 2 or 3 (without ZeRO DeepSpeed keeps no fp32 "
             "master weights for bf16)")
    if p.device_memory:
        parse_size(p.device_memory, "parallel.device_memory")
    _require(p.micro_batch > 0 and p.global_batch > 0, "parallel.micro_batch", "must be positive")
    _require(p.ep_size >= 1, "parallel.ep_size", "must be >= 1")
    _require(p.world_size >= 0, "parallel.world_size", "must be >= 0")
    if p.ep_size > 1:
        _require(m.is_moe, "parallel.ep_size", f"expert parallelism needs a MoE arch, not {m.arch}")
        _require(m.num_experts % p.ep_size == 0, "parallel.ep_size",
                 f"{p.ep_size} does not divide model.num_experts={m.num_experts}")
        _require(p.zero_stage >= 1, "parallel.zero_stage",
                 "DeepSpeed AutoEP needs ZeRO stage 1, 2 or 3 with parallel.ep_size > 1")
    ws = world_size if world_size is not None else p.world_size
    if ws:
        check_world_size(cfg, ws)
    _integral(c.every_tokens, "checkpoint.every_tokens")
    _require(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
    _require(c.every_tokens == 0 or c.every_tokens >= cfg.tokens_per_step,
             "checkpoint.every_tokens",
             f"{c.every_tokens:g} is less than one step ({cfg.tokens_per_step} tokens = "
             "parallel.global_batch x data.seq_len)")
    _require(cfg.total_steps >= 1, "train.max_tokens",
             f"{t.max_tokens:g} is less than one step ({cfg.tokens_per_step} tokens)")
    _require(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    _require(cfg.logging.val_every >= 0, "logging.val_every", "must be >= 0")
    _require(cfg.logging.val_batches >= 1, "logging.val_batches", "must be >= 1")
    _validate_stability(cfg)
    pm = cfg.pma_monitor
    if pm.enabled:
        _require(pm.strategy in STRATEGIES, "pma_monitor.strategy",
                 f"'{pm.strategy}' is not one of {', '.join(STRATEGIES)}")
        _require(pm.n >= 2, "pma_monitor.n", f"must be >= 2, got {pm.n}")
        _require(pm.interval >= 1, "pma_monitor.interval", f"must be >= 1, got {pm.interval}")
        _require(0.0 < pm.alpha <= 1.0, "pma_monitor.alpha", f"must be in (0, 1], got {pm.alpha}")
        _require(0 <= pm.min_n <= pm.n and pm.min_n != 1, "pma_monitor.min_n",
                 f"must be 0 or in 2..pma_monitor.n={pm.n}, got {pm.min_n}")
        _require(pm.val_batches >= 0, "pma_monitor.val_batches", "must be >= 0")
        _require(c.every_tokens > 0, "pma_monitor.enabled",
                 "the monitor merges checkpoints: set checkpoint.every_tokens")


def _validate_stability(cfg: RecipeConfig) -> None:
    st, c = cfg.stability, cfg.checkpoint
    _require(st.on_spike in SPIKE_ACTIONS, "stability.on_spike",
             f"'{st.on_spike}' is not one of {', '.join(SPIKE_ACTIONS)}")
    _require(st.loss_factor > 1.0, "stability.loss_factor", f"must be > 1, got {st.loss_factor}")
    _require(st.grad_norm_factor == 0 or st.grad_norm_factor > 1.0, "stability.grad_norm_factor",
             f"must be 0 (off) or > 1, got {st.grad_norm_factor}")
    _require(0.0 < st.trend_beta < 1.0, "stability.trend_beta", "must be in (0, 1)")
    _require(st.min_steps >= 1, "stability.min_steps", "must be >= 1")
    _require(st.pma_n >= 1, "stability.pma_n", "must be >= 1")
    _require(st.pma_strategy in STRATEGIES, "stability.pma_strategy",
             f"'{st.pma_strategy}' is not one of {', '.join(STRATEGIES)}")
    _require(0.0 < st.pma_alpha <= 1.0, "stability.pma_alpha", "must be in (0, 1]")
    _require(st.optimizer_state in OPTIMIZER_POLICIES, "stability.optimizer_state",
             f"'{st.optimizer_state}' is not one of {', '.join(OPTIMIZER_POLICIES)}")
    _require(st.max_retries >= 0, "stability.max_retries", "must be >= 0")
    _require(st.skip_batches >= 0, "stability.skip_batches", "must be >= 0")
    _require(st.inject_nan_step >= 0, "stability.inject_nan_step", "must be >= 0")
    if st.on_spike in ("rollback", "pma"):
        _require(c.every_tokens > 0, "stability.on_spike",
                 f"{st.on_spike} recovers from checkpoints: set checkpoint.every_tokens")
        _require(st.on_spike == "pma" or st.optimizer_state != "merged",
                 "stability.optimizer_state", "merged moments need on_spike=pma")
        need = (st.pma_n if st.on_spike == "pma" else 1) + st.max_retries
        _require(c.keep_last == 0 or c.keep_last >= need, "checkpoint.keep_last",
                 f"{c.keep_last} is too few for stability.on_spike={st.on_spike}: keep at least "
                 f"{need} (pma_n + max_retries) or 0 (all)")


CAUSAL_LM_CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def _supports_checkpointing(arch: str) -> bool:
    import transformers

    return bool(getattr(transformers, CAUSAL_LM_CLASSES[arch]).supports_gradient_checkpointing)


def _flash_attention_2_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def check_world_size(cfg: RecipeConfig, world_size: int) -> None:
    """Batch and expert-parallel arithmetic for a launch of ``world_size`` ranks."""
    p = cfg.parallel
    if p.world_size:
        _require(p.world_size == world_size, "parallel.world_size",
                 f"the recipe is written for {p.world_size} ranks but {world_size} were launched")
    _require(world_size % p.ep_size == 0, "parallel.ep_size",
             f"{p.ep_size} does not divide the world size {world_size}")
    _require(p.global_batch % (p.micro_batch * world_size) == 0, "parallel.global_batch",
             f"{p.global_batch} is not a multiple of parallel.micro_batch x world size = "
             f"{p.micro_batch} x {world_size}")


def to_yaml(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML (what the run directory stores as recipe.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
