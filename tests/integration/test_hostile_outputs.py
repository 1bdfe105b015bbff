"""Hostile inputs on the output side of a merge, on copies of the suite's real runs: files copied
next to the weights, outputs that overlap the inputs, remote code in an HF config, an HF config
far larger than the checkpoint, and what a failed or replacing merge leaves behind.

Every refusal is one line, exit 2, with nothing written and the inputs byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import crafted
from support.runs import REPO, run_cli

from moe_merge.cli import main

SECRET = "TOP-SECRET-7f3a"


def small_run(trained, dst: Path, kind: str = "moe_z2", steps=(6, 8)) -> Path:
    """A copy of run ``kind`` with only tags ``steps`` (fast to copy, free to modify)."""
    src = trained(kind)
    dst.mkdir(parents=True)
    for name in ("hf", "recipe.yaml"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, symlinks=True)
        else:
            shutil.copy(src / name, dst / name)
    for s in steps:
        shutil.copytree(src / "checkpoints" / f"global_step{s}",
                        dst / "checkpoints" / f"global_step{s}", symlinks=True)
    (dst / "checkpoints" / "latest").write_text(f"global_step{steps[-1]}")
    return dst


def run(capsys, *args) -> tuple[int, list[str]]:
    """``moe-merge ARGS`` in this process: its exit code and its stderr lines."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def refused(result: tuple[int, list[str]], *needles: str) -> str:
    code, lines = result
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("moe-merge ") and ": error: " in lines[0], lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file content hashes, link targets, directories."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d, n)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def grep_tree(root: Path, text: str) -> list[Path]:
    """Regular files under ``root`` (links not followed) holding ``text``."""
    return [Path(d, n) for d, _, files in os.walk(root) for n in files
            if not Path(d, n).is_symlink() and text.encode() in Path(d, n).read_bytes()]


