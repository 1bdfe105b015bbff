"""Per-rank memory of a run, from the recipe alone: what ``--dry-run`` prints and what
``parallel.device_memory`` is checked against.

The model states follow how DeepSpeed holds them (0.19, AdamW), as measured on CPU runs
(``bench/memory_plan_check.py``); ``b`` bytes per value in the compute dtype (4 for fp32, 2 for
bf16), ``n`` the values the rank's module holds (the dense part plus its own ``1/ep`` of the
experts), ``g`` the ranks a group is partitioned over (the world for the dense part,
``world/ep`` for the experts):

==========  ================  ===============================  ==============  ============
ZeRO stage  parameters        gradients                        fp32 masters    Adam moments
==========  ================  ===============================  ==============  ============
0 (fp32)    4n                4n                               (parameters)    8n
1, 2        b n               b n/g (+ 4n/g fp32 copy, bf16)   4n/g            8n/g
3           b n/g (+ small    b n/g (+ 4n/g fp32 copy, bf16)   4n/g (bf16)     8n/g
            tensors whole)
==========  ================  ===============================  ==============  ============

plus the gradient bucket (``reduce_bucket_size`` values) and, under ZeRO-3, the parameters
gathered for the forward pass: with ``stage3_max_reuse_distance`` > 0 (DeepSpeed's default)
DeepSpeed keeps each one gathered until the backward pass has used it, so the whole module, not
its partition, is held for that time (set it to 0 to gather one layer at a time, for more
communication). Start-up: ZeRO-1/2 build the module in fp32 and flatten it into one buffer of
the compute dtype; ZeRO-3 ranks build their fp32 partitions only, then flatten them and add the
gradient buffer (and the fp32 masters under bf16).

Activations are counted per token and layer from the shapes of what autograd keeps (the block's
input and norms, q/k/v, the attention output, the MLP's or the routed experts' intermediates),
plus the logits (their fp32 copy and log-softmax for the loss, and the gradient). With
activation checkpointing a block keeps only its input; one block's activations are recomputed
at a time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from moe_merge.config.recipe import RecipeConfig, parse_size
from moe_merge.errors import ConfigError

GiB = 2**30
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 1e5,
               "stage3_max_reuse_distance": 1e9}
# Left free on a GPU for the CUDA context, NCCL's buffers and the allocator's fragmentation.
HEADROOM_FRACTION, HEADROOM_FIXED = 0.10, 1 * GiB


@dataclass(frozen=True)
class Shapes:
    """What the plan needs of the model: parameter counts and the sizes activations scale with."""
    dense: int
    """Parameters outside the experts (embeddings, attention, norms, routers, dense MLPs)."""
    expert: int
    """Parameters of all routed experts together."""
    small_dense: int
    """Dense parameters of tensors no larger than ZeRO-3's persistence threshold."""
    largest_layer: int
    """Parameters of the largest transformer block (what ZeRO-3 gathers at a time)."""
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    moe_intermediate: int
    num_experts: int
    top_k: int
    layers: int
    heads: int
    vocab: int
    qk_norm: bool

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def model_shapes(cfg: RecipeConfig, persistence_threshold: float) -> Shapes:
    """Counted on the meta device (nothing is allocated)."""
    from moe_merge.training.model import build_model, is_expert_param

    m = cfg.model
    vocab = m.vocab_size or cfg.data.vocab_size
    model = build_model(m, vocab, seed=0, device="meta")
    dense = expert = small = 0
    per_layer: dict[str, int] = {}
    for name, p in model.named_parameters():
        if is_expert_param(name):
            expert += p.numel()
        else:
            dense += p.numel()
            small += p.numel() if p.numel() <= persistence_threshold else 0
        layer = re.match(r".*layers\.(\d+)\.", name)
        if layer:
            per_layer[layer.group(1)] = per_layer.get(layer.group(1), 0) + p.numel()
    return Shapes(dense=dense, expert=expert, small_dense=small,
                  largest_layer=max(per_layer.values(), default=0), hidden=m.hidden_size,
                  q_dim=m.num_heads * m.head_dim, kv_dim=m.num_kv_heads * m.head_dim,
                  intermediate=m.intermediate_size, moe_intermediate=m.moe_intermediate_size,
                  num_experts=m.num_experts if m.is_moe else 0, top_k=m.top_k,
                  layers=m.num_layers, heads=m.num_heads, vocab=vocab,
                  qk_norm=m.arch.startswith("qwen3"))


