"""Write merged weights as a DeepSpeed checkpoint in the layout of an existing tag.

The newest input tag is copied byte for byte, then the merged values are written into the
copies' tensor records in place: the fp32 master partitions (every piece of every parameter, in
that tag's own ZeRO / expert-parallel layout), the module weights (non-expert ``module`` and
AutoEP per-expert files, in their own dtype) and, per policy, Adam's moments. No pickle is
rewritten, so every record DeepSpeed needs (ds_config, step counters, client state, param
shapes) stays exactly as DeepSpeed wrote it, and ``engine.load_checkpoint`` resumes from it.
The zip CRC-32 of each changed record is updated.

The template's files are data from elsewhere: before torch maps any of them, every pickle of
the tag is checked as before DeepSpeed reads one (:func:`moe_merge.checkpoint.guard.check_tag`),
and only its ``*.pt`` files are copied, each only if it is a regular file inside the tag (read
from the opened descriptor: a symlink leaving the tag, a FIFO or a device is refused).

Optimizer-state policies: ``latest`` keeps the newest checkpoint's moments, ``merged`` writes
the same weighted average of the moments, ``reset`` zeroes them (Adam's step count, a pickled
integer, is kept; load with ``load_optimizer_states=False`` to restart it as well).
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from moe_merge.checkpoint.guard import check_tag
from moe_merge.checkpoint.reader import DSCheckpoint, Piece, _for_state
from moe_merge.checkpoint.safe_load import ALLOWED_GLOBALS, open_regular
from moe_merge.errors import CheckpointError
from moe_merge.merge.strategies import OPTIMIZER_POLICIES


def _load_shared(path: Path) -> dict:
    """Map ``path`` so that writes into its tensors go to the file."""
    old = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    finally:
        torch.serialization.set_default_mmap_options(old)


def _copy(src: Path, dst: Path, root: Path, chunk: int = 1 << 24) -> None:
    """Copy the regular file ``src`` (inside ``root``) to the new file ``dst``."""
    fd = open_regular(src, root)
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(chunk):
            fout.write(block)


def _get(obj, key: tuple):
    for k in key:
        obj = obj[k]
    return obj


def fix_crcs(path: Path) -> None:
    """Recompute the CRC-32 of every record of a stored (uncompressed) zip, in place."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        start_dir = z.start_dir
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            pos = start_dir
            central = {}
            while mm[pos:pos + 4] == b"PK\x01\x02":
                n, e, c = struct.unpack("<HHH", mm[pos + 28:pos + 34])
                name = mm[pos + 46:pos + 46 + n].decode()
                central[name] = pos
                pos += 46 + n + e + c
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: compressed zip records are not supported")
                h = info.header_offset
                n, e = struct.unpack("<HH", mm[h + 26:h + 30])
                data = h + 30 + n + e
                crc = zlib.crc32(memoryview(mm)[data:data + info.file_size])
                if crc != info.CRC:
                    mm[h + 14:h + 18] = struct.pack("<I", crc)
                    c = central[info.filename]
                    mm[c + 16:c + 20] = struct.pack("<I", crc)
            mm.flush()
        finally:
            mm.close()


class DeepSpeedWriter:
    """Copy ``template``'s tag into ``out_dir/<tag>`` and overwrite its tensors with merged ones."""

    def __init__(self, template: DSCheckpoint, out_dir: Path, optimizer_state: str):
        if optimizer_state not in OPTIMIZER_POLICIES:
            raise CheckpointError(f"--optimizer-state: unknown policy {optimizer_state!r} "
                                  f"(choose from {', '.join(OPTIMIZER_POLICIES)})")
        if not template.has_master:
            raise CheckpointError(f"{template.dir}: --format deepspeed needs a checkpoint with "
                                  "optimizer partitions as the template (the newest input)")
        self.t = template
        self.policy = optimizer_state
        self.tag_dir = Path(out_dir) / template.dir.name
        self.tag_dir.mkdir()
        for src in check_tag(template.dir.parent, template.dir.name):
            if src.suffix == ".pt":
                _copy(src, self.tag_dir / src.name, template.dir)
        (Path(out_dir) / "latest").write_text(template.dir.name)
        self._files: dict[str, dict] = {}

    def _file(self, name: str) -> dict:
        if name not in self._files:
            self._files[name] = _load_shared(self.tag_dir / name)
        return self._files[name]

    @torch.no_grad()
    def _scatter(self, name: str, full: torch.Tensor, state: str) -> None:
        spec = self.t.params[name]
        for ep_rank, pieces in spec.pieces.items():
            local = full if spec.expert is None else full[spec.expert.placement[ep_rank]]
            flat = local.reshape(-1)
            offset = 0
            for _, piece in sorted(pieces, key=lambda t: t[0]):
                p: Piece = _for_state(piece, state)
                target = _get(self._file(p.file), p.key)
                target.narrow(0, p.start, p.numel).copy_(flat[offset:offset + p.numel])
                offset += p.numel

    def write(self, name: str, merged: torch.Tensor,
              moments: dict[str, torch.Tensor] | None = None) -> None:
        """Write parameter ``name``: master pieces, module copies, and moments per policy."""
        self._scatter(name, merged, "fp32")
        if self.policy == "reset":
            zeros = torch.zeros_like(merged)
            self._scatter(name, zeros, "exp_avg")
            self._scatter(name, zeros, "exp_avg_sq")
        elif self.policy == "merged":
            assert moments is not None
            for state, value in moments.items():
                self._scatter(name, value, state)
        self._write_module(name, merged)

    @torch.no_grad()
    def _write_module(self, name: str, merged: torch.Tensor) -> None:
        if self.t.zero_stage == 3:
            return  # ZeRO-3 module records are empty placeholders
        spec = self.t.params[name]
        if spec.module_file is not None:  # native MoE expert: its own per-expert file
            sd = self._file(spec.module_file)
            sd[name].copy_(merged.reshape(sd[name].shape).to(sd[name].dtype))
            return
        if spec.expert is None:
            module = self._file(self.t.model_file)["module"]
            keys = [name]
            if ".router.gate." in name:  # AutoEP keeps an alias of the router
                keys.append(name.replace(".router.gate.", ".gate.gate."))
            for k in keys:
                if k in module and module[k].numel() == merged.numel():
                    module[k].copy_(merged.reshape(module[k].shape).to(module[k].dtype))
            return
        e = spec.expert
        for g in range(e.num_experts):
            fname = self.t.expert_files.get((e.layer_id, g))
            if fname is None:
                continue
            sd = self._file(fname)
            key = f"{e.prefix}.{e.weight}.{g}"
            sd[key].copy_(merged[g].to(sd[key].dtype))

    def finish(self) -> None:
        self._files.clear()  # drop the mappings before the CRCs are recomputed
        for f in sorted(self.tag_dir.glob("*.pt")):
            fix_crcs(f)
