"""The ``moe-merge`` console script: inspect, merge and evaluate DeepSpeed checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from moe_merge import __version__
from moe_merge.errors import MergeError, MoeMergeError


def _inspect(args) -> int:
    from moe_merge.checkpoint.inspect import inspect, render

    report = inspect(args.ckpt, verify=False)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["mergeable"] else 1


def _merge(args) -> int:
    from moe_merge.merge.merger import OutputOptions, merge
    from moe_merge.merge.selection import Selection

    output = OutputOptions(fmt=args.format, hf_config=args.hf_config,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                           optimizer_state=args.optimizer_state)
    merge(args.ckpts, args.out, Selection.from_args(args), output, source=args.source,
          allow_nonfinite=args.allow_nonfinite, verify=not args.no_verify,
          progress=not args.quiet, distributed=args.distributed)
    return 0


def _study(args) -> int:
    from pathlib import Path

    out = Path(args.out or f"runs/study_{args.kind.replace('-', '_')}_{Path(args.recipe).stem}"
               + ("_quick" if args.quick else ""))
    echo = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    task_ov = _study_task_overrides(args)
    if args.kind != "anneal":
        if task_ov:
            raise MergeError(f"study {args.kind}: --tasks, --include-path, --limit and "
                             "--num-fewshot are for the anneal study")
        return _stability_study(args, out, echo)
    from moe_merge.studies.anneal import AnnealStudy

    study = AnnealStudy(args.recipe, [*args.overrides, *task_ov], out, quick=args.quick,
                        echo=echo)
    res = study.run()
    s = res["summary"]
    print(f"report: {out / 'report.md'}")
    cap = s["captured_pooled"]["sma"]
    sp = s["spearman_all"]
    sp_text = "n/a" if sp["mean"] is None else f"{sp['mean']:.3f}" + (
        f" (± {sp['std']:.3f})" if sp["n"] > 1 else "")
    if cap["mean"] is not None:
        spread = f" (± {100 * cap['std']:.0f}% over {cap['n']} seeds)" if cap["n"] > 1 else ""
        print(f"SMA captured {100 * cap['mean']:.0f}%{spread} of the annealing gain; Spearman "
              f"merged vs annealed {sp_text}")
    else:
        print("annealing did not lower the loss at these fork points: no captured fraction")
    return 0


def _study_task_overrides(args) -> list[str]:
    """``--tasks`` and its options as the study section's keys (study.tasks=[...] etc.)."""
    import os

    ov = []
    if args.tasks is not None:
        tasks = [t for t in args.tasks.split(",") if t]
        ov.append(f"study.tasks=[{','.join(tasks)}]")
    if args.include_path is not None:
        ov.append(f"study.task_include_path={os.path.abspath(args.include_path)}")
    if args.limit is not None:
        ov.append(f"study.task_limit={args.limit}")
    if args.num_fewshot is not None:
        ov.append(f"study.task_num_fewshot={args.num_fewshot}")
    if args.batch_size != 1:
        ov.append(f"study.task_batch_size={args.batch_size}")
    return ov


def _stability_study(args, out, echo) -> int:
    from moe_merge.studies.stability import PMAInitStudy, SpikeStudy

    cls = PMAInitStudy if args.kind == "pma-init" else SpikeStudy
    res = cls(args.recipe, args.overrides, out, quick=args.quick, echo=echo).run()
    print(f"report: {out / 'report.md'}")
    if args.kind == "pma-init":
        from moe_merge.studies.anneal_report import _ms

        for lr, row in res["summary"].items():
            gm, gs, vf = row["warmup_grad_norm_max"], row["warmup_grad_norm_std"], row["val_final"]
            print(f"CT peak LR {lr}: warmup grad-norm max latest {_ms(gm['latest'], 3)} vs PMA "
                  f"{_ms(gm['pma'], 3)} (PMA lower in {gm['pma_lower']}/{gm['of']} seeds), std "
                  f"{_ms(gs['latest'], 3)} vs {_ms(gs['pma'], 3)}; final val "
                  f"{_ms(vf['latest'])} vs {_ms(vf['pma'])}")
    else:
        for arm, r in res["summary"].items():
            print(f"{arm}: {r['spiked']}/{r['runs']} runs spiked, {r['recovered']} recovered, "
                  f"{r['gave_up']} gave up")
    return 0


