"""``moe-merge analyze``: measure the second-order mechanism of merging with Hessian-vector
products.

The PMA paper (arXiv 2505.12082) explains the merge gain with a second-order expansion: with
deviations δ_i = θ_i − θ_r from a point θ_r and H the Hessian of the validation loss there,

    L(θ_i) ≈ L(θ_r) + gᵀδ_i + ½ δ_iᵀHδ_i,      θ̄ = Σ w_i θ_i,  δ̄ = Σ w_i δ_i.

The weighted mean of the individual losses minus the merged loss is then

    gain = ½ [Σ_i w_i δ_iᵀHδ_i − δ̄ᵀHδ̄] = ½ [Σ_i w_i (1 − w_i) D_ii − Σ_{i≠j} w_i w_j D_ij]

with D_ij = δ_iᵀHδ_j: the gradient cancels, merging helps when the cross-terms are negative
(complementary deviations), and for SMA (w_i = 1/k) it is the paper's condition
Σ_{i≠j} D_ij < (k − 1) Σ_i D_ii. For a quadratic loss all of this is exact and does not depend on
θ_r.

This module measures D with Hessian-vector products (double backward, one per checkpoint per
batch) at θ_r (by default the merged weights, so δ̄ = 0), the gradient term gᵀδ_i, and the
losses themselves, so the predicted gain can be set against the measured one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import weighted_sum

# (model, batch) -> summed loss over the batch's tokens (a scalar tensor) and the token count
LossFn = Callable[[torch.nn.Module, object], "tuple[torch.Tensor, int]"]


@dataclass
class SecondOrder:
    """The measured terms, all on the same batches (index i follows the input order)."""

    weights: list[float]
    loss_reference: float        # L(θ_r)
    loss_merged: float           # L(θ̄)
    loss_points: list[float]     # L(θ_i)
    grad_dot: list[float]        # gᵀδ_i, g = ∇L(θ_r)
    D: list[list[float]]         # δ_iᵀ H δ_j, H = ∇²L(θ_r)
    delta_norm: list[float]      # |δ_i|
    tokens: int

    # ---- derived ------------------------------------------------------------------------
    def _w(self):
        return self.weights, len(self.weights)

    @property
    def merged_delta_hessian(self) -> float:
        """δ̄ᵀHδ̄ = Σ_ij w_i w_j D_ij (0 when θ_r is the merged point)."""
        w, k = self._w()
        return sum(w[i] * w[j] * self.D[i][j] for i in range(k) for j in range(k))

    @property
    def predicted_gain(self) -> float:
        """½ [Σ w_i D_ii − δ̄ᵀHδ̄]: second-order prediction of Σ w_i L(θ_i) − L(θ̄)."""
        w, k = self._w()
        return 0.5 * (sum(w[i] * self.D[i][i] for i in range(k)) - self.merged_delta_hessian)

    @property
    def measured_gain(self) -> float:
        return sum(wi * li for wi, li in zip(self.weights, self.loss_points)) - self.loss_merged

    @property
    def predicted_gain_vs_latest(self) -> float:
        """Second-order prediction of L(θ_k) − L(θ̄), θ_k the last (newest) point."""
        g_bar = sum(wi * gi for wi, gi in zip(self.weights, self.grad_dot))
        return ((self.grad_dot[-1] + 0.5 * self.D[-1][-1])
                - (g_bar + 0.5 * self.merged_delta_hessian))

    @property
    def measured_gain_vs_latest(self) -> float:
        return self.loss_points[-1] - self.loss_merged

    def cross_terms(self) -> dict:
        """The off-diagonal D_ij (i < j): how many are negative (complementary pairs), their
        weighted sum Σ_{i≠j} w_i w_j D_ij against the diagonal Σ w_i (1 − w_i) D_ii, and the
        paper's SMA form."""
        w, k = self._w()
        off = [self.D[i][j] for i in range(k) for j in range(i + 1, k)]
        cross_w = sum(w[i] * w[j] * self.D[i][j] for i in range(k) for j in range(k) if i != j)
        diag_w = sum(w[i] * (1 - w[i]) * self.D[i][i] for i in range(k))
        cross = sum(self.D[i][j] for i in range(k) for j in range(k) if i != j)
        diag = sum(self.D[i][i] for i in range(k))
        return {"pairs": len(off), "negative": sum(x < 0 for x in off),
                "negative_fraction": (sum(x < 0 for x in off) / len(off)) if off else None,
                "weighted_cross": cross_w, "weighted_diagonal": diag_w,
                "merging_helps": cross_w < diag_w,
                # the paper's form, for equal weights only (where it equals merging_helps)
                "paper_sma": {"cross": cross, "k_minus_1_diagonal": (k - 1) * diag,
                              "holds": cross < (k - 1) * diag}
                if max(w) - min(w) < 1e-12 else None}

    def cosine(self) -> list[list[float | None]]:
        """D_ij / sqrt(D_ii D_jj): the angle between deviations in the Hessian's metric (None
        where the curvature along a deviation is not positive)."""
        k = len(self.D)
        return [[self.D[i][j] / math.sqrt(self.D[i][i] * self.D[j][j])
                 if self.D[i][i] > 0 and self.D[j][j] > 0 else None for j in range(k)]
                for i in range(k)]

    def per_point(self) -> list[dict]:
        """Each point's loss against θ_r: measured, first-order and second-order prediction."""
        return [{"measured": li - self.loss_reference, "first_order": g,
                 "second_order": g + 0.5 * self.D[i][i],
                 "curvature": self.D[i][i] / n ** 2 if n > 0 else None}
                for i, (li, g, n) in enumerate(zip(self.loss_points, self.grad_dot,
                                                   self.delta_norm))]

    def to_dict(self) -> dict:
        return {**asdict(self), "merged_delta_hessian": self.merged_delta_hessian,
                "gain": {"measured": self.measured_gain, "predicted": self.predicted_gain},
                "gain_vs_latest": {"measured": self.measured_gain_vs_latest,
                                   "predicted": self.predicted_gain_vs_latest},
                "cross_terms": self.cross_terms(), "cosine": self.cosine(),
                "per_point": self.per_point()}


