"""The child processes of bench/merge_bench.py: each contender runs alone in one of these, so
its wall time and peak RSS are its own.

    python bench/merge_contenders.py plan   OUT.json TAG_DIR...   byte ranges moe-merge must read
    python bench/merge_contenders.py floor  PLAN.json             one plain read of those ranges
    python bench/merge_contenders.py naive  OUT.pt TAG_DIR...     torch.load all, gather, average
    python bench/merge_contenders.py universal OUT.pt WORK TAG_DIR...
                                            ds_to_universal per tag, then average its fp32.pt files
    python bench/merge_contenders.py add-architectures HF_DIR     (mergekit needs it in config.json)
    python bench/merge_contenders.py check  REF_HF_DIR TAG_DIR KIND PATH
                                            max |difference| of an output against moe-merge's

``floor`` imports nothing but the standard library. ``naive`` is what a user writes without this
project: ``torch.load`` of every file of a tag (``weights_only=False``: the optimizer files
pickle DeepSpeed objects), the flat ZeRO partitions cut by ``param_slice_mappings`` and joined,
AutoEP experts put in place by ``ds_autoep_layers``, a running fp32 sum divided by N at the end.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

OPTIM_GLOB = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


# ---- plan: which zip records moe-merge reads ---------------------------------------------
class _Ref:
    """A tensor met in a pickle: the key of its storage record."""

    def __init__(self, key: str):
        self.key = key


class _Stub:
    """Any other pickled object (DeepSpeed enums, fragment addresses, loss scalers)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Scanner(pickle.Unpickler):
    """Unpickles a torch.save ``data.pkl`` without reading tensor data: tensors become _Ref."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, *args: _Ref(storage)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Stub

    def persistent_load(self, pid):  # ("storage", storage_type, key, location, numel)
        return pid[2]


def _record_span(path: Path, f, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(offset of the record's data in the file, its length); torch stores records uncompressed."""
    f.seek(info.header_offset)
    head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if info.compress_type != zipfile.ZIP_STORED:
        raise SystemExit(f"{path}: record {info.filename} is compressed")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def plan(out: str, *tag_dirs: str) -> None:
    """Byte ranges of every zip record a master-weight merge of these tags must read: the
    ``data.pkl`` of the model-states and optimizer files, and the storages of
    ``optimizer_state_dict.single_partition_of_fp32_groups`` (ZeRO-1/2)."""
    ranges = []
    for tag in map(Path, tag_dirs):
        for path in [tag / MODEL_FILE, *sorted(tag.glob(OPTIM_GLOB))]:
            with zipfile.ZipFile(path) as z, open(path, "rb") as f:
                infos = {i.filename: i for i in z.infolist()}
                pkl = next(n for n in infos if n.endswith("/data.pkl"))
                prefix = pkl[: -len("data.pkl")]
                ranges.append([str(path), *_record_span(path, f, infos[pkl])])
                if path.name == MODEL_FILE:
                    continue
                obj = _Scanner(z.open(pkl)).load()
                for ref in obj["optimizer_state_dict"]["single_partition_of_fp32_groups"]:
                    info = infos[f"{prefix}data/{ref.key}"]
                    ranges.append([str(path), *_record_span(path, f, info)])
    Path(out).write_text(json.dumps({"ranges": ranges,
                                     "bytes": sum(r[2] for r in ranges)}, indent=1) + "\n")


# ---- floor: one plain read ----------------------------------------------------------------
def floor(plan_file: str) -> None:
    ranges = json.loads(Path(plan_file).read_text())["ranges"]
    buf = memoryview(bytearray(64 << 20))
    t0 = time.perf_counter()
    total = 0
    fds: dict[str, int] = {}
    for path, offset, length in ranges:
        fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
            if n <= 0:
                raise SystemExit(f"{path}: short read at {offset}")
            offset += n
            total += n
    for fd in fds.values():
        os.close(fd)
    dt = time.perf_counter() - t0
    print(json.dumps({"read_bytes": total, "read_s": dt}))


