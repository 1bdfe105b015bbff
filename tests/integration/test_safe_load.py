"""The torch-free checkpoint parser against torch.load, and the piecewise CRC-32 check."""

from __future__ import annotations

import pickle
import shutil

from support import crafted

from moe_merge.checkpoint.safe_load import load


def test_build_retargeting_a_real_master_partition_is_refused_by_merge(tmp_path, trained, capsys):
    """The attack as an attacker would ship it: a copy of a real ZeRO-2 tag whose optimizer
    file re-points the fp32 partition record at a private file. Before: exit 0 with the file's
    bytes in model.safetensors. Now: exit 2, one line, nothing written."""
    from moe_merge.cli import main

    run = trained("moe_z2")
    secret = tmp_path / "secret"
    secret.write_bytes(b"AWS_SECRET=do-not-leak" * 1000)
    tags = []
    for step in (6, 8):
        tag = tmp_path / "ckpt" / f"global_step{step}"
        shutil.copytree(run / "checkpoints" / f"global_step{step}", tag)
        tags.append(tag)
    optim = tags[1] / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flat = load(optim)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    key = flat.record.name.rsplit("/", 1)[1]
    _, pkl = crafted.archive_pickle(optim)
    crafted.rewrite(optim, crafted.before_stop(pkl, crafted.storage_pid(key, flat.numel())
                                               + crafted.str_dict({"path": str(secret),
                                                                   "offset": 0, "nbytes": 0,
                                                                   "crc": 0})
                                               + pickle.BUILD + pickle.POP))
    before = {p: p.read_bytes() for t in tags for p in t.iterdir()}
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", *map(str, tags), "--out", str(out), "--format", "safetensors", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and optim.name in err[0] and "BUILD" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert before == {p: p.read_bytes() for t in tags for p in t.iterdir()}
    rc = main(["inspect", str(tmp_path / "ckpt")])
    report = capsys.readouterr().out
    assert rc == 1 and "mergeable: NO" in report and "BUILD" in report, report


