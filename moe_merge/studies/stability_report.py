"""Reports of the stability studies (pma-init, spike): results.json, report.md, PNG plots and
TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from moe_merge.studies.anneal_report import _ms

ARM_COLORS = {"latest": "tab:blue", "pma": "tab:green", "continue": "tab:gray",
              "rollback": "tab:orange"}


def write_report(out: Path, results: dict) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    if results["kind"] == "pma-init":
        plots = _pma_init_plots(out, results)
        _pma_init_tb(out, results)
        text = _pma_init_markdown(results, plots)
    else:
        plots = _spike_plots(out, results)
        _spike_tb(out, results)
        text = _spike_markdown(results, plots)
    (out / "report.md").write_text(text)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- pma-init ---------------------------------------------------------------------------------
LABELS = {"val_start": "val loss at step 0", "val_final": "val loss at the end",
          "val_mean": "val loss, mean over the run", "val_max": "val loss, highest (the "
          "re-warmup's bump)", "early_grad_norm_mean": "grad norm mean (first half of warmup)",
          "warmup_grad_norm_max":
          "grad norm max (warmup)", "warmup_grad_norm_std": "grad norm std (warmup)",
          "warmup_loss_mean": "train loss mean (warmup)", "grad_norm_max": "grad norm max (run)",
          "grad_norm_std": "grad norm std (run)", "spikes": "loss spikes detected"}


def _pma_init_markdown(res: dict, plots: list[str]) -> str:
    st = res["study"]
    seeds = [s["seed"] for s in res["seeds"]]
    w0 = res["seeds"][0]["window"]
    lines = [
        "# PMA-init study: continued training from merged weights", "",
        f"Stable-phase runs: `{res['recipe']}` (constant LR after warmup), seeds {seeds}. "
        f"Continued training (CT) of {res['ct_steps']} steps: linear warmup over "
        f"{res['ct_warmup_steps']} steps to each peak LR {st['ct_lrs']}, then cosine to "
        f"{st['ct_min_lr_ratio']:g} x peak. Two arms per (seed, LR), the same data, schedule "
        f"and optimizer policy (`{st['optimizer']}`): **latest** starts from the run's last "
        f"checkpoint, **pma** from the {st['strategy'].upper()} of its last {st['n']} "
        f"checkpoints (steps {w0} for seed {seeds[0]}). Spikes: the trainer's detector in "
        "`continue` mode. Mean ± std over seeds; *diff* is pma − latest per seed; "
        "*pma lower* counts the seeds where PMA-init had the lower value.", ""]
    for lr, row in res["summary"].items():
        lines += [f"## Peak LR {lr}", "", "| metric | latest | pma | diff (pma − latest) | "
                  "pma lower |", "|---|---|---|---|---|"]
        for m, label in LABELS.items():
            r = row[m]
            nf = r.get("nonfinite", {})
            note = (f" (non-finite: latest {nf['latest']}, pma {nf['pma']})"
                    if nf.get("latest") or nf.get("pma") else "")
            lines.append(f"| {label}{note} | {_ms(r['latest'])} | {_ms(r['pma'])} | "
                         f"{_ms(r['diff'])} | {r['pma_lower']}/{r['of']} |")
        lines.append("")
    lines += ["## Per seed", "", "| seed | LR | arm | val start | val end | grad norm max "
              "(warmup) | grad norm std (warmup) | spikes (steps) |", "|---|---|---|---|---|---|"
              "---|---|"]
    for s in res["seeds"]:
        for a in s["arms"].values():
            lines.append(f"| {s['seed']} | {a['lr']:g} | {a['init']} | {_f(a['val_start'])} | "
                         f"{_f(a['val_final'])} | {_f(a['warmup_grad_norm_max'])} | "
                         f"{_f(a['warmup_grad_norm_std'])} | {a['spikes']} "
                         f"{a['spike_steps'] if a['spikes'] else ''} |")
    return "\n".join([*lines, *_footer(res, plots)])


def _footer(res: dict, plots: list[str]) -> list[str]:
    """The plots and the study's cost, closing either report."""
    return ["", *[f"![{p}]({p})" for p in plots], "",
            f"Runs trained {res['runs_trained']}, reused {res['runs_reused']}; training "
            f"{res['train_seconds'] / 60:.1f} min, study {res['wall_seconds'] / 60:.1f} min.", ""]


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pma_init_plots(out: Path, res: dict) -> list[str]:
    plt = _plt()
    lrs = list(res["summary"])
    fig, axes = plt.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7), squeeze=False)
    for j, lr in enumerate(lrs):
        spiked = False
        for s in res["seeds"]:
            for arm in ("latest", "pma"):
                a = s["arms"][f"{lr}/{arm}"]
                label = f"{arm}-init" if s is res["seeds"][0] else None
                axes[0][j].plot([p[0] for p in a["val"]], [p[1] for p in a["val"]],
                                color=ARM_COLORS[arm], lw=1.2, alpha=0.8, label=label)
                c = a["curve"]
                axes[1][j].plot([p[0] for p in c], [p[2] for p in c], color=ARM_COLORS[arm],
                                lw=0.8, alpha=0.7, label=label)
                sp = set(a["spike_steps"])
                pts = [(p[0], p[2]) for p in c if p[0] in sp]
                if pts:
                    axes[1][j].scatter(*zip(*pts), marker="x", color="red", zorder=3,
                                       label="spike" if not spiked else None)
                    spiked = True
        axes[1][j].axvline(res["ct_warmup_steps"], color="gray", ls=":", lw=0.8)
        axes[0][j].set_title(f"CT at peak LR {lr}")
        axes[0][j].set_ylabel("validation loss")
        axes[1][j].set_ylabel("gradient norm (before clipping)")
        axes[1][j].set_xlabel("CT step (dotted: end of warmup)")
        axes[1][j].set_yscale("log")
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ct_curves.png", dpi=110)
    plt.close(fig)
    return ["ct_curves.png"]


