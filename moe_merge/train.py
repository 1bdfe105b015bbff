"""Training entry point, for the deepspeed launcher or plain python.

    deepspeed --num_gpus 2 --module moe_merge.train recipes/moe_tiny.yaml train.lr=3e-3
    python -m moe_merge.train recipes/moe_tiny.yaml --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moe_merge.checkpoint.safe_load import CheckpointError
from moe_merge.config import ConfigError, load_recipe, to_yaml, validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moe_merge.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-3")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved recipe, DeepSpeed config and parameter counts; exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks to resolve the DeepSpeed config for in --dry-run "
                         "(default: parallel.world_size, else 1)")
    ap.add_argument("--get", metavar="KEY", help="print one resolved recipe value (or run_dir) and exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_args(argv)


def dry_run(cfg, world_size: int) -> None:
    from moe_merge.ds_config import build_ds_config
    from moe_merge.model import count_params
    from moe_merge.schedule import Schedule

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.get == "run_dir":  # derived: output_dir / name
            print(cfg.run_dir)
            return 0
        if args.get:
            from moe_merge.config import to_dict
            value = to_dict(cfg)
            for part in args.get.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(f"{args.recipe}: unknown key '{args.get}'")
                value = value[part]
            print(value)
            return 0
        if args.dry_run:
            ws = args.world_size or cfg.parallel.world_size or 1
            try:
                dry_run(cfg, ws)
            except ConfigError as e:
                raise ConfigError(f"{args.recipe}: {e}") from None
            return 0
        from moe_merge.trainer import run
        try:
            run(cfg)
        except ConfigError as e:
            raise ConfigError(f"{args.recipe}: {e}") from None
    except (ConfigError, CheckpointError) as e:  # CheckpointError: a file refused (one line)
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from moe_merge.stability import SpikeError

        if not isinstance(e, SpikeError):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
