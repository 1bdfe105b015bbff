"""The DeepSpeed config of a run: engine settings from ds_configs/, the rest from the recipe.

ds_configs/*.json hold engine settings only (ZeRO stage, buckets, offload). Batch sizes,
precision, optimizer, clipping, expert parallelism and the TensorBoard monitor are injected from
the recipe here, the single source of truth, and checked once.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_merge.config import ConfigError, RecipeConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
INJECTED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "bf16", "fp16", "optimizer", "scheduler", "gradient_clipping", "expert_parallel",
            "tensorboard")


def engine_config_path(cfg: RecipeConfig) -> Path:
    if cfg.parallel.ds_config:
        path = Path(cfg.parallel.ds_config)
        return path if path.is_absolute() or path.exists() else REPO_ROOT / path
    return REPO_ROOT / "ds_configs" / f"zero{cfg.parallel.zero_stage}.json"


def build_ds_config(cfg: RecipeConfig, world_size: int, run_dir: Path | None = None,
                    on_gpu: bool = False) -> dict:
    """Engine settings from the JSON template plus everything the recipe owns. ``on_gpu``
    selects AutoEP's grouped GEMM for the experts (not available on CPU)."""
    path = engine_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"key 'parallel.ds_config': {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    clash = [k for k in INJECTED if k in ds]
    if clash:
        raise ConfigError(f"{path}: key '{clash[0]}' belongs in the recipe, not the engine config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.parallel.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage} but parallel.zero_stage is "
                          f"{cfg.parallel.zero_stage}")
    p, o = cfg.parallel, cfg.optimizer
    ds.update({
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world_size),
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.train.lr, "betas": list(o.betas), "eps": o.eps,
            "weight_decay": o.weight_decay}},
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": p.precision == "bf16"},
    })
    if cfg.model.is_moe:
        ds["expert_parallel"] = {"enabled": True, "autoep_size": p.ep_size,
                                 "preset_model": cfg.model.arch, "use_grouped_mm": on_gpu}
    if cfg.logging.tensorboard:
        ds["tensorboard"] = {"enabled": True,
                             "output_path": str((run_dir or cfg.run_dir) / "tb"), "job_name": ""}
    return ds
