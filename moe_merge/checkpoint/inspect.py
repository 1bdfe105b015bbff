"""``moe-merge inspect``: what a checkpoint directory holds and whether it can be merged."""

from __future__ import annotations

from pathlib import Path

from moe_merge.checkpoint.discover import find_tags, hf_dir_for
from moe_merge.checkpoint.reader import DSCheckpoint
from moe_merge.checkpoint.safe_load import CheckpointError


def inspect(path: str | Path, verify: bool = False) -> dict:
    tags = find_tags([path])
    rows, problems, signature, ref = [], [], None, None
    for t in tags:
        row = {"tag": t.name, "path": str(t.path), "step": t.step, "tokens": t.tokens}
        try:
            c = DSCheckpoint(t.path, verify=verify)
        except CheckpointError as e:
            row["error"] = str(e)
            problems.append(str(e))
            rows.append(row)
            continue
        row.update({
            "step": t.step if t.step >= 0 else c.step,
            "zero_stage": c.zero_stage, "dp_size": c.dp_size, "ep_size": c.ep_size,
            "num_experts": c.num_experts, "autoep_preset": c.preset,
            "moe_kind": "native" if c.native_moe else ("autoep" if c.autoep_layers else None),
            "precision": "bf16" if c.bf16 else "fp32",
            "fp32_master_files": c.master_files or None,
            "master_source": "optimizer partitions" if c.has_master else "module weights",
            "params": c.param_counts(), "bytes_on_disk": c.bytes_on_disk,
            "ds_version": c.model_state.get("ds_version"),
        })
        sig = c.signature()
        if signature is None:
            signature, ref = sig, t.name
        elif sig != signature:
            diff = next((n for n in signature if sig.get(n) != signature[n]),
                        next(iter(set(sig) - set(signature)), "?"))
            problems.append(f"{t.name}: tensor {diff} differs from {ref}")
        rows.append(row)
    hf = hf_dir_for(tags, None)
    return {"path": str(Path(path).resolve()), "tags": rows, "hf_config": str(hf) if hf else None,
            "mergeable": not problems, "problems": problems}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def render(report: dict) -> str:
    lines = [f"{report['path']}: {len(report['tags'])} checkpoint tag(s)"]
    hdr = f"  {'tag':<20} {'step':>8} {'tokens':>13} {'zero':>4} {'dp':>3} {'ep':>3} {'prec':>5} " \
          f"{'params (total / expert)':>25} {'on disk':>10}"
    lines.append(hdr)
    for r in report["tags"]:
        if "error" in r:
            lines.append(f"  {r['tag']:<20} unreadable: {r['error']}")
            continue
        p = r["params"]
        tok = f"{r['tokens']:,}" if r.get("tokens") is not None else "-"
        lines.append(f"  {r['tag']:<20} {r['step']:>8} {tok:>13} {r['zero_stage']:>4} "
                     f"{r['dp_size']:>3} {r['ep_size']:>3} {r['precision']:>5} "
                     f"{p['total']:>14,} / {p['expert']:>9,} {_size(r['bytes_on_disk']):>10}")
    ok = [r for r in report["tags"] if "error" not in r]
    if ok:
        r = ok[-1]
        lines.append(f"  fp32 master weights: {r['master_source']}"
                     + (f" ({', '.join(r['fp32_master_files'])})" if r["fp32_master_files"] else ""))
        if r["num_experts"]:
            kind = ("native deepspeed.moe.layer.MoE" if r["moe_kind"] == "native"
                    else f"AutoEP preset {r['autoep_preset']}")
            lines.append(f"  MoE: {r['num_experts']} experts per layer, {kind}, expert parallel "
                         f"size {r['ep_size']}")
    lines.append(f"  HF config: {report['hf_config'] or 'none (merge --format hf needs --hf-config)'}")
    lines.append("  mergeable: yes" if report["mergeable"] else
                 "  mergeable: NO\n" + "\n".join(f"    - {p}" for p in report["problems"]))
    return "\n".join(lines)
