"""Report of the annealing study: results.json, report.md, PNG plots, TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path

STRATS = ("sma", "wma", "ema0.1", "ema0.2")
COLORS = {"sma": "tab:green", "wma": "tab:purple", "ema0.1": "tab:olive", "ema0.2": "tab:cyan"}


def _ms(d: dict | None, digits: int = 4) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d["n"] > 1 else \
        f"{d['mean']:.{digits}f}"


def _pct(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{100 * d['mean']:.0f}% ± {100 * d['std']:.0f}%" if d["n"] > 1 else \
        f"{100 * d['mean']:.0f}%"


def write_report(out: Path, results: dict) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    plots = _plots(out, results)
    _tensorboard(out, results)
    (out / "report.md").write_text(_markdown(results, plots))


def _markdown(res: dict, plots: list[str]) -> str:
    s, st = res["summary"], res["study"]
    seeds = [r["seed"] for r in res["seeds"]]
    tps = res["tokens_per_step"]
    lines = [
        "# Annealing prediction study", "",
        f"Trunk: `{res['recipe']}` (constant LR after warmup), {tps} tokens per step, a "
        f"checkpoint every {res['checkpoint_every_steps']} steps; seeds {seeds}. Forks at steps "
        f"{res['fork_steps']}; each annealing branch decays the LR over "
        f"{round(st['decay_tokens'] / tps)} steps ({st['decay_shape']}). Headline merges: the "
        f"latest N = {st['n']} checkpoints, every {st['interval']}-th (V = "
        f"{st['interval'] * res['checkpoint_every_steps']} steps). Each branch is compared with "
        "the trunk at the branch's last step (same tokens): *latest* is the trunk's checkpoint "
        "there, *merged* the merge of the trunk's checkpoints up to there, *annealed* the "
        "branch's end. All losses on the trunk's fixed validation batches; mean ± standard "
        "deviation over seeds.", "",
        "## Headline", "",
        "| fork → step | latest | annealed | " + " | ".join(f"merged {k}" for k in STRATS)
        + " | Tissue prediction |",
        "|---|---|---|" + "---|" * len(STRATS) + "---|"]
    for f, row in s["per_fork"].items():
        lines.append(f"| {f} → {row['step']} | {_ms(row['latest'])} | {_ms(row['annealed'])} | "
                     + " | ".join(_ms(row[f"merged_{k}"]) for k in STRATS)
                     + f" | {_ms(row['tissue'])} |")
    lines += ["", "Fraction of the annealing gain captured by merging, "
              "(L_latest − L_merged) / (L_latest − L_annealed): *pooled*, per seed the merge gains "
              "summed over the fork points over the annealing gains summed likewise, mean ± std "
              "over the seeds whose summed annealing gain is positive; *per fork*, the mean of "
              "the single ratios over forks and seeds with a positive annealing gain (unstable "
              "where that gain is near 0). Absolute error "
              "|L_merged − L_annealed|; merged better than the latest checkpoint:",
              "", "| strategy | captured (pooled) | captured (per fork) | abs. error | "
              "beats latest |", "|---|---|---|---|---|"]
    for k in STRATS:
        b = s["beats_latest"][k]
        lines.append(f"| {k} | {_pct(s.get('captured_pooled', {}).get(k))} | "
                     f"{_pct(s['captured'][k])} | {_ms(s['abs_error'][k])} | "
                     f"{b['count']} of {b['of']} |")
    lines += ["", f"- Annealing gain L_latest − L_annealed: {_ms(s['annealing_gain'])}.",
              f"- Tissue et al. law (fitted to the trunk + the first branch), abs. error on the "
              f"annealed losses: {_ms(s['tissue_abs_error'])}.",
              f"- Spearman rank correlation, merged vs annealed loss over all forks × strategies "
              f"(per seed): {_ms(s['spearman_all'], 3)}; SMA over the fork points: "
              f"{_ms(s['spearman_sma_forks'], 3)}.", ""]
    lines += _mechanism(res)
    lines += _downstream(res)
    grid = [c for c in res["seeds"][0]["grid"]]
    if grid:
        lines += ["## Ablation grid (first seed)", "",
                  "Merged loss minus the latest checkpoint's (negative: merging helps); "
                  "`-` the window does not fit in the run; `w` it reaches into warmup.", ""]
        for f in sorted({c["fork_step"] for c in grid}):
            lines += [f"Windows ending at step {f}:", "",
                      "| V (ckpts) | N | " + " | ".join(STRATS) + " |",
                      "|---|---|" + "---|" * len(STRATS)]
            for c in [c for c in grid if c["fork_step"] == f]:
                cells = [("-" if not c["fits"] else
                          f"{c['merged'][k] - c['latest']:+.4f}"
                          f"{' w' if c['reaches_warmup'] else ''}")
                         for k in STRATS]
                lines.append(f"| {c['interval']} | {c['n']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += [f"Study wall time {res['wall_seconds'] / 60:.1f} min: "
              f"{res.get('runs_trained', 0)} runs trained in this invocation "
              f"({res.get('train_seconds', 0) / 60:.1f} min), {res.get('runs_reused', 0)} "
              "reused from an earlier one.", ""]
    return "\n".join(lines)


def _plots(out: Path, res: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = res["tokens_per_step"]
    made = []
    seed0 = res["seeds"][0]
    fig, ax = plt.subplots(figsize=(8, 5))
    tv = seed0["trunk_val"]
    ax.plot([s * tps for s, _ in tv], [v for _, v in tv], color="tab:blue",
            label="constant LR (trunk)")
    for i, (f, curve) in enumerate(seed0["branch_val"].items()):
        pts = [(s, v) for s, v in curve if s >= int(f)]
        ax.plot([s * tps for s, _ in pts], [v for _, v in pts], color="tab:red",
                label="annealed branches" if i == 0 else None)
    for k in STRATS:
        ax.scatter([r["tokens"] for r in seed0["forks"]], [r["merged"][k] for r in seed0["forks"]],
                   color=COLORS[k], marker="o", s=25, label=f"merged {k} (trunk checkpoints)",
                   zorder=3)
    ax.scatter([r["annealed_step"] * tps for r in seed0["forks"] if "tissue" in r],
               [r["tissue"] for r in seed0["forks"] if "tissue" in r], marker="x", color="black",
               label="Tissue prediction", zorder=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"seed {seed0['seed']}: constant vs annealed vs merged")
    lo = min([v for _, v in tv[len(tv) // 3:]] + [r["annealed"] for r in seed0["forks"]])
    hi = max(v for _, v in tv[len(tv) // 3:])
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=110)
    plt.close(fig)
    made.append("loss_vs_tokens.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in res["seeds"]:
        g = s["gain_vs_lr"]
        ax.scatter([p["lr"] for p in g], [p["gain"] for p in g], s=14, label=f"seed {s['seed']}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("LR at the newest merged checkpoint (along the annealing branches)")
    ax.set_ylabel("merge gain: L_latest − L_SMA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gain_vs_lr.png", dpi=110)
    plt.close(fig)
    made.append("gain_vs_lr.png")

    grid = seed0["grid"]
    if grid:
        import numpy as np

        forks = sorted({c["fork_step"] for c in grid})
        vs = sorted({c["interval"] for c in grid})
        ns = sorted({c["n"] for c in grid})
        fig, axes = plt.subplots(len(forks), len(STRATS),
                                 figsize=(3.2 * len(STRATS), 2.8 * len(forks)), squeeze=False)
        for i, f in enumerate(forks):
            for j, k in enumerate(STRATS):
                m = np.full((len(vs), len(ns)), np.nan)
                for c in grid:
                    if c["fork_step"] == f and c["fits"]:
                        m[vs.index(c["interval"]), ns.index(c["n"])] = c["merged"][k] - c["latest"]
                ax = axes[i][j]
                lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
                im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_xticks(range(len(ns)), [str(n) for n in ns])
                ax.set_yticks(range(len(vs)), [str(v) for v in vs])
                ax.set_xlabel("N")
                ax.set_ylabel("V (checkpoints)")
                ax.set_title(f"{k}, step {f}", fontsize=9)
                for a in range(len(vs)):
                    for b in range(len(ns)):
                        if math.isfinite(m[a, b]):
                            ax.text(b, a, f"{m[a, b]:+.3f}", ha="center", va="center", fontsize=7)
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("merged − latest validation loss (blue: merging helps); windows ending at "
                     "the step shown")
        fig.tight_layout()
        fig.savefig(out / "grid_heatmap.png", dpi=110)
        plt.close(fig)
        made.append("grid_heatmap.png")
    return made


def _tensorboard(out: Path, res: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out / "tb"))
    try:
        for s in res["seeds"]:
            for r in s["forks"]:
                step = r["tokens"]
                w.add_scalar(f"seed{s['seed']}/latest", r["latest"], step)
                w.add_scalar(f"seed{s['seed']}/annealed", r["annealed"], step)
                for k in STRATS:
                    w.add_scalar(f"seed{s['seed']}/merged_{k}", r["merged"][k], step)
                if "tissue" in r:
                    w.add_scalar(f"seed{s['seed']}/tissue", r["tissue"], step)
                for model, tasks in r.get("downstream", {}).items():
                    for task, metrics in tasks.items():
                        for m, v in metrics.items():
                            w.add_scalar(f"seed{s['seed']}/{task}/{m}/{model}", v, step)
    finally:
        w.close()


def _downstream(res: dict) -> list[str]:
    """The lm-eval task scores (``study.tasks``): per task and metric, latest | merges |
    annealed, mean ± std over forks and seeds."""
    d = res["summary"].get("downstream")
    if not d:
        return []
    st = res["study"]
    models = ["latest", *[f"merged_{k}" for k in st["task_strategies"]], "annealed"]
    models = [m for m in models if m in d]
    limit = f", at most {st['task_limit']} documents per task" if st.get("task_limit") else ""
    lines = ["## Downstream tasks (lm-eval-harness)", "",
             f"Tasks {', '.join(st['tasks'])}{limit}; the models of the headline table, "
             "mean ± std over fork points and seeds.", "",
             "| task | metric | " + " | ".join(m.replace("_", " ") for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    first = d[models[0]]
    for task, metrics in first.items():
        for m in metrics:
            lines.append(f"| {task} | {m} | " + " | ".join(
                _ms(d[model].get(task, {}).get(m)) for model in models) + " |")
    return lines + [""]


def _mechanism(res: dict) -> list[str]:
    """The Hessian-vector-product terms of the headline SMA window at the latest fork."""
    mech = [(r["seed"], r["mechanism"]) for r in res["seeds"] if r.get("mechanism")]
    if not mech:
        return []
    m0 = mech[0][1]
    lines = ["## Mechanism: second-order terms (`moe-merge analyze`)", "",
             f"The headline SMA window at the latest fork (steps {m0['window']}, merged at step "
             f"{m0['step']}), on {m0['batches']} validation micro-batches. D_ij = δ_iᵀHδ_j with "
             "Hessian-vector products, δ_i the deviation of checkpoint i from the expansion "
             "point: the merged weights (where Σ_(i≠j) D_ij = −Σ D_ii by construction, so the "
             "question is which pairs are complementary), or the annealed branch's end, a "
             "stand-in for the optimum θ* of the paper's derivation (where the paper's condition "
             "Σ_(i≠j) D_ij < (k − 1) Σ D_ii is a real test). *gain*: mean loss of the "
             "checkpoints minus the merged loss, measured and predicted to second order; "
             "*vs latest*: the latest checkpoint's loss minus the merged loss.", "",
             "| seed | expansion point | negative cross-terms | gain measured | gain predicted | "
             "vs latest measured | vs latest predicted | paper's condition |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, m in mech:
        for ref in ("around_merged", "around_annealed"):
            t = m[ref]
            ct = t["cross_terms"]
            lines.append(f"| {seed} | {ref.split('_')[1]} | {ct['negative']} of {ct['pairs']} | "
                         f"{t['gain']['measured']:+.4f} | {t['gain']['predicted']:+.4f} | "
                         f"{t['gain_vs_latest']['measured']:+.4f} | "
                         f"{t['gain_vs_latest']['predicted']:+.4f} | "
                         f"{'holds' if ct['merging_helps'] else 'fails'} |")
    sm = res["summary"].get("mechanism")
    if sm and len(mech) > 1:
        lines.append("")
        for ref, v in sm.items():
            lines.append(f"- around the {ref.split('_')[1]} point: negative cross-terms "
                         f"{_pct(v['negative_fraction'])}, gain measured "
                         f"{_ms(v['measured_gain'])} against predicted {_ms(v['predicted_gain'])}"
                         f"; the paper's condition holds in {v['paper_condition_holds']} of "
                         f"{v['of']} seeds.")
    return [*lines, ""]