def rchar() -> int:
    """Bytes this process has read through read() calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# ---- files copied next to the weights ------------------------------------------------------
def test_only_regular_allowlisted_hf_files_are_copied(trained, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    r = small_run(trained, tmp_path / "run")
    hf = r / "hf"
    (hf / "notes.txt").symlink_to(secret)  # not an HF file: skipped, never read
    (hf / "modeling_evil.py").write_text(f"# {SECRET}\n")
    (hf / ".hidden").write_text(SECRET)
    code, lines = run(capsys, "merge", r, "--out", tmp_path / "ok", "--quiet")
    assert code == 0, lines
    assert any("not copied" in x and "modeling_evil.py" in x and "notes.txt" in x for x in lines)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "config.json", "merge_manifest.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ok" / name).read_bytes() == (hf / name).read_bytes()
    assert not grep_tree(tmp_path / "ok", SECRET)

    # An allowlisted name that is a symlink is refused, wherever the link points.
    (hf / "tokenizer.json").rename(tmp_path / "tokenizer.json.orig")
    (hf / "tokenizer.json").symlink_to(secret)
    before = tree(tmp_path)
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"),
            str(hf / "tokenizer.json"), "symlink", "refused")
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json.orig")
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), "tokenizer.json",
            "symlink")
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.json").symlink_to(secret)
    assert tree(tmp_path) == before  # nothing written anywhere
    assert not (tmp_path / "out").exists()
    assert set(grep_tree(tmp_path, SECRET)) == {secret, hf / "modeling_evil.py", hf / ".hidden"}


def test_a_huge_sparse_hf_file_is_refused_without_reading_it(trained, tmp_path, capsys):
    r = small_run(trained, tmp_path / "run")
    big = r / "hf" / "tokenizer.json"
    os.truncate(big, 1 << 30)  # 1 GiB, sparse: costs nothing until someone reads it
    read0, t0 = rchar(), time.perf_counter()
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), str(big), "MiB",
            "refused")
    assert time.perf_counter() - t0 < 10
    assert rchar() - read0 < 200 << 20  # the checkpoint's pickles, not the gigabyte
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- outputs that overlap the inputs -------------------------------------------------------
def test_an_output_never_replaces_or_enters_its_inputs(trained, tmp_path, capsys):
    r = small_run(trained, tmp_path / "run")
    ckpts, hf = r / "checkpoints", r / "hf"
    other_hf = tmp_path / "hfcfg"
    shutil.copytree(hf, other_hf)
    (tmp_path / "link").symlink_to(ckpts / "global_step6")
    cases = [  # (arguments, the input the message names)
        (["merge", r, "--out", r, "--overwrite"], r),
        (["merge", r, "--out", hf, "--overwrite"], hf),
        (["merge", r, "--out", hf / "new"], hf),
        (["merge", r, "--out", ckpts / "global_step8", "--overwrite"], ckpts),
        (["merge", r, "--out", ckpts / "global_step2"], ckpts),
        (["merge", r, "--out", ckpts, "--overwrite"], ckpts),
        (["merge", r, "--out", tmp_path, "--overwrite"], r),
        (["merge", r, "--out", tmp_path / "link", "--overwrite"], ckpts),
        (["merge", ckpts / "global_step6", ckpts / "global_step8", "--out", ckpts,
          "--overwrite"], ckpts / "global_step6"),
        (["merge", r, "--hf-config", other_hf, "--out", other_hf / "m"], other_hf),
        (["merge", r, "--format", "safetensors", "--out", ckpts / "x"], ckpts),
        (["analyze", r, "--last", "2", "--out", r, "--overwrite"], r),
        (["analyze", r, "--last", "2", "--out", ckpts / "analysis"], ckpts),
    ]
    before = tree(tmp_path)
    for args, named in cases:
        out = args[args.index("--out") + 1]
        line = refused(run(capsys, *args, "--quiet"), f"--out {out}", str(named))
        assert "input" in line, line
        assert tree(tmp_path) == before, args  # inputs byte-identical, nothing created
    # A sibling of checkpoints/ inside the run directory is where the quick start writes.
    code, lines = run(capsys, "merge", r, "--out", r / "merged" / "sma", "--quiet")
    assert code == 0, lines
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("run/merged")} == before


# ---- remote code -----------------------------------------------------------------------------
EVIL = "open({marker!r}, 'w').write('ran')\nclass EvilConfig: pass\nclass EvilModel: pass\n"


def _plant_remote_code(d: Path, marker: Path, config: str = "config.json",
                       model_type: str | None = None) -> None:
    cfg = json.loads((d / config).read_text())
    if model_type:
        cfg["model_type"] = model_type  # a model transformers knows only from the bundled code
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                       "AutoTokenizer": ["evil.EvilConfig", None]}
    (d / config).write_text(json.dumps(cfg))
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))


def test_a_config_that_needs_custom_code_is_refused_without_a_prompt(trained, tmp_path, capsys):
    marker = tmp_path / "remote-code-ran"
    r = small_run(trained, tmp_path / "run")
    assert run(capsys, "merge", r, "--out", tmp_path / "good", "--quiet")[0] == 0
    _plant_remote_code(r / "hf", marker)
    before = tree(tmp_path)
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"),
            str(r / "hf" / "config.json"), "auto_map", "custom code", "refused")
    # eval of an HF directory (the model and its tokenizer are read by transformers)
    _plant_remote_code(tmp_path / "good", marker)
    refused(run(capsys, "eval", tmp_path / "good", "--recipe", r / "recipe.yaml"), "auto_map")
    _plant_remote_code(tmp_path / "good", marker, "tokenizer_config.json")
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    del cfg["auto_map"]
    (tmp_path / "good" / "config.json").write_text(json.dumps(cfg))
    refused(run(capsys, "eval", tmp_path / "good", "--recipe", r / "recipe.yaml"),
            "tokenizer_config.json", "auto_map")
    # a recipe's data.tokenizer directory
    from moe_merge.config.recipe import DataConfig
    from moe_merge.errors import DataError
    from moe_merge.training.data import prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 20)
    with pytest.raises(DataError, match="auto_map"):
        prepare(DataConfig(source=str(docs), tokenizer=str(tmp_path / "good"),
                           cache_dir=str(tmp_path / "cache"), val_fraction=0.5))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert {k: v for k, v in tree(tmp_path).items()
            if k.startswith("run/")} == {k: v for k, v in before.items() if k.startswith("run/")}

    # At a terminal too, for a model only the bundled code knows (where transformers would
    # ask whether to run it): no question is asked, the answer is the same one line.
    _plant_remote_code(r / "hf", marker, model_type="evil_moe")
    args = [sys.executable, "-m", "moe_merge", "merge", str(r), "--out", str(tmp_path / "out"),
            "--quiet"]
    proc = run_cli(args, timeout=120)  # stdin from /dev/null
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "auto_map" in proc.stderr and "[y/N]" not in proc.stderr + proc.stdout
    proc, text = _run_on_a_pty([sys.executable, "-m", "moe_merge", "merge", str(r), "--out",
                                str(tmp_path / "out"), "--quiet"])
    assert proc.returncode == 2, text
    lines = [x for x in text.replace("\r", "").splitlines() if x.strip()]
    assert len(lines) == 1 and "auto_map" in lines[0], text
    assert "[y/N]" not in text and "custom code?" not in text
    assert not marker.exists() and not (tmp_path / "out").exists()


def _run_on_a_pty(args: list[str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Run ``args`` with stdin, stdout and stderr a terminal; whatever it prints. A prompt
    would block: after ``timeout`` the process is killed (and the test fails)."""
    try:
        master, slave = pty.openpty()
    except OSError as e:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal here ({e})")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        proc.wait(timeout=30)
        os.close(master)
    return proc, b"".join(chunks).decode(errors="replace")


