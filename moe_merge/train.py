"""Training entry point, for the deepspeed launcher or plain python.

    deepspeed --num_gpus 2 --module moe_merge.train recipes/moe_tiny.yaml train.lr=3e-3
    python -m moe_merge.train recipes/moe_tiny.yaml --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_merge.config.recipe import load_recipe, to_dict
from moe_merge.errors import ConfigError, MoeMergeError, SpikeError


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
    ap.add_argument("--device-memory", metavar="SIZE", default=None,
                    help="memory of one rank's device (80GB, 80GiB) for --dry-run's memory plan "
                         "(= parallel.device_memory=SIZE)")
    ap.add_argument("--get", metavar="KEY",
                    help="print one resolved recipe value (or run_dir) and exit")
    ap.add_argument("--launch-ranks", metavar="N|auto:N",
                    help="validate the recipe for a launch on this node and print its rank count: "
                         "N ranks, or auto:N (parallel.world_size, else N); with "
                         "parallel.device_memory also its memory plan (launch/train.sh uses it)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap.parse_intermixed_args(argv)  # key=value overrides may follow options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = [*args.overrides, *([f"parallel.device_memory={args.device_memory}"]
                                        if args.device_memory else [])]
        cfg = load_recipe(args.recipe, overrides)
        if args.launch_ranks:
            print(launch_ranks(cfg, args.launch_ranks, args.recipe))
            return 0
        if args.get:
            print(get_value(cfg, args.get, args.recipe))
            return 0
        try:
            if args.dry_run:
                from moe_merge.training.dry_run import dry_run

                dry_run(cfg, args.world_size or cfg.parallel.world_size or 1)
            else:
                from moe_merge.training.trainer import run

                run(cfg)
        except ConfigError as e:
            raise ConfigError(f"{args.recipe}: {e}") from None
    except MoeMergeError as e:  # bad input, a refused file, a spike not got past: one line
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3 if isinstance(e, SpikeError) else 2
    return 0


def launch_ranks(cfg, spec: str, recipe: str) -> int:
    """The ranks a launch on this node starts (``N``, or ``auto:N``: the recipe's
    parallel.world_size, else N), checked against the recipe: batch and EP arithmetic and, with
    parallel.device_memory, the memory plan. ConfigError names the recipe and the key."""
    from moe_merge.config.deepspeed import build_ds_config
    from moe_merge.config.recipe import check_world_size
    from moe_merge.training.memory_plan import check

    auto, _, n = spec.rpartition(":")
    if auto not in ("", "auto") or not n.isdigit() or int(n) < 1:
        raise ConfigError(f"--launch-ranks: '{spec}' is not N or auto:N")
    ranks = (cfg.parallel.world_size if auto else 0) or int(n)
    try:
        check_world_size(cfg, ranks)
        check(cfg, ranks, build_ds_config(cfg, ranks))
    except ConfigError as e:
        raise ConfigError(f"{recipe}: {e}") from None
    return ranks


def get_value(cfg, key: str, recipe: str):
    """One resolved recipe value by dotted key; ``run_dir`` is derived (output_dir / name)."""
    if key == "run_dir":
        return cfg.run_dir
    value = to_dict(cfg)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{recipe}: unknown key '{key}'")
        value = value[part]
    return value


if __name__ == "__main__":
    sys.exit(main())
