"""``moe-merge inspect``: what a checkpoint directory holds and whether it can be merged.

Every check a merge makes of its inputs' layout is made here too (the reader's, the tag's
sidecar and name, duplicate steps, matching tensors); a checkpoint that fails one is reported as
"mergeable: NO" with the reason, never a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moe_merge.checkpoint.discover import (
    WRITERS,
    Tag,
    hf_dir_for,
    read_tag,
    scan,
    stored_step,
    unfinished,
)
from moe_merge.checkpoint.reader import DSCheckpoint
from moe_merge.errors import CheckpointError


def inspect(path: str | Path, verify: bool = False) -> dict:
    report = {"path": str(Path(path).resolve()), "tags": [], "hf_config": None,
              "mergeable": False, "problems": []}
    try:
        found = scan(path)
    except CheckpointError as e:
        report["problems"].append(str(e))
        return report
    rows, problems, signature, ref = [], [], None, None
    tags: list[Tag] = []
    seen: dict[int, str] = {}
    paths: set[Path] = set()
    skipped = []
    for f in found:
        d = f.path
        try:
            why, stored = unfinished(d, f.folder) if not f.explicit else (None, None)
            if why:
                skipped.append({"tag": d.name, "path": str(d), "why": why})
                continue
            t = read_tag(d, f.folder)
            if t.step < 0:
                t = dataclasses.replace(t, step=stored if stored is not None
                                        else stored_step(t.path))
        except CheckpointError as e:
            rows.append({"tag": d.name, "path": str(d), "step": -1, "tokens": None,
                         "error": str(e)})
            problems.append(str(e))
            continue
        if t.path in paths:
            continue  # a symlink to a tag listed already
        paths.add(t.path)
        row = {"tag": t.name, "path": str(t.path), "step": t.step, "tokens": t.tokens,
               "folder": str(t.folder) if t.folder else None, "writer": t.writer}
        try:
            c = DSCheckpoint(t.path, verify=verify)
        except CheckpointError as e:
            row["error"] = str(e)
            problems.append(str(e))
            rows.append(row)
            continue
        tags.append(t)
        row.update({
            "zero_stage": c.zero_stage, "dp_size": c.dp_size, "ep_size": c.ep_size,
            "num_experts": c.num_experts, "autoep_preset": c.preset,
            "moe_kind": "native" if c.native_moe else ("autoep" if c.autoep_layers else None),
            "precision": "bf16" if c.bf16 else "fp32",
            "fp32_master_files": c.master_files or None,
            "master_source": "optimizer partitions" if c.has_master else "module weights",
            "params": c.param_counts(), "bytes_on_disk": c.bytes_on_disk,
            "ds_version": c.model_state.get("ds_version"),
        })
        c.close()
        if row["step"] in seen:
            problems.append(f"two checkpoints at step {row['step']}: {seen[row['step']]} and "
                            f"{t.path}")
        seen.setdefault(row["step"], str(t.path))
        sig = c.signature()
        if signature is None:
            signature, ref = sig, t.name
        elif sig != signature:
            diff = next((n for n in signature if sig.get(n) != signature[n]),
                        next(iter(set(sig) - set(signature)), "?"))
            problems.append(f"{t.name}: tensor {diff} differs from {ref}")
        rows.append(row)
    rows.sort(key=lambda r: (r["step"], r["tag"]))
    tags.sort(key=lambda t: (t.step, t.name))
    hf = hf_dir_for(tags, None)
    writers = sorted({t.writer for t in tags}, key=WRITERS.index)
    report.update({"tags": rows, "skipped": skipped, "written_by": writers,
                   "hf_config": str(hf) if hf else None,
                   "mergeable": not problems, "problems": problems})
    return report


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _label(row: dict) -> str:
    """A tag as a table shows it: inside another trainer's checkpoint folder, with its name."""
    folder = row.get("folder")
    return f"{Path(folder).name}/{row['tag']}" if folder else row["tag"]


def render(report: dict) -> str:
    lines = [f"{report['path']}: {len(report['tags'])} checkpoint tag(s)"
             + (f", written by {' and '.join(report['written_by'])}"
                if report.get("written_by") else "")]
    w = max([20, *(len(_label(r)) for r in report["tags"])])
    hdr = (f"  {'tag':<{w}} {'step':>8} {'tokens':>13} {'zero':>4} {'dp':>3} {'ep':>3} "
           f"{'prec':>5} {'params (total / expert)':>25} {'on disk':>10}")
    lines.append(hdr)
    for r in report["tags"]:
        if "error" in r:
            lines.append(f"  {_label(r):<{w}} unreadable: {r['error']}")
            continue
        p = r["params"]
        tok = f"{r['tokens']:,}" if r.get("tokens") is not None else "-"
        lines.append(f"  {_label(r):<{w}} {r['step']:>8} {tok:>13} {r['zero_stage']:>4} "
                     f"{r['dp_size']:>3} {r['ep_size']:>3} {r['precision']:>5} "
                     f"{p['total']:>14,} / {p['expert']:>9,} {_size(r['bytes_on_disk']):>10}")
    ok = [r for r in report["tags"] if "error" not in r]
    if ok:
        r = ok[-1]
        files = r["fp32_master_files"]
        lines.append(f"  fp32 master weights: {r['master_source']}"
                     + (f" ({', '.join(files)})" if files else ""))
        if r["num_experts"]:
            kind = ("native deepspeed.moe.layer.MoE" if r["moe_kind"] == "native"
                    else f"AutoEP preset {r['autoep_preset']}")
            lines.append(f"  MoE: {r['num_experts']} experts per layer, {kind}, expert parallel "
                         f"size {r['ep_size']}")
    for sk in report.get("skipped", []):
        lines.append(f"  skipped {sk['path']}: {sk['why']}")
    hf = report["hf_config"] or "none (merge --format hf needs --hf-config)"
    lines.append(f"  HF config: {hf}")
    lines.append("  mergeable: yes" if report["mergeable"] else
                 "  mergeable: NO\n" + "\n".join(f"    - {p}" for p in report["problems"]))
    return "\n".join(lines)