# ---- an HF config far larger than the checkpoint ---------------------------------------------
def test_an_hf_config_that_disagrees_with_the_checkpoint_costs_nothing(trained, tmp_path, capsys):
    r = small_run(trained, tmp_path / "run")
    cfg_path = r / "hf" / "config.json"
    original = cfg_path.read_bytes()
    good = json.loads(original)
    cases = [  # (changes, the key named)
        ({"num_hidden_layers": 20000}, "num_hidden_layers is 20000"),
        ({"num_local_experts": 20000}, "num_local_experts is 20000"),
        ({"num_experts": 20000}, "num_experts is 20000"),
        ({"vocab_size": 50000}, "vocab_size is 50000"),
        ({"hidden_size": 4096}, "hidden_size is 4096"),
        ({"moe_intermediate_size": 1 << 20}, "moe_intermediate_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers"),
        ({"text_config": {"vision": {"num_hidden_layers": 10**9}}},
         "text_config.vision.num_hidden_layers"),
    ]
    before = tree(r)
    for change, needle in cases:
        cfg_path.write_text(json.dumps({**good, **change}))
        t0 = time.perf_counter()
        refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), str(cfg_path),
                needle)
        assert time.perf_counter() - t0 < 2.0, change
    cfg_path.write_text("{\"num_hidden_layers\": 2,")
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), str(cfg_path),
            "not valid JSON")
    cfg_path.write_text("[" * 100000 + "]" * 100000)
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), str(cfg_path),
            "not valid JSON")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(good))
    cfg_path.unlink()
    cfg_path.symlink_to(elsewhere)  # config.json must not lead out of its directory
    refused(run(capsys, "merge", r, "--out", tmp_path / "out", "--quiet"), "config.json",
            "outside")
    cfg_path.unlink()
    cfg_path.write_bytes(original)
    assert tree(r) == before and not (tmp_path / "out").exists()
    # eval of an HF directory: the config is checked against the weights' safetensors headers
    assert run(capsys, "merge", r, "--out", tmp_path / "model", "--quiet")[0] == 0
    model_cfg = tmp_path / "model" / "config.json"
    model_cfg.write_text(json.dumps({**good, "num_hidden_layers": 20000}))
    t0 = time.perf_counter()
    refused(run(capsys, "eval", tmp_path / "model", "--recipe", r / "recipe.yaml"),
            str(model_cfg), "num_hidden_layers is 20000")
    assert time.perf_counter() - t0 < 10


# ---- what a failed or replacing merge leaves behind ---------------------------------------------
def test_a_failed_merge_into_a_new_deep_out_leaves_no_directories(trained, tmp_path, capsys):
    r = small_run(trained, tmp_path / "run", steps=(8,))
    optim = r / "checkpoints" / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    crafted.poke_records(optim, b"\x00\x00\xc0\x7f")  # NaN: found while the tensors are merged
    (tmp_path / "outs").mkdir()
    (tmp_path / "file").write_text("x")
    if os.geteuid() == 0:
        locked = Path("/sys/moe-merge-test")  # not even root may create a directory here
        assert not locked.exists()
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        locked = tmp_path / "ro" / "moe-merge-test"
    before = tree(tmp_path)
    code, lines = run(capsys, "merge", r, "--out", tmp_path / "outs" / "a" / "b" / "c" / "out",
                      "--quiet")
    assert code == 2 and lines[0].startswith("merging"), lines  # it failed while writing
    assert "CRC-32" in lines[-1] or "NaN" in lines[-1], lines
    assert tree(tmp_path) == before  # no a/b/c left behind
    # Directories that cannot be made: one line naming them.
    refused(run(capsys, "merge", r, "--out", tmp_path / "file" / "out", "--quiet"),
            str(tmp_path / "file"))
    refused(run(capsys, "merge", r, "--out", tmp_path / "file" / "a" / "out", "--quiet"),
            str(tmp_path / "file" / "a"))
    refused(run(capsys, "merge", r, "--out", locked / "out", "--quiet"), str(locked),
            "cannot create")
    assert tree(tmp_path) == before and not locked.exists()


def test_overwrite_through_a_symlink_replaces_the_link_and_leaves_nothing(trained, tmp_path,
                                                                           capsys):
    r = small_run(trained, tmp_path / "run")
    outs = tmp_path / "outs"
    outs.mkdir()
    assert run(capsys, "merge", r, "--last", "1", "--out", outs / "real", "--quiet")[0] == 0
    (outs / "real" / "keep.txt").write_text("mine")
    (outs / "link").symlink_to(outs / "real")
    refused(run(capsys, "merge", r, "--out", outs / "link", "--quiet"), "exists", "--overwrite")
    code, lines = run(capsys, "merge", r, "--out", outs / "link", "--overwrite", "--quiet")
    assert code == 0, lines
    assert sorted(p.name for p in outs.iterdir()) == ["link", "real"]  # no .link.old-PID, no tmp
    assert (outs / "link").is_dir() and not (outs / "link").is_symlink()
    assert json.loads((outs / "link" / "merge_manifest.json").read_text())["weights"] == [0.5, 0.5]
    assert (outs / "real" / "keep.txt").read_text() == "mine"  # what the link pointed to: kept
    # a dangling link is an existing output that is not a directory
    (outs / "dangling").symlink_to(tmp_path / "nowhere")
    refused(run(capsys, "merge", r, "--out", outs / "dangling", "--overwrite", "--quiet"),
            "not a directory")
    assert (outs / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()