def _set(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def check_state(model: torch.nn.Module, state: dict, label: str) -> None:
    """Raise ValueError naming ``label`` and the tensor if ``state`` lacks a parameter of
    ``model`` or holds it in another shape."""
    for n, p in model.named_parameters():
        if n not in state:
            raise ValueError(f"{label}: no tensor {n!r} of the model")
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"{label}: tensor {n!r} has shape {tuple(state[n].shape)}, the "
                             f"model's is {tuple(p.shape)}")


def second_order(model: torch.nn.Module, points: list[dict], weights: Sequence[float],
                 batches: Sequence, loss_fn: LossFn, reference: dict | None = None,
                 progress: bool = False, consume: bool = False) -> SecondOrder:
    """Measure the second-order terms of merging ``points`` (state dicts holding every
    parameter of ``model`` by name) with ``weights`` (summing to 1), on ``batches``.

    The loss is the token mean over all batches: ``loss_fn`` returns each batch's summed loss
    and token count. H and g are taken at ``reference`` (default: the merged weights, as the
    model holds them). ``consume``: empty the ``points`` dicts as their deviations are made
    (halves the peak memory). The model is left holding the merged weights."""
    from tqdm.auto import tqdm

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for i, pt in enumerate(points):
        check_state(model, pt, f"checkpoint {i}")
    if reference is not None:
        check_state(model, reference, "reference")
    k = len(points)
    w = [float(x) for x in weights]
    if len(w) != k or abs(sum(w) - 1.0) > 1e-9:
        raise ValueError(f"need {k} weights summing to 1, got {w}")
    dtype = params[0].dtype
    merged = [torch.from_numpy(weighted_sum([pt[n] for pt in points], w)).to(dtype)
              for n in names]

    def mean_loss(values) -> tuple[float, int]:
        _set(params, values)
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for b in batches:
                s, c = loss_fn(model, b)
                total += float(s)
                count += c
        return total / count, count

    loss_points = [mean_loss([pt[n] for n in names])[0] for pt in points]
    loss_merged, tokens = mean_loss(merged)
    ref = merged if reference is None else [reference[n].to(dtype) for n in names]
    loss_ref = loss_merged if reference is None else mean_loss(ref)[0]
    # deviations from the point the model holds (the merged weights rounded to its dtype)
    deltas: list[list[torch.Tensor]] = [[] for _ in points]
    for t, n in enumerate(names):
        r = ref[t].to(torch.float64)
        for i, pt in enumerate(points):
            deltas[i].append((pt[n].to(torch.float64) - r).to(dtype))
            if consume:
                del pt[n]

    _set(params, ref)
    D = torch.zeros(k, k, dtype=torch.float64)
    grad_dot = torch.zeros(k, dtype=torch.float64)

    def dot(xs, ys) -> torch.Tensor:  # float64 sum of Σ_p <x_p, y_p>, skipping unused params
        return sum((torch.dot(x.reshape(-1), y.reshape(-1).double())
                    for x, y in zip(xs, ys) if x is not None), torch.zeros((), dtype=torch.float64))

    bar = tqdm(total=len(batches) * k, desc="Hessian-vector products", unit="hvp",
               disable=not progress, leave=False)
    for b in batches:
        s, _ = loss_fn(model, b)
        g = torch.autograd.grad(s / tokens, params, create_graph=True, allow_unused=True)
        g64 = [None if gp is None else gp.detach().double() for gp in g]
        for i in range(k):
            grad_dot[i] += dot(g64, deltas[i])
        del g64
        # (gradient, parameter index) of the parameters the gradient still depends on
        used = [(gp, t) for t, gp in enumerate(g) if gp is not None and gp.requires_grad]
        for j in range(k):
            if used:  # else the loss is linear in the parameters: H = 0
                gv = sum((gp * deltas[j][t]).sum() for gp, t in used)
                hv = torch.autograd.grad(gv, params, retain_graph=j < k - 1, allow_unused=True)
                hv = [None if h is None else h.double() for h in hv]
            else:
                hv = [None] * len(params)
            for i in range(k):
                D[i, j] += dot(hv, deltas[i])
            bar.update()
        del g, used
    bar.close()
    _set(params, merged)
    # H is symmetric: average out the float rounding of the two products
    D = 0.5 * (D + D.T)
    norms = [math.sqrt(float(dot([x.double() for x in d], d))) for d in deltas]
    return SecondOrder(weights=w, loss_reference=loss_ref, loss_merged=loss_merged,
                       loss_points=loss_points, grad_dot=grad_dot.tolist(), D=D.tolist(),
                       delta_norm=norms, tokens=tokens)


