"""Explicit name maps from checkpoint (DeepSpeed module) names to transformers names.

AutoEP replaces each MoE block ``M`` of an HF model with its own layer. Its parameters, and the
HF parameters they hold (DeepSpeed's AutoEP presets: ``router_pattern="gate"``,
``experts_pattern="experts"``, ``expert_storage="fused_3d"``, ``expert_w1="gate_up_proj"``,
``expert_w2="down_proj"``, ``expert_w3=None``)::

    M.router.gate.weight [E, H]                      -> M.gate.weight [E, H]
    M.experts.w1 [E, I, H] (gate), M.experts.w3 [E, I, H] (up)
                                                     -> M.experts.gate_up_proj [E, 2I, H]
    M.experts.w2 [E, H, I]                           -> M.experts.down_proj [E, H, I]

(E experts, H hidden size, I expert FFN size.) Every other name is the HF name already.
The map is checked against the HF model's own state dict (built on the meta device) before a
byte is written: same keys, same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_merge.checkpoint.safe_load import CheckpointError

# AutoEP presets whose HF experts are one fused gate_up_proj and one down_proj.
FUSED_3D_PRESETS = {
    "qwen3_moe": {"router": "gate", "experts": "experts", "w13": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"router": "gate", "experts": "experts", "w13": "gate_up_proj", "w2": "down_proj"},
    "mixtral": {"router": "gate", "experts": "experts", "w13": "gate_up_proj", "w2": "down_proj"},
}


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: the concatenation along ``cat_dim`` of checkpoint tensors."""
    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    cat_dim: int = 0


def identity_map(shapes: dict[str, tuple[int, ...]]) -> list[OutTensor]:
    return [OutTensor(n, (n,), tuple(s)) for n, s in shapes.items()]


def hf_map(shapes: dict[str, tuple[int, ...]], autoep_layers: list[dict],
           preset: str | None) -> list[OutTensor]:
    """Checkpoint names -> HF names, for dense models and AutoEP MoE models."""
    if not autoep_layers:
        return identity_map(shapes)
    if preset not in FUSED_3D_PRESETS:
        raise CheckpointError(f"AutoEP preset {preset!r} has no HF name map (supported: "
                              f"{', '.join(sorted(FUSED_3D_PRESETS))})")
    p = FUSED_3D_PRESETS[preset]
    out: dict[str, OutTensor] = {}
    used: set[str] = set()
    for entry in autoep_layers:
        m = entry["module_path"]
        prefix = entry["expert_key_prefix"]
        w1, w2, w3 = (f"{prefix}.{w}" for w in ("w1", "w2", "w3"))
        for n in (w1, w2, w3):
            if n not in shapes:
                raise CheckpointError(f"AutoEP layer {m}: parameter {n} not in the checkpoint")
        s1, s3 = shapes[w1], shapes[w3]
        fused = (s1[0], s1[1] + s3[1], *s1[2:])
        out[w1] = OutTensor(f"{m}.{p['experts']}.{p['w13']}", (w1, w3), fused, cat_dim=1)
        out[w2] = OutTensor(f"{m}.{p['experts']}.{p['w2']}", (w2,), tuple(shapes[w2]))
        used |= {w1, w2, w3}
        for suffix in ("weight", "bias"):
            r = f"{m}.router.gate.{suffix}"
            if r in shapes:
                out[r] = OutTensor(f"{m}.{p['router']}.{suffix}", (r,), tuple(shapes[r]))
                used.add(r)
    result = []
    for n, s in shapes.items():
        if n in out:
            result.append(out[n])
        elif n not in used:
            result.append(OutTensor(n, (n,), tuple(s)))
    return result


def _cache_file(hf_dir: Path) -> Path | None:
    import hashlib
    import os
    from importlib.metadata import PackageNotFoundError, version

    try:
        key = hashlib.sha256((Path(hf_dir) / "config.json").read_bytes()
                             + version("transformers").encode()).hexdigest()[:32]
    except (OSError, PackageNotFoundError):
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moe-merge" / "hf_names" / f"{key}.json"


def hf_expected(hf_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes of the HF model in ``hf_dir`` (built on the meta device, no weights),
    and the names transformers ties to another weight (they may be absent from a checkpoint).

    Importing transformers and building the model costs seconds, more than merging a small
    model; the answer is cached per config.json content and transformers version (in
    ``~/.cache/moe-merge/hf_names``), so only the first merge of a model pays it."""
    import json
    import os

    cache = _cache_file(hf_dir)
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return {k: tuple(v) for k, v in data["expected"].items()}, set(data["tied"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    expected, tied = _hf_expected(hf_dir)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"expected": expected, "tied": sorted(tied)}))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home: no cache, same answer
    return expected, tied


def _hf_expected(hf_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{hf_dir}: cannot read an HF config.json "
                              f"({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = set((getattr(model, "_tied_weights_keys", None) or {}))
    return expected, tied


def check_against_hf(outs: list[OutTensor], expected: dict[str, tuple[int, ...]],
                     tied: set[str], hf_dir: Path) -> list[OutTensor]:
    """Keep the outputs the HF model wants, refuse any mismatch (naming the first tensor)."""
    have = {o.name: o for o in outs}
    for name, shape in expected.items():
        if name not in have:
            if name in tied:
                continue
            raise CheckpointError(f"{hf_dir}/config.json: the HF model needs tensor {name} "
                                  f"{list(shape)}, which the checkpoint does not have")
        if tuple(have[name].shape) != tuple(shape):
            raise CheckpointError(f"{hf_dir}/config.json: tensor {name} has shape "
                                  f"{list(have[name].shape)} in the checkpoint but "
                                  f"{list(shape)} in the HF model")
    extra = [n for n in have if n not in expected]
    if extra:
        raise CheckpointError(f"{hf_dir}/config.json: the checkpoint has tensor {extra[0]} that the "
                              "HF model does not (wrong --hf-config?)")
    return outs