def _analyze(args) -> int:
    from moe_merge.evals.analyze import analyze, render
    from moe_merge.merge.selection import Selection

    result = analyze(args.ckpts, selection=Selection.from_args(args), reference=args.reference,
                     recipe=args.recipe, overrides=args.set or [], hf_config=args.hf_config,
                     batches=args.batches, micro_batch=args.micro_batch,
                     float64=args.float64, out=args.out,
                     overwrite=args.overwrite, progress=not args.quiet,
                     echo=lambda s: print(s, file=sys.stderr, flush=True), data=args.data)
    print(json.dumps(result, indent=1) if args.json else render(result), end="")
    if args.out and not args.json:
        print(f"written: {args.out}/analysis.json, report.md, hessian_terms.png")
    return 0


def _eval(args) -> int:
    from moe_merge.evals.loss import evaluate

    if args.tasks:
        return _downstream(args)
    result = evaluate(args.model, recipe=args.recipe, data=args.data, overrides=args.overrides,
                      hf_config=args.hf_config)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}: validation loss {result['loss']:.4f}  perplexity "
              f"{result['ppl']:.2f}  ({result['tokens']:,} tokens, {result['data']})")
    return 0


def _downstream(args) -> int:
    from pathlib import Path

    from moe_merge.evals.downstream import TaskOptions, check_tasks, render, run_tasks
    from moe_merge.evals.loss import as_hf_dir
    from moe_merge.merge.writer import atomic_file

    tasks = [t for t in args.tasks.split(",") if t]
    options = TaskOptions(limit=args.limit, batch_size=args.batch_size,
                          include_path=args.include_path, num_fewshot=args.num_fewshot)
    check_tasks(tasks, options)  # before any model is read
    model = Path(args.model)
    if not model.exists():
        raise MergeError(f"{model}: no such file or directory")
    results = Path(args.results or f"lm_eval_{model.resolve().name}.json")
    with as_hf_dir(model, args.hf_config) as (hf_dir, label):
        out = run_tasks(hf_dir, tasks, options)
    out = {"model": label, "tasks": tasks, "limit": args.limit, **out}
    with atomic_file(results) as f:
        f.write(json.dumps(out, indent=2).encode())
    print(json.dumps(out["scores"], indent=2) if args.json else render(label, out["scores"]))
    print(f"results: {results}", file=sys.stderr)
    return 0


def _watch(args) -> int:
    from moe_merge.evals.downstream import TaskOptions, check_tasks
    from moe_merge.evals.watch import Watcher
    from moe_merge.merge.selection import Selection

    if args.tags:
        raise MergeError("watch: --tags names fixed checkpoints; use --last / --every")
    last = args.last or (len(args.weights) if args.weights else 3)
    selection = Selection(args.strategy, args.alpha, args.weights, last, args.every)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    options = TaskOptions(limit=args.limit, batch_size=args.batch_size,
                          include_path=args.include_path)
    if tasks:
        check_tasks(tasks, options)
    w = Watcher(args.run, args.out, selection, recipe=args.recipe, data=args.data,
                overrides=args.overrides, hf_config=args.hf_config, latest=not args.no_latest,
                tasks=tasks, task_options=options, poll=args.poll, idle_exit=args.idle_exit,
                echo=lambda s: print(s, file=sys.stderr, flush=True))
    n = w.watch()
    print(f"watch: {n} merge(s) scored this time; {args.out}/watch.jsonl")
    return 0


def _compare(args) -> int:
    from moe_merge.evals.compare import compare, render

    result = compare(args.run, args.merged, png=args.png, recipe=args.recipe,
                     hf_config=args.hf_config,
                     echo=(lambda s: None) if args.quiet else None)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(render(result), end="")
    if result["png"]:
        print(f"plot: {result['png']}")
    return 0


def _task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval-harness tasks scored on the model (downstream "
                        "benchmarks, e.g. hellaswag,arc_easy)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval --limit)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (1)")
    p.add_argument("--include-path", default=None, help="a directory of local task YAMLs")