def hvp_model(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF model of ``hf_dir`` with eager attention and experts: plain ops, twice
    differentiable in any dtype (the fused CPU attention kernel has no double backward,
    grouped_mm no float64)."""
    from transformers import AutoModelForCausalLM

    from moe_merge.checkpoint.names import auto_config

    return AutoModelForCausalLM.from_config(auto_config(hf_dir), dtype=dtype,
                                            attn_implementation="eager",
                                            experts_implementation="eager",
                                            trust_remote_code=False)


def micro_batches(windows, micro_batch: int, limit: int | None = None) -> list:
    """The validation windows in micro-batches, the first ``limit`` of them."""
    out = [windows[i:i + micro_batch] for i in range(0, len(windows), micro_batch)]
    return out if limit is None else out[:limit]


def lm_loss_sum(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy of a [b, seq_len + 1] token window batch (the LM loss
    that ``val/loss`` reports, without the router's auxiliary loss)."""
    import torch.nn.functional as F

    x = torch.as_tensor(batch)
    logits = model(input_ids=x[:, :-1]).logits
    if logits.dtype != torch.float64:
        logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                           reduction="sum")
    return loss, x[:, 1:].numel()


def _state_of(path: Path, hf_dir: Path) -> dict:
    """The HF state dict of a checkpoint tag, a run (its newest tag) or an HF model directory."""
    from moe_merge.checkpoint.discover import find_tags
    from moe_merge.checkpoint.safe_load import open_regular, real_path
    from moe_merge.errors import MergeError
    from moe_merge.merge.merger import hf_state

    if (path / "config.json").is_file():
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MergeError(f"--reference {path}: an HF directory without .safetensors weights")
        state = {}
        for f in files:
            os.close(open_regular(f, path))  # a regular file inside the directory
            state.update(load_file(str(real_path(f, path))))
        return state
    return hf_state(find_tags([path])[-1].path, hf_dir)


