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

An HF config directory is read without running code from it: ``config.json`` (and
``tokenizer_config.json``) are read as small regular files inside the directory and parsed
here first; one that names custom code (``auto_map``) is refused, and transformers is always
asked with ``trust_remote_code=False``, so it never prompts or imports code from the directory.
Before the model is built, the config's sizes (layers, experts, hidden, vocabulary and FFN
sizes) are compared with the checkpoint's tensors, so a config that disagrees costs nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from moe_merge.checkpoint.safe_load import read_small
from moe_merge.errors import CheckpointError

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


# ---- reading an HF directory without running code from it ---------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_json(path: Path, root: Path) -> dict:
    """A small JSON object file of an HF directory (a regular file inside ``root``), parsed;
    one that asks for custom code (``auto_map``) is refused."""
    raw = read_small(path, root)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge integers
        why = getattr(e, "msg", None) or _first_line(e)
        raise CheckpointError(f"{path}: not valid JSON ({why})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if "auto_map" in data:
        what = ", ".join(map(str, data["auto_map"])) if isinstance(data["auto_map"], dict) else ""
        raise CheckpointError(f"{path}: needs custom code from the model directory (auto_map"
                              f"{': ' + what if what else ''}); moe-merge never runs it: refused")
    return data


def read_hf_config(hf_dir: str | Path) -> dict:
    """``hf_dir/config.json`` as a dict (see :func:`read_json`)."""
    hf_dir = Path(hf_dir)
    return read_json(hf_dir / "config.json", hf_dir)


def check_no_remote_code(model_dir: str | Path) -> None:
    """Refuse a model or tokenizer directory whose config.json or tokenizer_config.json asks
    for custom code, before transformers reads it."""
    import os

    model_dir = Path(model_dir)
    for name in ("config.json", "tokenizer_config.json"):
        if os.path.lexists(model_dir / name):
            read_json(model_dir / name, model_dir)


def auto_config(hf_dir: str | Path, signature: dict[str, tuple[int, ...]] | None = None):
    """The transformers config of ``hf_dir`` (no remote code; sizes checked against the
    checkpoint's tensors ``signature`` when given)."""
    hf_dir = Path(hf_dir)
    check_sizes(read_hf_config(hf_dir), signature, hf_dir / "config.json")
    check_no_remote_code(hf_dir)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as e:  # any junk value a config class chokes on is the config's fault
        raise CheckpointError(f"{hf_dir}: cannot read an HF config.json ({_first_line(e)})"
                              ) from None


# ---- the config's sizes against the checkpoint's --------------------------------------------
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_DENSE_FFN_RE = re.compile(r"\.mlp\.(?:gate_proj|up_proj)\.weight$")
_EXPERT_RE = re.compile(r"\.experts\.(?:w1|w2|w3|gate_up_proj|down_proj)$")
_ROUTER_RE = re.compile(r"\.mlp\.(?:router\.)?gate\.weight$")
_EXPERT_W1_RE = re.compile(r"\.experts\.w[13]$")  # AutoEP [E, I, H]


def _checkpoint_sizes(sig: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, str]]:
    """What the checkpoint's tensors say: key -> (value, the tensor or tensors saying it);
    only values every tensor of their kind agrees on."""
    seen: dict[str, dict[int, str]] = {}

    def note(key, value, name):
        seen.setdefault(key, {}).setdefault(value, name)

    layers: dict[str, set[int]] = {}  # per stack of layers (the name before layers.N)
    for name, shape in sig.items():
        if m := _LAYER_RE.search(name):
            layers.setdefault(name[:m.start(1)], set()).add(int(m.group(1)))
        if name.endswith(_EMBED_SUFFIXES) and len(shape) == 2:
            note("vocab", shape[0], name)
            note("hidden", shape[1], name)
        if _DENSE_FFN_RE.search(name) and len(shape) == 2:
            note("ffn", shape[0], name)
        if (_EXPERT_RE.search(name) and len(shape) == 3) or (_ROUTER_RE.search(name)
                                                            and len(shape) == 2):
            note("experts", shape[0], name)
        if _EXPERT_W1_RE.search(name) and len(shape) == 3:
            note("expert_ffn", shape[1], name)
    out = {k: next(iter(v.items())) for k, v in seen.items() if len(v) == 1}
    if len(layers) == 1:  # one stack: a causal LM, whose config counts exactly these
        (stack, idx), = layers.items()
        out["layers"] = (max(idx) + 1, f"{stack}{min(idx)} .. {stack}{max(idx)}")
    return out


