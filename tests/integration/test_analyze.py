"""moe-merge analyze: Hessian-vector-product terms against exact second derivatives."""

from __future__ import annotations

import json

import pytest
import torch
from support.runs import PY, run_cli


def test_analyze_cli_on_a_trained_moe_run(trained, tmp_path):
    """End to end on a 2-rank Qwen3-MoE run: the terms equal central differences of the
    model's own first-order gradients (autograd, no double backward) along each deviation, the
    report is written atomically and a second run without --overwrite refuses. (Differences of
    the loss itself are no oracle here: HF's norms run in float32 and routing is piecewise.)"""
    run = trained("moe_z2")
    out = tmp_path / "an"
    proc = run_cli([PY, "-m", "moe_merge.cli", "analyze", str(run), "--last", "3",
                    "--batches", "1", "--float64", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "analysis.json").read_text())
    assert r["steps"] == [4, 6, 8] and r["dtype"] == "float64"
    for key in ("D", "grad_dot", "loss_points", "gain", "gain_vs_latest", "cross_terms",
                "cosine", "per_point", "delta_norm"):
        assert key in r, key
    assert (out / "hessian_terms.png").stat().st_size > 10_000
    assert "Second-order terms" in (out / "report.md").read_text()

    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_merge.config.recipe import load_recipe
    from moe_merge.evals.analyze import lm_loss_sum
    from moe_merge.evals.loss import eval_windows
    from moe_merge.merge.merger import hf_state

    cfg = load_recipe(run / "recipe.yaml")
    batch = eval_windows(cfg)[:cfg.parallel.micro_batch]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(run / "hf")),
                                             dtype=torch.float64, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    states = [hf_state(run / "checkpoints" / f"global_step{s}", run / "hf") for s in (4, 6, 8)]
    merged = {n: sum(st[n].double() for st in states) / 3 for n in names}
    deltas = [{n: st[n].double() - merged[n] for n in names} for st in states]

    def grad_at(t, i):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(merged[n] + t * deltas[i][n])
        s, c = lm_loss_sum(model, batch)
        return torch.autograd.grad(s / c, params)

    def routes(t, i):
        """The experts each token is sent to, at merged + t * deviation i."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(merged[n] + t * deltas[i][n])
            logits = model(input_ids=torch.as_tensor(batch), output_router_logits=True)
            k = model.config.num_experts_per_tok
            return [lg.topk(k, dim=-1).indices.sort(-1).values for lg in logits.router_logits]

    def step_size(i):
        """The largest difference step along deviation i with the routing of t=0 on both
        sides: routing is piecewise, and a central difference across a switch is no oracle."""
        at0 = routes(0.0, i)
        for eps in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
            if all(all(torch.equal(a, b) for a, b in zip(at0, routes(t, i))) for t in (eps, -eps)):
                return eps
        pytest.fail(f"routing switches within 1e-5 of the merge along deviation {i}")

    for i in range(3):
        eps = step_size(i)
        hv = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps, i), grad_at(-eps, i))]
        for j in range(3):
            fd = float(sum((h * deltas[j][n]).sum() for h, n in zip(hv, names)))
            assert r["D"][j][i] == pytest.approx(fd, rel=2e-3, abs=1e-6), (i, j)
        g0 = grad_at(0.0, i)
        assert r["grad_dot"][i] == pytest.approx(
            float(sum((g * deltas[i][n]).sum() for g, n in zip(g0, names))), rel=1e-6)

    again = run_cli([PY, "-m", "moe_merge.cli", "analyze", str(run), "--last", "3",
                     "--batches", "1", "--out", str(out)])
    assert again.returncode == 2 and "exists" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "hessian_terms.png",
                                                     "report.md"]
    assert not list(tmp_path.glob(".an*")), "no temporary output left behind"
    # a reference that is not this model: one line naming the directory and the tensor
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad_ref"
    bad.mkdir()
    shutil.copy(run / "hf" / "config.json", bad / "config.json")
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    ref = run_cli([PY, "-m", "moe_merge.cli", "analyze", str(run), "--last", "3", "--batches",
                   "1", "--reference", str(bad), "--out", str(tmp_path / "an2")])
    assert ref.returncode == 2, ref.stderr[-2000:]
    msg = ref.stderr.strip().splitlines()[-1]
    assert str(bad) in msg and "model.embed_tokens.weight" in msg and "shape" in msg, msg
    assert not (tmp_path / "an2").exists()
    # --overwrite replaces the output; around the newest checkpoint its deviation is zero
    over = run_cli([PY, "-m", "moe_merge.cli", "analyze", str(run), "--last", "3", "--batches",
                    "2", "--micro-batch", "1", "--reference", str(run / "checkpoints" /
                                                                  "global_step8"),
                    "--out", str(out), "--overwrite", "--quiet"])
    assert over.returncode == 0, over.stderr[-2000:]
    r2 = json.loads((out / "analysis.json").read_text())
    assert r2["reference"].endswith("global_step8") and r2["delta_norm"][-1] == 0.0
    assert r2["micro_batch"] == 1 and r2["loss_reference"] == pytest.approx(
        r2["loss_points"][-1], rel=1e-6)
    last = r2["per_point"][-1]
    assert last["measured"] == pytest.approx(0, abs=1e-6) and last["second_order"] == 0.0
    # the measured gain is the losses' (the same 2 windows in micro-batches of 1, float32
    # against float64)
    assert r2["gain"]["measured"] == pytest.approx(r["gain"]["measured"], rel=1e-3)
