"""``--dry-run``: the resolved recipe, its DeepSpeed config, the model's size and the run's plan."""

from __future__ import annotations

import json

from moe_merge.config.deepspeed import build_ds_config
from moe_merge.config.recipe import RecipeConfig, to_yaml, validate
from moe_merge.training.model import count_params
from moe_merge.training.schedule import Schedule


def dry_run(cfg: RecipeConfig, world_size: int) -> None:
    """Print what a run of ``cfg`` on ``world_size`` ranks would do (nothing is started)."""
    validate(cfg, world_size)
    ds = build_ds_config(cfg, world_size)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    counts = count_params(cfg.model, vocab)
    sched = Schedule.from_recipe(cfg)
    every = cfg.checkpoint_every_steps
    print("# resolved recipe")
    print(to_yaml(cfg))
    print(f"# DeepSpeed config (world size {world_size})")
    print(json.dumps(ds, indent=2))
    print("\n# model")
    print(f"arch {cfg.model.arch}: {counts.describe()}")
    memory_section(cfg, world_size, ds)
    print("\n# plan")
    print(f"run dir           {cfg.run_dir}")
    print(f"tokens per step   {cfg.tokens_per_step:,} ({cfg.parallel.global_batch} seqs x "
          f"{cfg.data.seq_len}), grad accum {cfg.grad_accum(world_size)}")
    print(f"steps             {sched.total_steps:,} ({sched.total_steps * cfg.tokens_per_step:,} "
          "tokens)")
    print(f"schedule          {sched.kind}: warmup {sched.warmup_steps} steps, decay "
          f"{sched.decay_steps} steps ({cfg.schedule.decay_shape}), peak lr {sched.peak_lr:g}")
    if every:
        print(f"checkpoints       every {every} steps = {every * cfg.tokens_per_step:,} tokens "
              f"(V), {sched.total_steps // every} in all")
    else:
        print("checkpoints       at the end only")
    if cfg.train.init_from:
        print(f"start             step 0 from {cfg.train.init_from} (optimizer state: "
              f"{cfg.train.init_optimizer})")
    st = cfg.stability
    if st.on_spike != "off":
        what = {"continue": "log them", "rollback": "reload the newest pre-spike checkpoint",
                "pma": f"reload the {st.pma_strategy} of the last {st.pma_n} pre-spike "
                       "checkpoints"}[st.on_spike]
        print(f"loss spikes       loss > {st.loss_factor:g} x trend"
              f"{f' or grad norm > {st.grad_norm_factor:g} x trend' if st.grad_norm_factor else ''}"
              f" or non-finite: {what}"
              f"{f', up to {st.max_retries} retries' if st.on_spike != 'continue' else ''}")


def memory_section(cfg: RecipeConfig, world_size: int, ds: dict) -> None:
    """Per-rank bytes of the model states, buffers and activations (with and without
    activation checkpointing); with parallel.device_memory, whether it fits and what to change."""
    import dataclasses

    from moe_merge.training import memory_plan as mp

    lay = mp.Layout.of(cfg, world_size, ds)
    s = mp.model_shapes(cfg, lay.persistence_threshold)
    mem = mp.plan(s, lay)
    other = mp.plan(s, dataclasses.replace(lay, checkpointing=not lay.checkpointing))
    print(f"\n# memory per rank (estimate): {world_size} ranks, ZeRO-{lay.zero_stage}, "
          f"EP {lay.ep_size}, {lay.precision}, micro batch {lay.micro_batch} x {lay.seq_len} "
          f"tokens, activation checkpointing {'on' if lay.checkpointing else 'off'}")
    for line in mp.describe(mem):
        print(line)
    print(f"(activation checkpointing {'off' if lay.checkpointing else 'on'}: activations "
          f"{mp.gib(other.activations).strip()}, peak {mp.gib(other.peak).strip()})")
    verdict = mp.check(cfg, world_size, ds, s)
    if verdict is None:
        return
    if verdict.fits:
        room = mp.gib(verdict.usable).strip()
        print(f"device memory     {cfg.parallel.device_memory}: fits ({room} usable after "
              f"{mp.HEADROOM_FRACTION:.0%} + {mp.HEADROOM_FIXED / mp.GiB:g} GiB headroom)")
        return
    print(f"device memory     {cfg.parallel.device_memory}: does NOT fit "
          f"({mp.gib(verdict.usable).strip()} usable, {mp.gib(mem.peak).strip()} needed); "
          "it fits with:")
    for change, m in verdict.options:
        print(f"  {change}   (peak {mp.gib(m.peak).strip()})")