@dataclass(frozen=True)
class Layout:
    """The knobs the plan depends on (and the ones a user may turn to make it fit)."""
    zero_stage: int
    ep_size: int
    world: int
    precision: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    attn: str
    reduce_bucket: float
    prefetch_bucket: float
    max_live: float
    max_reuse: float = 0.0
    persistence_threshold: float = 0.0
    ds_config: str = ""

    @classmethod
    def of(cls, cfg: RecipeConfig, world: int, ds: dict) -> Layout:
        z = {**DS_DEFAULTS, **ds.get("zero_optimization", {})}
        return cls(zero_stage=cfg.parallel.zero_stage, ep_size=cfg.parallel.ep_size, world=world,
                   precision=cfg.parallel.precision, micro_batch=cfg.parallel.micro_batch,
                   seq_len=cfg.data.seq_len, checkpointing=cfg.model.activation_checkpointing,
                   attn=cfg.model.attn_implementation,
                   reduce_bucket=float(z["reduce_bucket_size"]),
                   prefetch_bucket=float(z["stage3_prefetch_bucket_size"]),
                   max_live=float(z["stage3_max_live_parameters"]),
                   max_reuse=float(z["stage3_max_reuse_distance"]),
                   persistence_threshold=float(z["stage3_param_persistence_threshold"]),
                   ds_config=cfg.parallel.ds_config)


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at its peak (training) and at start-up."""
    params: int
    grads: int
    master: int
    moments: int
    buffers: int
    """The gradient bucket and, under ZeRO-3, the gathered parameters of the current layer."""
    activations: int
    startup: int
    """Peak while the engine is built (before the first step)."""

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.master + self.moments

    @property
    def peak(self) -> int:
        return max(self.model_states + self.buffers + self.activations, self.startup)


def plan(s: Shapes, lay: Layout) -> RankMemory:
    b = 2 if lay.precision == "bf16" else 4
    groups = [(s.dense, lay.world)]  # (values in the rank's module, ranks they are split over)
    if s.is_moe:
        groups.append((s.expert // lay.ep_size, lay.world // lay.ep_size))
    params = grads = master = moments = startup = 0
    module = sum(n for n, _ in groups)
    for n, g in groups:
        if lay.zero_stage == 0:
            params, grads, moments = params + 4 * n, grads + 4 * n, moments + 8 * n
            continue
        master += 4 * n // g
        moments += 8 * n // g
        # the gradient partition in the compute dtype, and its fp32 copy at the step (bf16)
        grads += b * n // g + (4 * n // g if b == 2 else 0)
        params += b * n // g if lay.zero_stage == 3 else b * n
    if lay.zero_stage == 3:
        params += b * s.small_dense * (lay.world - 1) // lay.world  # kept whole on every rank
        if b == 4:
            master = 0  # DeepSpeed steps the fp32 partitions themselves
    buffers = int(lay.reduce_bucket) * b if lay.zero_stage else 0
    if lay.zero_stage == 3:  # parameters gathered for the forward and kept for the backward
        buffers += b * (module if lay.max_reuse > 0 else
                        int(min(lay.max_live, s.largest_layer + lay.prefetch_bucket)))
    if lay.zero_stage in (1, 2):  # built in fp32, then flattened into the compute dtype
        startup = (4 + b) * module + 4 * (b == 2) * sum(n // g for n, g in groups)
    elif lay.zero_stage == 3:  # fp32 partitions built, flattened; gradient buffer; masters
        startup = sum((4 + 2 * b) * n // g for n, g in groups) + master
    else:
        startup = params
    return RankMemory(params=params, grads=grads, master=master, moments=moments,
                      buffers=buffers, activations=activations(s, lay), startup=startup)


def activations(s: Shapes, lay: Layout) -> int:
    """Bytes autograd keeps for one micro batch, at the start of the backward pass."""
    a = 2 if lay.precision == "bf16" else 4  # activations in the compute dtype; norms in fp32
    h, q, kv = s.hidden, s.q_dim, s.kv_dim
    norm = 8 * h + a * h  # RMSNorm: fp32 input and normalised values, the cast output
    attn = norm + a * (q + 2 * kv)  # q, k, v projections
    if s.qk_norm:
        attn += 2 * 4 * (q + kv) + a * (q + kv)
    attn += a * (2 * (q + kv) + 2 * q + 2 * q)  # rotary, k/v repeated to the heads, out, o_proj
    if lay.attn == "eager":
        attn += s.heads * lay.seq_len * (4 + 2 * a)  # scores, fp32 softmax, probabilities
    mlp = norm + a * h
    if s.is_moe:
        mlp += 2 * 4 * s.num_experts + s.top_k * a * (3 * h + 4 * s.moe_intermediate)
    else:
        mlp += 4 * a * s.intermediate
    layer = attn + mlp
    logits = s.vocab * (a + 4 + 4 + 4)  # logits, fp32 copy, log-softmax, their gradient
    tokens = lay.micro_batch * lay.seq_len
    kept = s.layers * a * h + layer if lay.checkpointing else s.layers * layer
    return tokens * (kept + norm + logits)


@dataclass(frozen=True)
class Fit:
    """The verdict for a device size: whether the recipe fits, and changes that make it fit."""
    device: int
    usable: int
    fits: bool
    options: list[tuple[str, RankMemory]]
    """Recipe overrides (``key=value ...``) that fit, the smallest change first."""


def usable(device: int) -> int:
    return int(device * (1 - HEADROOM_FRACTION)) - HEADROOM_FIXED


def fit(s: Shapes, lay: Layout, device: int, global_batch: int) -> Fit:
    room = usable(device)
    if plan(s, lay).peak <= room:
        return Fit(device, room, True, [])
    options = []
    for change in _changes(s, lay, global_batch):
        trial = dataclasses.replace(lay, **change)
        mem = plan(s, trial)
        if mem.peak <= room:
            options.append((_describe(change, lay), mem))
    return Fit(device, room, False, options[:3])


KEYS = {"checkpointing": "model.activation_checkpointing", "zero_stage": "parallel.zero_stage",
        "ep_size": "parallel.ep_size", "micro_batch": "parallel.micro_batch"}


def _describe(change: dict, lay: Layout) -> str:
    words = [f"{KEYS[k]}={str(v).lower()}" for k, v in change.items()]
    if "zero_stage" in change and lay.ds_config:  # an engine template of the new stage
        from moe_merge.config.deepspeed import BUNDLED

        gpu = f"gpu_zero{change['zero_stage']}.json"
        words.append("parallel.ds_config=" + (gpu if (BUNDLED / gpu).is_file() else "''"))
    return " ".join(words)


def _changes(s: Shapes, lay: Layout, global_batch: int) -> list[dict]:
    """Single changes first, then pairs, then all four; each knob only towards less memory."""
    knobs: dict[str, list] = {}
    if not lay.checkpointing:
        knobs["checkpointing"] = [True]
    knobs["micro_batch"] = [mb for mb in (lay.micro_batch // 2 ** i for i in range(1, 12))
                            if mb >= 1 and global_batch % (mb * lay.world) == 0]
    knobs["zero_stage"] = [z for z in (1, 2, 3) if z > lay.zero_stage]
    if s.is_moe:
        knobs["ep_size"] = [e for e in _ep_sizes(s, lay.world) if e > lay.ep_size]
    singles = [{k: v} for k, vs in knobs.items() for v in vs]
    names = list(knobs)
    pairs = [{a: va, b: vb} for i, a in enumerate(names) for b in names[i + 1:]
             for va in knobs[a] for vb in knobs[b]]
    everything = [{k: vs[-1] for k, vs in knobs.items() if vs}]
    return singles + pairs + everything  # within a size: larger micro batches, lower stages


def check(cfg: RecipeConfig, world: int, ds: dict, shapes: Shapes | None = None) -> Fit | None:
    """``parallel.device_memory`` against the plan (None when it is not set). A recipe that
    fits with no change of micro batch, ZeRO stage, EP or checkpointing is refused: ConfigError
    naming the key; one that needs a change is returned for the caller to report. ``shapes``:
    the model's, when the caller has them already."""
    if not cfg.parallel.device_memory:
        return None
    device = parse_size(cfg.parallel.device_memory, "parallel.device_memory")
    lay = Layout.of(cfg, world, ds)
    s = shapes or model_shapes(cfg, lay.persistence_threshold)
    verdict = fit(s, lay, device, cfg.parallel.global_batch)
    least = smallest(s, lay)
    if not verdict.fits and least.peak > verdict.usable:
        raise ConfigError(
            f"key 'parallel.device_memory': the model does not fit {cfg.parallel.device_memory} "
            f"per rank on {world} ranks at any micro batch: it needs {least.peak / GiB:.1f} GiB "
            f"(model states {least.model_states / GiB:.1f}, activations "
            f"{least.activations / GiB:.1f}) even with micro_batch 1, activation checkpointing, "
            f"ZeRO-3 and EP {_max_ep(s, world)}, and {max(verdict.usable, 0) / GiB:.1f} GiB are "
            "usable; use more ranks (model states) or a shorter data.seq_len (activations)")
    return verdict


def _ep_sizes(s: Shapes, world: int) -> list[int]:
    """Expert-parallel sizes that divide both the expert count and the world size."""
    return [e for e in range(1, world + 1) if s.num_experts % e == 0 and world % e == 0] \
        if s.is_moe else [1]


def _max_ep(s: Shapes, world: int) -> int:
    return _ep_sizes(s, world)[-1]


def smallest(s: Shapes, lay: Layout) -> RankMemory:
    """The least a rank can need at this world size: checkpointing, micro batch 1, ZeRO-3 and
    the largest expert-parallel size."""
    return plan(s, dataclasses.replace(lay, checkpointing=True, micro_batch=1, zero_stage=3,
                                       ep_size=_max_ep(s, lay.world)))


def describe(mem: RankMemory) -> list[str]:
    rows = [("parameters", mem.params), ("gradients", mem.grads), ("fp32 masters", mem.master),
            ("Adam moments", mem.moments), ("model states", mem.model_states),
            ("buckets, gathered", mem.buffers), ("activations", mem.activations),
            ("start-up peak", mem.startup), ("peak", mem.peak)]
    return [f"{name:<18}{gib(v)}" for name, v in rows]


def gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"