def build_parser() -> argparse.ArgumentParser:
    from moe_merge.merge import selection

    ap = argparse.ArgumentParser(
        prog="moe-merge",
        description="Model merging during LLM pre-training (PMA) for DeepSpeed dense and MoE runs.",
        epilog="Training runs through the deepspeed launcher: "
               "./launch/train.sh RECIPE [key=value ...]"
               " or deepspeed --num_gpus N --module moe_merge.train RECIPE [key=value ...].",
    )
    ap.add_argument("--version", action="version", version=f"moe-merge {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command (merge --distributed)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    dr = sub.add_parser("dry-run", help="validate a recipe; print the resolved recipe, DeepSpeed "
                                        "config and parameter counts")
    dr.add_argument("recipe")
    dr.add_argument("overrides", nargs="*", help="key=value overrides")
    dr.add_argument("--world-size", type=int, default=None)
    dr.add_argument("--device-memory", metavar="SIZE", default=None,
                    help="memory of one rank's device (80GB, 80GiB): does the run fit, and what "
                         "to change if not (= parallel.device_memory=SIZE)")

    ins = sub.add_parser("inspect", help="describe DeepSpeed checkpoints: tags, steps, layout, "
                                         "parameter counts, whether they can be merged")
    ins.add_argument("ckpt", help="a run directory, its checkpoints/ directory, or one "
                                  "global_stepN/")
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    mg = sub.add_parser("merge", help="average checkpoints (SMA / EMA / WMA / explicit weights) "
                                      "into an HF model or a safetensors state dict")
    mg.add_argument("ckpts", nargs="+", metavar="CKPT",
                    help="run directories, checkpoints/ directories or global_stepN/ directories")
    mg.add_argument("--out", required=True, help="output directory (written atomically)")
    selection.add_arguments(mg)
    mg.add_argument("--format", default="hf", choices=["hf", "safetensors", "deepspeed"],
                    help="hf: transformers directory (default); safetensors: the full logical "
                         "state dict under the checkpoint's own parameter names; deepspeed: a "
                         "checkpoint in the newest input's layout that engine.load_checkpoint "
                         "resumes from (PMA-init)")
    mg.add_argument("--optimizer-state", default="latest", choices=["reset", "latest", "merged"],
                    help="Adam moments of a deepspeed output: zeroed, the newest checkpoint's "
                         "(default), or averaged with the same weights")
    mg.add_argument("--hf-config", default=None,
                    help="directory with the HF config.json (and tokenizer) when the run has no "
                         "hf/")
    mg.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (2GB)")
    mg.add_argument("--source", default="master", choices=["master", "module"],
                    help="master: fp32 master weights from the optimizer partitions (default); "
                         "module: the module weights (rounded in bf16 runs)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mg.add_argument("--allow-nonfinite", action="store_true",
                    help="merge even if an input tensor holds NaN or Inf")
    mg.add_argument("--no-verify", action="store_true",
                    help="skip the CRC-32 check of the tensor records read")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.add_argument("--distributed", action="store_true",
                    help="one rank of a merge started by a launcher (deepspeed --module "
                         "moe_merge.cli merge ... --distributed): the output shards are shared "
                         "out among the ranks; hf or safetensors output on a shared file system")

    sd = sub.add_parser("study", help="reproducible studies: anneal (do merged constant-LR "
                                      "checkpoints predict annealing?), pma-init (continued "
                                      "training from merged weights), spike (recovering from "
                                      "loss spikes: pma vs rollback vs continue)")
    sd.add_argument("kind", choices=["anneal", "pma-init", "spike"])
    sd.add_argument("recipe", help="study recipe (e.g. recipes/study_anneal_tiny.yaml, "
                                   "recipes/study_pma_init_tiny.yaml, "
                                   "recipes/study_spike_tiny.yaml)")
    sd.add_argument("overrides", nargs="*", help="key=value overrides of the training recipe, "
                                                 "or study.key=value of its study section")
    sd.add_argument("--out", default=None,
                    help="study directory (default runs/study_KIND_RECIPE); re-running "
                         "continues an interrupted study")
    sd.add_argument("--quick", action="store_true",
                    help="a tiny model and a short run (a few minutes; for tests)")
    _task_arguments(sd)
    sd.add_argument("--num-fewshot", type=int, default=None,
                    help="with --tasks: few-shot examples per document")

    an = sub.add_parser("analyze", help="measure why merging helps: Hessian-vector products give "
                                        "δ_iᵀHδ_j of the merged checkpoints, the predicted and "
                                        "the measured gain")
    an.add_argument("ckpts", nargs="+", metavar="CKPT",
                    help="run directories, checkpoints/ directories or global_stepN/ directories")
    selection.add_arguments(an)
    an.add_argument("--reference", default=None,
                    help="expand around this point instead of the merged weights: a checkpoint "
                         "tag, a run (its newest tag) or an HF model directory, e.g. an annealed "
                         "branch as a stand-in for the optimum θ* of the paper's derivation")
    an.add_argument("--recipe", default=None,
                    help="recipe giving the validation batches (default: the run's recipe.yaml)")
    an.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="recipe override for the batches, e.g. --set logging.val_batches=16")
    an.add_argument("--batches", type=int, default=None,
                    help="use only the first B validation micro-batches (each costs one "
                         "Hessian-vector product per checkpoint)")
    an.add_argument("--micro-batch", type=int, default=None,
                    help="windows per forward/backward pass (default: the recipe's micro "
                         "batch); lower it when the double backward runs out of memory")
    an.add_argument("--float64", action="store_true",
                    help="compute in float64 (slower; removes float32 rounding from small gains)")
    an.add_argument("--hf-config", default=None, help="HF config directory when the run has no hf/")
    an.add_argument("--data", default=None,
                    help="measure on this data (as eval --data): for runs without a recipe")
    an.add_argument("--out", default=None, help="write analysis.json, report.md and "
                                                "hessian_terms.png into this directory")
    an.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    an.add_argument("--json", action="store_true", help="print the full result as JSON")
    an.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="validation loss and perplexity of an HF model directory or "
                                     "a checkpoint on the run's fixed validation batches")
    ev.add_argument("model", help="HF model directory (e.g. a merge output), run directory, or "
                                  "global_stepN/")
    ev.add_argument("overrides", nargs="*", help="key=value recipe overrides "
                                                 "(e.g. logging.val_batches=16)")
    ev.add_argument("--recipe", default=None,
                    help="recipe giving the validation batches (default: the run's recipe.yaml)")
    ev.add_argument("--data", default=None,
                    help="evaluate on this data instead (text, JSONL, a directory of them, "
                         "tokenized with the model's tokenizer, or a pre-tokenized .bin): the "
                         "first windows of all of it, as many as the recipe's validation batches")
    ev.add_argument("--hf-config", default=None, help="HF config directory for a checkpoint "
                                                      "without hf/")
    ev.add_argument("--json", action="store_true")
    _task_arguments(ev)
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval's --num_fewshot")
    ev.add_argument("--results", default=None,
                    help="with --tasks: where the results JSON goes (default "
                         "./lm_eval_<model>.json)")

    wt = sub.add_parser("watch", help="follow a run (ours, a transformers Trainer's or "
                                      "Accelerate's) from beside it: merge the latest "
                                      "checkpoints each time one lands and score the merge")
    wt.add_argument("run", help="the run directory (a Trainer output_dir, an Accelerate project)")
    wt.add_argument("overrides", nargs="*", help="key=value recipe overrides for the scoring")
    wt.add_argument("--out", required=True,
                    help="where watch.jsonl and tb/ go (kept between restarts)")
    selection.add_arguments(wt)
    wt.add_argument("--recipe", default=None,
                    help="recipe giving the validation batches (default: the run's recipe.yaml)")
    wt.add_argument("--data", default=None, help="score on this data instead (as eval --data)")
    wt.add_argument("--hf-config", default=None, help="HF config directory when the run has none")
    wt.add_argument("--no-latest", action="store_true",
                    help="do not also score the newest checkpoint alone (no gap)")
    _task_arguments(wt)
    wt.add_argument("--poll", type=float, default=30.0, help="seconds between looks (30)")
    wt.add_argument("--idle-exit", type=float, default=None,
                    help="stop after this many seconds without a new checkpoint")

    cp = sub.add_parser("compare", help="a merged model against its run: latest checkpoint and "
                                        "merged validation loss, the gain, and a plot of every "
                                        "checkpoint's loss against tokens")
    cp.add_argument("run", help="the run directory the merge was made from")
    cp.add_argument("merged", help="a moe-merge merge output (HF directory with its manifest)")
    cp.add_argument("--png", default=None,
                    help="write the plot here (evaluates every checkpoint of the run)")
    cp.add_argument("--recipe", default=None,
                    help="recipe giving the validation batches (default: RUN/recipe.yaml)")
    cp.add_argument("--hf-config", default=None, help="HF config directory for checkpoints of a "
                                                      "run without hf/")
    cp.add_argument("--json", action="store_true", help="print every number as JSON")
    cp.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    # key=value overrides may come after options (moe-merge study anneal R --quick k=v)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-")
                                                    for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "dry-run":
        from moe_merge.train import main as train_main

        extra = ["--world-size", str(args.world_size)] if args.world_size else []
        if args.device_memory:
            extra += ["--device-memory", args.device_memory]
        return train_main([args.recipe, *args.overrides, "--dry-run", *extra])
    if args.command is None:
        ap.print_help()
        return 0
    handlers = {"inspect": _inspect, "merge": _merge, "eval": _eval, "study": _study,
                "analyze": _analyze, "compare": _compare, "watch": _watch}
    try:
        return handlers[args.command](args)
    except MoeMergeError as e:  # bad input or a failed step: one line, exit 2
        print(f"moe-merge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-merge {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