def _size_value(cfg: dict, key: str, path: Path, where: str):
    value = cfg[key]
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise CheckpointError(f"{path}: {where}{key} is {str(value)[:40]!r}, not a "
                              "non-negative integer")
    return value


def check_sizes(config: dict, signature: dict[str, tuple[int, ...]] | None, path: Path) -> None:
    """Refuse an HF config whose size fields disagree with the checkpoint's tensors
    (``signature``: name -> shape), before a model is built from it: the layer count with the
    checkpoint's ``layers.N`` indices, the expert count with its expert and router tensors, the
    hidden and vocabulary sizes with its token embedding, the FFN sizes with its MLP and
    expert tensors. Layer and expert counts of nested configs are bounded by the checkpoint's
    size (each layer or expert has parameters). Without ``signature`` nothing is checked."""
    if not signature:
        return
    have = _checkpoint_sizes(signature)
    bound = max([len(signature), *(d for s in signature.values() for d in s)])
    levels = [("", config)]
    if isinstance(config.get("text_config"), dict):
        levels.append(("text_config.", config["text_config"]))

    def refuse(where, key, value, what):
        count, source = have[what]
        raise CheckpointError(f"{path}: {where}{key} is {value}, but the checkpoint has {count} "
                              f"({source}): the config does not describe this checkpoint "
                              "(wrong --hf-config?)")

    for where, cfg in levels:
        checks = [(k, "layers") for k in _LAYER_KEYS] + [(k, "experts") for k in _EXPERT_KEYS]
        checks += [("vocab_size", "vocab"), ("hidden_size", "hidden"), ("n_embd", "hidden"),
                   ("d_model", "hidden"), ("moe_intermediate_size", "expert_ffn")]
        checks.append(("intermediate_size", "ffn" if "ffn" in have or
                       "moe_intermediate_size" in cfg else "expert_ffn"))
        for key, what in checks:
            if key not in cfg:
                continue
            value = _size_value(cfg, key, path, where)
            if value is not None and what in have and value != have[what][0]:
                refuse(where, key, value, what)
    _check_bounded(config, bound, path, "", 0)


def _check_bounded(cfg, bound: int, path: Path, where: str, depth: int) -> None:
    """Layer and expert counts anywhere in the config (sub-model configs too) at most
    ``bound``: a model with more layers or experts than that cannot match the checkpoint."""
    if depth > 4 or not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        if key in _LAYER_KEYS + _EXPERT_KEYS and type(value) is int and value > bound:
            raise CheckpointError(f"{path}: {where}{key} is {value}, more than the checkpoint "
                                  f"could hold ({bound}): the config does not describe this "
                                  "checkpoint (wrong --hf-config?)")
        if isinstance(value, dict):
            _check_bounded(value, bound, path, f"{where}{key}.", depth + 1)


# ---- the HF model's names and shapes ---------------------------------------------------------
def _cache_file(hf_dir: Path) -> Path | None:
    import hashlib
    import os
    from importlib.metadata import PackageNotFoundError, version

    try:
        key = hashlib.sha256(read_small(Path(hf_dir) / "config.json", hf_dir)
                             + version("transformers").encode()).hexdigest()[:32]
    except (OSError, CheckpointError, PackageNotFoundError):
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moe-merge" / "hf_names" / f"{key}.json"


def hf_expected(hf_dir: Path, signature: dict[str, tuple[int, ...]] | None = None
                ) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes of the HF model in ``hf_dir`` (built on the meta device, no weights),
    and the names transformers ties to another weight (they may be absent from a checkpoint).
    ``signature``: the checkpoint's tensors (name -> shape); a config whose sizes disagree
    with them is refused before anything is built (see :func:`check_sizes`).

    Importing transformers and building the model costs seconds, more than merging a small
    model; the answer is cached per config.json content and transformers version (in
    ``~/.cache/moe-merge/hf_names``), so only the first merge of a model pays it."""
    import os

    check_no_remote_code(hf_dir)  # whether or not the answer is cached
    check_sizes(read_hf_config(hf_dir), signature, Path(hf_dir) / "config.json")
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
    from transformers import AutoModelForCausalLM

    config = auto_config(hf_dir)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # a config transformers reads but cannot build a model from
        raise CheckpointError(f"{hf_dir}/config.json: transformers cannot build a causal LM "
                              f"from it ({_first_line(e)})") from None
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
        raise CheckpointError(f"{hf_dir}/config.json: the checkpoint has tensor {extra[0]} "
                              "that the HF model does not (wrong --hf-config?)")
    return outs
