"""The DeepSpeed config of a run: engine settings from a JSON template, the rest from the recipe.

The templates hold engine settings only (ZeRO stage, buckets, offload). The bundled ones ship in
the package (``moe_merge/config/ds_configs/``, also ``ds_configs/`` at the top of a checkout):
``zero0-3.json`` for CPU and small runs, ``gpu_zero2.json`` and ``gpu_zero3.json`` with overlap
and large buckets. ``parallel.ds_config`` names a bundled one (``gpu_zero2.json`` or
``ds_configs/gpu_zero2.json``) or a file of your own (absolute, or relative to the working
directory; a file of that name wins over the bundled one). Batch sizes,
precision, optimizer, clipping, expert parallelism and the TensorBoard monitor are injected from
the recipe here, the single source of truth, and checked once.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_merge.config.recipe import RecipeConfig
from moe_merge.errors import ConfigError

BUNDLED = Path(__file__).resolve().parent / "ds_configs"
INJECTED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "bf16", "fp16", "optimizer", "scheduler", "gradient_clipping", "expert_parallel",
            "tensorboard")


def engine_config_path(cfg: RecipeConfig) -> Path:
    """The engine template of ``cfg``: ``parallel.ds_config`` (a file, else a bundled name) or
    the bundled ``zero<parallel.zero_stage>.json``."""
    name = cfg.parallel.ds_config
    if not name:
        return BUNDLED / f"zero{cfg.parallel.zero_stage}.json"
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    if path.parent in (Path("."), Path("ds_configs")) and (BUNDLED / path.name).is_file():
        return BUNDLED / path.name
    bundled = ", ".join(sorted(p.name for p in BUNDLED.glob("*.json")))
    raise ConfigError(f"key 'parallel.ds_config': {name} not found (neither a file nor one of "
                      f"the bundled engine configs: {bundled})")


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
