"""Before DeepSpeed loads a tag: the checks every ``engine.load_checkpoint`` goes through.

DeepSpeed reads a checkpoint with ``torch.load(weights_only=False)``, which runs whatever a
pickle asks for. :func:`check_tag` is what every load handed to DeepSpeed (resume,
``train.fork_from``, ``train.init_from``, spike recovery, a ``--format deepspeed`` template)
goes through first: the tag name must be one directory name, the tag directory must lie inside
the directory it is loaded from (symlinks resolved) and hold only regular files, and every
pickle in it must parse with the restricted interpreter of :mod:`moe_merge.checkpoint.safe_load`.
The ranks share the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_merge.checkpoint.safe_load import check_file, read_small, real_path
from moe_merge.errors import CheckpointError

MAX_TAG_NAME = 255  # bytes of a tag name (one directory name); ``latest`` holds one


def check_tag_name(tag: str, source: Path | str) -> str:
    """``tag`` if it is one directory name (no '/', not '.' or '..'): a tag that cannot lead a
    load out of its checkpoints directory. ``source``: where the name came from, for the error."""
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or "\0" in tag \
            or len(tag.encode()) > MAX_TAG_NAME or not tag.isprintable():
        raise CheckpointError(f"{source}: the tag name {tag[:80]!r} is not one directory name "
                              "inside the checkpoints directory: refused")
    return tag


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``ckpt_dir/latest`` names (None without the file). ``latest`` must be a small
    regular file inside ``ckpt_dir`` naming one directory name (:func:`check_tag_name`)."""
    path = Path(ckpt_dir) / "latest"
    if not os.path.lexists(path):
        return None
    raw = read_small(path, ckpt_dir, limit=MAX_TAG_NAME + 2)  # a name and a newline
    try:
        tag = raw.decode().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a tag name (not UTF-8 text): refused") from None
    return check_tag_name(tag, path)


def tag_files(load_dir: Path | str, tag: str) -> list[Path]:
    """Every entry of the tag directory ``load_dir/tag``, sorted by name, after checking that
    ``tag`` is one directory name and that the directory (symlinks resolved) lies inside
    ``load_dir``. Raises :class:`CheckpointError`."""
    tag_dir = Path(load_dir) / check_tag_name(tag, load_dir)
    real = real_path(tag_dir, load_dir)
    if not real.is_dir():
        raise CheckpointError(f"{tag_dir}: not a checkpoint directory")
    return sorted(tag_dir.iterdir())


def share(n: int, rank: int, world: int) -> range:
    """Indices (of ``n`` files) that ``rank`` of ``world`` checks: file i by rank i % world."""
    return range(rank, n, world)


def check_tag(load_dir: Path | str, tag: str, dist=None, device=None) -> list[Path]:
    """Check the tag ``load_dir/tag`` before ``engine.load_checkpoint(load_dir, tag)`` reads it
    (see the module docstring); returns its files. With ``dist`` (``torch.distributed``, a
    process group up) every rank calls this, checks its :func:`share` of the files, and the
    ranks agree: a failure on any rank raises :class:`CheckpointError` on every rank, naming
    the first file refused. ``device``: where the agreement's tensor lives (the rank's)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    failure: tuple[int, str] | None = None  # (index of the file, message); -1: the tag itself
    files: list[Path] = []
    tag_dir = Path(load_dir) / tag
    index = -1
    try:
        files = tag_files(load_dir, tag)
        for index in share(len(files), rank, world):
            check_file(files[index], tag_dir)
    except CheckpointError as e:
        failure = (index, str(e))
    except Exception as e:  # still agreed on: a rank that raised alone would leave the rest
        where = files[index] if index >= 0 else tag_dir
        failure = (index, f"{where}: cannot be checked ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})")
    if world > 1:
        import torch

        flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
        dist.all_reduce(flag)
        if flag.item():
            found: list = [None] * world
            dist.all_gather_object(found, failure)
            failure = min(f for f in found if f is not None)
    if failure is not None:  # one line, even for a file name with a newline in it
        raise CheckpointError(failure[1].replace("\n", "\\n").replace("\r", "\\r"))
    return files
