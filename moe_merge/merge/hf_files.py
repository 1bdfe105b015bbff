"""The files of the HF config directory that an HF-format merge copies next to the weights.

Only the names in :data:`HF_FILES` are copied: the model config, the generation config and the
tokenizer files transformers reads (``AutoConfig``, ``AutoTokenizer``, ``GenerationConfig``).
Anything else in the directory -- weights, indexes, Python files, READMEs, a manifest -- is
skipped. Each copied entry must be a regular file in the directory itself: an entry that is a
symlink, a FIFO, a device or a directory is refused (a link named ``tokenizer.json`` must not
put a file from elsewhere into the output), and so is one larger than :data:`MAX_FILE_BYTES`,
or files larger than :data:`MAX_TOTAL_BYTES` together (the sizes are checked from the
directory entries before the merge starts, so an oversized sparse file is never read). The
bytes are copied from the opened file descriptor, checked to be the entry that was planned,
and never more than were planned.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from moe_merge.checkpoint.safe_load import open_regular
from moe_merge.errors import CheckpointError

HF_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
})
MAX_FILE_BYTES = 64 << 20  # the largest tokenizer.json of common models is ~35 MB
MAX_TOTAL_BYTES = 256 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class HFFile:
    """One file to copy, as its directory entry was when the merge was planned."""

    path: Path
    size: int
    dev: int
    ino: int

    @property
    def name(self) -> str:
        return self.path.name


def plan_copy(hf_dir: str | Path) -> list[HFFile]:
    """The allowlisted files of ``hf_dir`` to copy, checked (see the module docstring)."""
    hf_dir = Path(hf_dir)
    files, total = [], 0
    for name in sorted(HF_FILES):
        path = hf_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"{path}: a symlink; the files copied next to the merged "
                                  f"weights must be regular files in {hf_dir} (copy the file "
                                  "there): refused")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device, socket or "
                                  "directory): refused")
        if st.st_size > MAX_FILE_BYTES:
            raise CheckpointError(f"{path}: {st.st_size} bytes, more than the "
                                  f"{MAX_FILE_BYTES >> 20} MiB an HF config or tokenizer file "
                                  "may have: refused")
        total += st.st_size
        if total > MAX_TOTAL_BYTES:
            raise CheckpointError(f"{path}: the HF files of {hf_dir} exceed "
                                  f"{MAX_TOTAL_BYTES >> 20} MiB together: refused")
        files.append(HFFile(path, st.st_size, st.st_dev, st.st_ino))
    return files


def skipped(hf_dir: str | Path) -> list[str]:
    """Names in ``hf_dir`` that are not copied, leaving out hidden names, weights, indexes and
    a merge manifest (never meant to be copied)."""
    quiet = (".safetensors", ".bin", ".pt", ".pth", ".index.json", "merge_manifest.json")
    return sorted(n for n in os.listdir(hf_dir)
                  if n not in HF_FILES and not n.startswith(".") and not n.endswith(quiet))


def copy_files(files: list[HFFile], out_dir: Path) -> None:
    """Copy the planned ``files`` into ``out_dir`` (a new directory of this process)."""
    for f in files:
        fd = open_regular(f.path, f.path.parent)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (f.dev, f.ino):
                raise CheckpointError(f"{f.path}: replaced while the merge ran: refused")
            left = f.size
            with open(out_dir / f.name, "xb") as dst:
                while left:
                    block = os.read(fd, min(_CHUNK, left))
                    if not block:
                        raise CheckpointError(f"{f.path}: shrank while the merge ran: refused")
                    dst.write(block)
                    left -= len(block)
            if os.read(fd, 1):
                raise CheckpointError(f"{f.path}: grew while the merge ran: refused")
        finally:
            os.close(fd)