def _tensorboard(out: Path, curves) -> None:
    """Each run's curves under its tag: ``curves`` yields (tag, [(x, train loss, grad norm)],
    [(step, val loss)])."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out / "tb"))
    try:
        for tag, train, val in curves:
            for x, loss, gn in train:
                w.add_scalar(f"{tag}/train_loss", loss, x)
                w.add_scalar(f"{tag}/grad_norm", gn, x)
            for step, v in val:
                w.add_scalar(f"{tag}/val_loss", v, step)
    finally:
        w.close()


def _pma_init_tb(out: Path, res: dict) -> None:
    _tensorboard(out, ((f"lr{a['lr']:g}/seed{s['seed']}/{a['init']}", a["curve"], a["val"])
                       for s in res["seeds"] for a in s["arms"].values()))


# ---- spike ------------------------------------------------------------------------------------
def _spike_markdown(res: dict, plots: list[str]) -> str:
    st, sb = res["study"], res["stability"]
    lines = [
        "# Loss-spike recovery study", "",
        f"Runs: `{res['recipe']}` at LR {res['lr']:g}, {res['total_steps']} steps, a "
        f"checkpoint every {res['checkpoint_every_steps']} steps, seeds {st['seeds']}. Each "
        f"seed is trained once per arm of `stability.on_spike`: **continue** (log only), "
        f"**rollback** (reload the newest checkpoint before the spike and replay the same "
        f"batches), **rollback+skip** (the same, then skip the next {st['skip_batches']} steps' "
        f"batches) and **pma** (reload the {sb['pma_strategy'].upper()} of the last "
        f"{sb['pma_n']} checkpoints before it, same batches); "
        f"optimizer state after a reload: `{sb['optimizer_state']}`; at most "
        f"{sb['max_retries']} retries per spike, each one checkpoint further back. A spike: "
        f"loss > {sb['loss_factor']:g} x trend, gradient norm > {sb['grad_norm_factor']:g} x "
        "trend, or non-finite. *Recovered*: the run finished, with finite losses, and got past "
        "the first spike's step back on trend (loss within the factor of the pre-spike trend); "
        "*steps to trend* counts the executed steps from the first spike to then, replays "
        "included. Mean ± std over the seeds whose run spiked (a run without a spike is the "
        "same in every arm).", "",
        "| arm | runs with a spike | recovered | gave up | steps to trend | spikes | "
        "recoveries | executed steps | final val loss |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, r in res["summary"].items():
        lines.append(f"| {arm} | {r['spiked']}/{r['runs']} | {r['recovered']}/{r['spiked']} | "
                     f"{r['gave_up']} | {_ms(r['steps_to_trend'], 1)} | {_ms(r['spikes'], 1)} | "
                     f"{_ms(r['recoveries'], 1)} | {_ms(r['executed_steps'], 0)} | "
                     f"{_ms(r['final_val'])} |")
    ref = next(iter(res["summary"].values()))["final_val_no_spike"]
    if ref["n"]:
        lines += ["", f"Runs without a spike ({ref['n']}): final val loss {_ms(ref)}."]
    lines += ["", "## Per seed", "", "| seed | arm | first spike | spikes | recoveries (resume "
              "steps) | recovered | steps to trend | final val |", "|---|---|---|---|---|---|"
              "---|---|"]
    for s in res["seeds"]:
        for arm, a in s["arms"].items():
            fs = a["first_spike"]
            first = f"{fs['step']} ({fs['kind']})" if fs else "-"
            outcome = ("gave up" if a["gave_up"] else "yes" if a["recovered"]
                       else "-" if not fs else "no")
            lines.append(
                f"| {s['seed']} | {arm} | {first} | "
                f"{a['spikes']} | {a['recoveries']} "
                f"{[r['resume_step'] for r in a['recovery_log']] if a['recoveries'] else ''} | "
                f"{outcome} | "
                f"{a['steps_to_trend'] if a['steps_to_trend'] is not None else '-'} | "
                f"{_f(a['final_val'])} |")
    return "\n".join([*lines, *_footer(res, plots)])


def _spike_plots(out: Path, res: dict) -> list[str]:
    plt = _plt()
    arms = list(res["summary"])
    seeds = res["seeds"]
    fig, axes = plt.subplots(2, len(arms), figsize=(5 * len(arms), 7), squeeze=False,
                             sharey="row")
    for j, arm in enumerate(arms):
        for s in seeds:
            a = s["arms"][arm]
            ex = a["executed"]
            x = list(range(1, len(ex) + 1))
            line = axes[0][j].plot(x, [e[1] for e in ex], lw=0.7, label=f"seed {s['seed']}")[0]
            axes[1][j].plot(x, [e[2] for e in ex], lw=0.7, color=line.get_color())
            pts = [(i + 1, ex[i][1]) for i in a.get("spike_at", [])]
            if pts:
                axes[0][j].scatter(*zip(*pts), marker="x", color="red", zorder=3, s=18)
        axes[0][j].set_title(f"on_spike = {arm}")
        axes[0][j].set_ylabel("train loss")
        axes[1][j].set_ylabel("gradient norm")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("executed optimizer steps (replays after reloads included)")
        axes[0][j].legend(fontsize=8)
    fig.suptitle("per-step loss and gradient norm; x: steps where a spike was detected")
    fig.tight_layout()
    fig.savefig(out / "spike_runs.png", dpi=110)
    plt.close(fig)
    return ["spike_runs.png"]


def _spike_tb(out: Path, res: dict) -> None:
    """x of the training curves: the executed step (replays after reloads included)."""
    _tensorboard(out, ((f"{arm}/seed{s['seed']}",
                        [(i, loss, gn) for i, (_, loss, gn) in enumerate(a["executed"], start=1)],
                        a["val"]) for s in res["seeds"] for arm, a in s["arms"].items()))
