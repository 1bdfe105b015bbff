"""The ``moe-merge`` console script."""

from __future__ import annotations

import argparse
import sys

from moe_merge import __version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-merge",
        description="Model merging during LLM pre-training (PMA) for DeepSpeed dense and MoE runs.",
        epilog="Training runs through the deepspeed launcher: ./launch/train.sh RECIPE [key=value ...]"
               " or deepspeed --num_gpus N --module moe_merge.train RECIPE [key=value ...].",
    )
    ap.add_argument("--version", action="version", version=f"moe-merge {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    dr = sub.add_parser("dry-run", help="validate a recipe; print the resolved recipe, DeepSpeed "
                                        "config and parameter counts")
    dr.add_argument("recipe")
    dr.add_argument("overrides", nargs="*", help="key=value overrides")
    dr.add_argument("--world-size", type=int, default=None)
    args = ap.parse_args(argv)
    if args.command == "dry-run":
        from moe_merge.train import main as train_main

        extra = ["--world-size", str(args.world_size)] if args.world_size else []
        return train_main([args.recipe, *args.overrides, "--dry-run", *extra])
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