def analyze(ckpts: Sequence[str | Path], *, selection: Selection = Selection(),
            reference: str | Path | None = None, recipe: str | Path | None = None,
            overrides: Sequence[str] = (), hf_config: str | Path | None = None,
            batches: int | None = None, micro_batch: int | None = None, float64: bool = False,
            out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
            echo=print, data: str | None = None) -> dict:
    """Choose checkpoints and weights by ``selection`` as ``moe-merge merge`` does, measure the
    second-order terms of their merge on the run's fixed validation batches (the first
    ``batches`` micro-batches of ``micro_batch`` windows, default the recipe's), and write
    ``analysis.json``, ``report.md`` and ``hessian_terms.png`` into ``out`` (atomically) when
    given."""
    from moe_merge.checkpoint.discover import hf_dir_for
    from moe_merge.config.recipe import load_recipe
    from moe_merge.errors import MergeError
    from moe_merge.evals.loss import DEFAULTS, default_recipe, eval_windows, recipe_for
    from moe_merge.merge.merger import hf_state, input_dirs, plan
    from moe_merge.merge.writer import check_apart, check_target

    chosen, w = plan(ckpts, selection)
    if len(chosen) < 2:
        raise MergeError("analyze needs at least 2 checkpoints (use --last N)")
    if reference is not None and not Path(reference).exists():
        raise MergeError(f"--reference {reference}: no such file or directory")
    if out is not None:
        out = Path(out)
        check_target(out, overwrite)
    hf_dir = hf_dir_for(chosen, hf_config)
    if hf_dir is None:
        raise MergeError(f"{chosen[-1].path}: no hf/config.json in its run; pass --hf-config DIR")
    if out is not None:
        check_apart(out, input_dirs([*ckpts, *([reference] if reference is not None else [])],
                                    chosen, hf_dir))
    recipe_path = Path(recipe) if recipe else recipe_for(chosen[-1].path)
    if recipe_path is None and data is None:
        raise MergeError(f"{chosen[-1].path}: cannot find the run's recipe.yaml for its "
                         "validation batches; pass --recipe RECIPE, or --data FILE (a run of "
                         "another trainer)")
    if recipe_path is None:  # another trainer's run: the default windows of --data
        recipe_path, cfg = DEFAULTS, default_recipe(list(overrides))
    else:
        cfg = load_recipe(recipe_path, list(overrides))
    windows = eval_windows(cfg, data, hf_dir if data else None)
    mb = micro_batch or cfg.parallel.micro_batch
    if mb < 1:
        raise MergeError(f"--micro-batch must be >= 1, got {mb}")
    if batches is not None and batches < 1:
        raise MergeError(f"--batches must be >= 1, got {batches}")
    data = micro_batches(windows, mb, batches)
    dtype = torch.float64 if float64 else torch.float32
    # the checkpoints first: their tensors are checked against the HF config (sizes, names)
    # before a model is built from it
    points = [hf_state(t.path, hf_dir) for t in chosen]
    model = hvp_model(hf_dir, dtype)
    echo(f"analyze: {len(chosen)} checkpoints (steps {', '.join(str(t.step) for t in chosen)}), "
         f"weights {', '.join(f'{x:.3f}' for x in w)}; {len(data)} batches of {mb} x "
         f"{cfg.data.seq_len} tokens; {len(chosen) * len(data)} Hessian-vector products")
    ref = None
    if reference is not None:
        ref = _state_of(Path(reference), hf_dir)
        try:
            check_state(model, ref, f"--reference {reference}")
        except ValueError as e:
            raise MergeError(str(e)) from None
    terms = second_order(model, points, w, data, lm_loss_sum, reference=ref, progress=progress,
                         consume=True)
    result = {"checkpoints": [str(t.path) for t in chosen], "steps": [t.step for t in chosen],
              "strategy": selection.kind, "alpha": selection.alpha,
              "reference": str(reference) if reference is not None else "merged",
              "recipe": str(recipe_path), "batches": len(data), "micro_batch": mb,
              "dtype": str(dtype).split(".")[-1],
              **terms.to_dict()}
    if out is not None:
        _write(out, result, overwrite)
    return result


def _write(out: Path, result: dict, overwrite: bool) -> None:
    from moe_merge.merge.writer import atomic_dir

    with atomic_dir(out, overwrite) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, tmp / "hessian_terms.png")
        (tmp / "report.md").write_text(render(result, markdown=True))