# ---- (b) naive ----------------------------------------------------------------------------
def _gather_naive(files: dict) -> dict:
    """Full logical fp32 tensors of one ZeRO-1/2 AutoEP tag from its fully loaded files."""
    import torch

    model = files[MODEL_FILE]
    dp = int(model["dp_world_size"])
    shapes = model["param_shapes"]
    experts = {}
    for e in model.get("ds_autoep_layers") or []:
        ranks = {int(r["rank"]): [int(x) for x in r["experts"]]
                 for r in e["expert_placement"]["ranks"]}
        for w in ("w1", "w2", "w3"):
            experts[f"{e['expert_key_prefix']}.{w}"] = (int(e["num_experts"]), int(e["ep_size"]),
                                                        ranks)
    pieces = collections.defaultdict(list)  # name -> [(ep_rank, order, tensor)]
    for rank in range(dp):
        osd = files[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = osd["single_partition_of_fp32_groups"][g]
            for name, frag in mapping.items():
                ep = experts[name][1] if name in experts else 1
                pieces[name].append((rank % ep, rank // ep, g,
                                     flat.narrow(0, frag.start, frag.numel)))
    out = {}
    for name, ps in pieces.items():
        g = ps[0][2]
        local = tuple(shapes[g][name])
        if name not in experts:
            out[name] = torch.cat([t for _, _, _, t in sorted(ps, key=lambda p: p[1])]).view(local)
            continue
        num, ep, placement = experts[name]
        full = torch.empty((num, *local[1:]), dtype=torch.float32)
        for r in range(ep):
            mine = sorted((p for p in ps if p[0] == r), key=lambda p: p[1])
            full[torch.tensor(placement[r])] = torch.cat([t for _, _, _, t in mine]).view(local)
        out[name] = full
    return out


def naive(out: str, *tag_dirs: str) -> None:
    import torch

    # The fp32 partitions are saved with requires_grad=True: without no_grad, autograd graphs
    # through the running sum keep every tag's partitions alive (+0.9 GB per tag here).
    torch.set_grad_enabled(False)
    acc: dict | None = None
    for tag in map(Path, tag_dirs):
        files = {p.name: torch.load(p, map_location="cpu", weights_only=False)
                 for p in sorted(tag.glob("*.pt"))}
        state = _gather_naive(files)
        del files
        if acc is None:
            acc = {k: v.clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                acc[k] += v
        del state
    for v in acc.values():
        v /= len(tag_dirs)
    torch.save(acc, out)


# ---- (c) ds_to_universal + average ------------------------------------------------------
def universal(out: str, work: str, *tag_dirs: str) -> None:
    import torch

    torch.set_grad_enabled(False)
    work_dir = Path(work)
    dirs = []
    for tag in map(Path, tag_dirs):
        dst = work_dir / tag.name
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", str(tag), "--output_folder", str(dst)],
                       check=True, stdout=subprocess.DEVNULL)
        dirs.append(dst / "zero")
    acc = {}
    for param in sorted(p.name for p in dirs[0].iterdir() if (p / "fp32.pt").is_file()):
        total = None
        for d in dirs:
            t = torch.load(d / param / "fp32.pt", map_location="cpu", weights_only=False)["param"]
            total = t.clone() if total is None else total.add_(t)
        acc[param] = total.div_(len(dirs))
    torch.save(acc, out)


# ---- mergekit's input ---------------------------------------------------------------------
def add_architectures(hf_dir: str) -> None:
    """Add the ``architectures`` entry (from transformers' causal-LM table) to an HF config that
    lacks it: mergekit picks its architecture definition by that entry."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(hf_dir) / "config.json"
    config = json.loads(path.read_text())
    if not config.get("architectures"):
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
        path.write_text(json.dumps(config, indent=2) + "\n")


# ---- correctness: max |difference| against moe-merge's HF output -------------------------
def check(ref_dir: str, tag_dir: str, kind: str, path: str) -> None:
    """``kind``: ``hf`` (an HF safetensors directory) or ``ckpt`` (a torch.save'd dict with the
    checkpoint's own names, mapped to HF names by moe_merge.checkpoint.names)."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict:
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                out.update({k: s.get_tensor(k) for k in s.keys()})
        return out

    ref = tensors(Path(ref_dir))
    if kind == "hf":
        got = tensors(Path(path))
    else:
        from moe_merge.checkpoint.names import hf_map
        from moe_merge.checkpoint.reader import DSCheckpoint

        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        r = DSCheckpoint(tag_dir, verify=False)
        got = {o.name: torch.cat([sd[s] for s in o.sources], dim=o.cat_dim)
               for o in hf_map(r.signature(), r.autoep_layers, r.preset)}
    missing = sorted(set(ref) ^ set(got))
    diff = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref if k in got)
    scale = max(v.abs().max().item() for v in ref.values())
    print(json.dumps({"max_abs_diff": diff, "max_abs_value": scale, "tensors": len(ref),
                      "name_mismatch": missing[:5]}))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"plan": plan, "floor": floor, "naive": naive, "universal": universal, "check": check,
     "add-architectures": add_architectures}[cmd](*rest)
