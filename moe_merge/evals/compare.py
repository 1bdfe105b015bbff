"""A merged model against the run it was merged from: validation losses, gain and a plot.

Every number is a :func:`moe_merge.evals.loss.evaluate` of the same directory on the run's fixed
validation batches, so the table equals ``moe-merge eval`` of the latest checkpoint and of the
merged model. The plot shows validation loss against training tokens for every checkpoint, the
merged model as a point at its newest input's tokens and the window of checkpoints it averages.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from moe_merge.errors import MergeError

MANIFEST = "merge_manifest.json"


def strategy_label(strategy: str | None, alpha: float | None, n: int) -> str:
    """How a merge is named in the table: 'SMA of 4', 'EMA α=0.2 of 6', 'weights of 3'."""
    name = {"sma": "SMA", "wma": "WMA", "ema": "EMA", "weights": "weights"}.get(
        strategy or "", strategy or "merge")
    if strategy == "ema" and alpha is not None:
        name += f" α={alpha:g}"
    return f"{name} of {n}"


def read_manifest(merged: Path) -> dict:
    """The merge manifest of a ``moe-merge merge`` output directory."""
    path = Path(merged) / MANIFEST
    if not path.is_file():
        raise MergeError(f"{merged}: no {MANIFEST}; not a moe-merge merge output")
    try:
        manifest = json.loads(path.read_text())
        inputs = manifest["inputs"]
        if not inputs or not all(isinstance(i["step"], int) for i in inputs):
            raise ValueError("no inputs with integer steps")
    except (ValueError, KeyError, TypeError) as e:
        raise MergeError(f"{path}: not a readable merge manifest ({e})") from None
    return manifest


def merged_window(manifest: dict, checkpoints: list[dict], run: str | Path) -> list[dict]:
    """The run's checkpoints (tag, step, tokens) that the merge averaged, oldest first, each
    with its merge weight; every input must be a checkpoint of ``run``."""
    by_step = {c["step"]: c for c in checkpoints}
    window = []
    for inp in manifest["inputs"]:
        ckpt = by_step.get(inp["step"])
        if ckpt is None:
            raise MergeError(f"{inp.get('path', inp['step'])}: an input of the merge is not a "
                             f"checkpoint of {run} (no step {inp['step']} there)")
        window.append({**ckpt, "weight": inp.get("weight")})
    return sorted(window, key=lambda c: c["step"])


def summarize(latest: dict, merged: dict) -> dict:
    """The table's rows: latest and merged validation loss, gain = latest − merged (> 0: the
    merge is better)."""
    return {"latest": latest["loss"], "merged": merged["loss"],
            "gain": latest["loss"] - merged["loss"]}


def render(result: dict) -> str:
    """The comparison as a short aligned table."""
    latest, merged, window = result["latest"], result["merged"], result["merged"]["inputs"]
    span = (window[0]["tag"] if len(window) == 1
            else f"{window[0]['tag']}..{window[-1]['step']}")
    rows = [(f"latest checkpoint ({latest['tag']})", f"{latest['tokens']:,}",
             f"{latest['loss']:.4f}"),
            (f"merged: {merged['label']} ({span})", f"{merged['tokens']:,}",
             f"{merged['loss']:.4f}"),
            ("gain = latest - merged", "", f"{result['gain']:+.4f}")]
    w0 = max(len(r[0]) for r in rows + [("model",)])
    w1 = max(len(r[1]) for r in rows + [("", "tokens")])
    lines = [f"validation loss on {result['windows']} fixed windows ({result['tokens_scored']:,} "
             f"tokens scored) of {result['recipe']}",
             f"  {'model':<{w0}}  {'tokens':>{w1}}  val loss"]
    lines += [f"  {a:<{w0}}  {b:>{w1}}  {c:>8}" for a, b, c in rows]
    if window[-1]["step"] != latest["step"]:
        lines.append(f"  note: the merge ends at {window[-1]['tag']}, before the latest "
                     "checkpoint")
    return "\n".join(lines) + "\n"


def plot(checkpoints: list[dict], merged: dict, path: str | Path, title: str = "") -> Path:
    """Validation loss against tokens: every checkpoint, the merged window shaded, the merged
    model as a star at its newest input's tokens; the right panel zooms on the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not checkpoints:
        raise MergeError(f"{path}: no checkpoint losses to plot")
    pts = sorted(checkpoints, key=lambda c: c["tokens"])
    window = merged["inputs"]
    lo, hi = window[0]["tokens"], window[-1]["tokens"]
    steps_in = {c["step"] for c in window}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    near = [c for c in pts if c["tokens"] >= lo - 2 * max(hi - lo, 1)]
    for ax, shown in zip(axes, (pts, near)):
        ax.plot([c["tokens"] for c in shown], [c["loss"] for c in shown], "o-", color="C0",
                ms=4, lw=1.2, label="checkpoints")
        inside = [c for c in shown if c["step"] in steps_in]
        ax.plot([c["tokens"] for c in inside], [c["loss"] for c in inside], "o", color="C1",
                ms=6, mfc="none", mew=1.5, label=f"merged window ({len(window)} checkpoints)")
        ax.axvspan(lo, hi, color="C1", alpha=0.12, lw=0)
        ax.plot([hi], [merged["loss"]], "*", color="C3", ms=15, zorder=5,
                label=f"merged {merged['label']}: {merged['loss']:.4f}")
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens_tick))
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    loss_near = [c["loss"] for c in near] + [merged["loss"]]
    pad = 0.1 * (max(loss_near) - min(loss_near) or 0.01)
    axes[1].set_ylim(min(loss_near) - pad, max(loss_near) + pad)
    axes[0].set_title(title or "validation loss of every checkpoint and the merge", fontsize=10)
    axes[1].set_title("zoom on the merged window", fontsize=10)
    axes[1].legend(fontsize=8, loc="upper right")
    axes[0].set_xlim(0, pts[-1]["tokens"] * 1.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tokens_tick(x: float, _pos: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


@contextlib.contextmanager
def _no_loading_bars():
    """transformers' per-model "Loading weights" bars off (one per evaluation otherwise)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def compare(run: str | Path, merged: str | Path, png: str | Path | None = None,
            recipe: str | Path | None = None, hf_config: str | Path | None = None,
            echo: Callable[[str], None] | None = None) -> dict:
    """Evaluate the run's latest checkpoint and ``merged`` (and, with ``png``, every
    checkpoint for the plot) on the run's validation batches; returns every number."""
    from moe_merge.checkpoint.discover import find_tags
    from moe_merge.config.recipe import load_recipe
    from moe_merge.evals.loss import eval_windows, score

    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    run, merged = Path(run), Path(merged)
    recipe_path = Path(recipe) if recipe else run / "recipe.yaml"
    if not recipe_path.is_file():
        raise MergeError(f"{recipe_path}: no recipe for the validation batches; pass --recipe")
    cfg = load_recipe(recipe_path, [])
    tokens_per_step = cfg.parallel.global_batch * cfg.data.seq_len
    manifest = read_manifest(merged)
    tags = find_tags([run])
    checkpoints = [{"tag": t.name, "step": t.step, "path": str(t.path),
                    "tokens": int(t.tokens if t.tokens is not None else t.step * tokens_per_step)}
                   for t in tags]
    window = merged_window(manifest, checkpoints, run)
    todo = checkpoints if png else [checkpoints[-1]]
    windows = eval_windows(cfg)  # the same for every model scored
    with _no_loading_bars():
        for i, c in enumerate(todo, 1):
            echo(f"evaluating {c['tag']} ({i}/{len(todo)})")
            c["loss"] = score(Path(c["path"]), cfg, recipe_path, hf_config=hf_config,
                              windows=windows)["loss"]
        echo(f"evaluating {merged}")
        m = score(merged, cfg, recipe_path, windows=windows)
    losses = {c["step"]: c["loss"] for c in todo}
    inputs = [{**c, "loss": losses.get(c["step"])} for c in window]
    merged_row = {"path": str(merged), "strategy": manifest.get("strategy"),
                  "alpha": manifest.get("alpha"),
                  "label": strategy_label(manifest.get("strategy"), manifest.get("alpha"),
                                          len(window)),
                  "inputs": inputs, "tokens": window[-1]["tokens"], "loss": m["loss"]}
    latest = checkpoints[-1]
    result = {"run": str(run), "recipe": str(recipe_path), "windows": m["windows"],
              "tokens_scored": m["tokens"], "checkpoints": todo, "latest": latest,
              "merged": merged_row, "gain": summarize(latest, merged_row)["gain"], "png": None}
    if png:
        title = (f"{run.name}: validation loss (merge gain {result['gain']:+.4f} over "
                 f"{latest['tag']})")
        result["png"] = str(plot(todo, merged_row, png, title=title))
    return result