def render(r: dict, markdown: bool = False) -> str:
    """The analysis as text (or a markdown report)."""
    k = len(r["steps"])
    ct = r["cross_terms"]
    lines = []
    h = "## " if markdown else ""
    alpha = f" alpha {r['alpha']}" if r["alpha"] else ""
    lines.append(f"{h}Second-order terms of merging {k} checkpoints (steps "
                 f"{', '.join(map(str, r['steps']))}; {r['strategy']}{alpha})")
    lines.append("")
    lines.append(f"expansion point: {r['reference']}; {r['batches']} validation batches, "
                 f"{r['tokens']:,} tokens, {r['dtype']}")
    lines.append(f"merged loss {r['loss_merged']:.5f}; weighted mean of the checkpoints' losses "
                 f"{r['loss_merged'] + r['gain']['measured']:.5f}; "
                 f"latest {r['loss_points'][-1]:.5f}")
    lines.append(f"gain over the mean checkpoint: measured {r['gain']['measured']:+.5f}, "
                 f"second-order prediction {r['gain']['predicted']:+.5f}")
    lines.append(f"gain over the latest checkpoint: "
                 f"measured {r['gain_vs_latest']['measured']:+.5f}, "
                 f"prediction {r['gain_vs_latest']['predicted']:+.5f}")
    if ct["pairs"]:
        lines.append(f"cross-terms δ_iᵀHδ_j (i<j): {ct['negative']} of {ct['pairs']} negative "
                     f"({100 * ct['negative_fraction']:.0f}%); Σ_(i≠j) w_i w_j D_ij = "
                     f"{ct['weighted_cross']:.4g} against Σ w_i(1-w_i) D_ii = "
                     f"{ct['weighted_diagonal']:.4g} (merging helps: {ct['merging_helps']})")
    lines.append("")
    if markdown:
        lines.append("| step | weight | L(θ_i) − L(θ_r) | gᵀδ_i | gᵀδ_i + ½δ_iᵀHδ_i | |δ_i| | "
                     "curvature δᵀHδ/|δ|² |")
        lines.append("|---|---|---|---|---|---|---|")
        for s, wi, p, n in zip(r["steps"], r["weights"], r["per_point"], r["delta_norm"]):
            cur = "n/a" if p["curvature"] is None else f"{p['curvature']:.4g}"
            lines.append(f"| {s} | {wi:.3f} | {p['measured']:+.5f} | {p['first_order']:+.5f} | "
                         f"{p['second_order']:+.5f} | {n:.4g} | {cur} |")
        lines.append("")
        lines.append("D_ij = δ_iᵀHδ_j:")
        lines.append("")
        lines.append("| | " + " | ".join(map(str, r["steps"])) + " |")
        lines.append("|---" * (k + 1) + "|")
        for s, row in zip(r["steps"], r["D"]):
            lines.append(f"| {s} | " + " | ".join(f"{x:.4g}" for x in row) + " |")
        lines.append("")
        lines.append("![Hessian terms](hessian_terms.png)")
    else:
        lines.append(f"{'step':>8} {'weight':>7} {'measured':>10} {'1st order':>10} "
                     f"{'2nd order':>10} {'|δ|':>9}")
        for s, wi, p, n in zip(r["steps"], r["weights"], r["per_point"], r["delta_norm"]):
            lines.append(f"{s:>8} {wi:>7.3f} {p['measured']:>+10.5f} {p['first_order']:>+10.5f} "
                         f"{p['second_order']:>+10.5f} {n:>9.4g}")
        lines.append("(measured: L(θ_i) − L(θ_r); predictions to first and second order)")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = r["steps"]
    k = len(steps)
    cos = np.array([[np.nan if x is None else x for x in row] for row in r["cosine"]])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.3))
    im = a.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    a.set_xticks(range(k), [str(s) for s in steps], rotation=90 if k > 8 else 0)
    a.set_yticks(range(k), [str(s) for s in steps])
    a.set_title("δ_iᵀHδ_j / √(δ_iᵀHδ_i · δ_jᵀHδ_j)\n(blue: complementary deviations)")
    a.set_xlabel("checkpoint step")
    fig.colorbar(im, ax=a, fraction=0.046)
    pp = r["per_point"]
    x = np.arange(k)
    b.bar(x - 0.2, [p["measured"] for p in pp], 0.4, label="measured L(θ_i) − L(θ_r)")
    b.bar(x + 0.2, [p["second_order"] for p in pp], 0.4, label="gᵀδ_i + ½ δ_iᵀHδ_i")
    b.plot(x, [p["first_order"] for p in pp], "k.", label="gᵀδ_i")
    b.axhline(0, color="grey", lw=0.5)
    b.set_xticks(x, [str(s) for s in steps], rotation=90 if k > 8 else 0)
    b.set_xlabel("checkpoint step")
    b.set_title(f"gain: measured {r['gain']['measured']:+.4f}, predicted "
                f"{r['gain']['predicted']:+.4f}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
