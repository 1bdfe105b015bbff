"""Hostile checkpoints handed to the trainer: DeepSpeed loads checkpoints with
``torch.load(weights_only=False)``, which runs any pickle, so every tag the trainer gives it
(train.fork_from, train.init_from, resume, spike recovery) is first parsed with the restricted
interpreter, and a refused tag stops the launch in one line naming the file before DeepSpeed
reads it. The payloads would create a marker file if unpickled; the tests assert it is absent.
"""

from __future__ import annotations

import os

import pytest

from moe_merge.checkpoint import guard
from moe_merge.errors import CheckpointError


# ---- the check itself (no process group) ----------------------------------------------------
def test_share_gives_each_file_to_one_rank():
    for n, world in ((12, 2), (130, 64), (3, 8), (0, 4)):
        shares = [list(guard.share(n, r, world)) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        assert all(i % world == r for r, s in enumerate(shares) for i in s)
        assert max(map(len, shares)) <= -(-n // world)  # at most ceil(n / world) files each


def test_latest_is_bounded_and_stays_in_the_checkpoints_dir(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    assert guard.latest_tag(d) is None
    (d / "latest").write_text("global_step4\n")
    assert guard.latest_tag(d) == "global_step4"
    for text, match in (("../../etc", "is not one directory name"), ("x/y", "not one directory"),
                        ("..", "not one directory"), ("g" * 300, "larger than"),
                        ("a\x00b", "not one directory")):
        (d / "latest").write_text(text)
        with pytest.raises(CheckpointError, match=match):
            guard.latest_tag(d)
    (d / "latest").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        guard.latest_tag(d)
    (d / "latest").unlink()
    (tmp_path / "outside").write_text("global_step4")
    (d / "latest").symlink_to(tmp_path / "outside")
    with pytest.raises(CheckpointError, match="outside"):
        guard.latest_tag(d)
    (d / "latest").unlink()
    os.mkfifo(d / "latest")
    with pytest.raises(CheckpointError, match="not a regular file"):
        guard.latest_tag(d)


