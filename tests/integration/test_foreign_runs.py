"""Runs of other trainers, found without flags: the transformers Trainer with DeepSpeed
(``OUT/checkpoint-N/global_stepN/``, ZeRO-2, ZeRO-3, AutoEP) and Accelerate's ``save_state``
with DeepSpeed (``OUT/checkpoints/checkpoint_K/pytorch_model/``), written by real runs of both
(tests/support/other_trainers.py). Oracles: DeepSpeed's ``zero_to_fp32`` per checkpoint plus
torch averaging, and, for AutoEP (which ``zero_to_fp32`` cannot read), the DeepSpeed engine
after ``load_checkpoint``: of each input, and of the merge written as a DeepSpeed checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.merging import cli, safetensors_out
from support.runs import PY, _free_port, run_cli

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "other_trainers.py"
# what an HF output of the merge holds; nothing of a trainer's (latest, trainer_state.json, ...)
HF_OUTPUT = {"config.json", "generation_config.json", "model.safetensors", "merge_manifest.json"}


def folders(out: Path, trainer: str) -> list[Path]:
    """The checkpoint folders of a run, oldest first."""
    if trainer == "hf":
        return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return sorted((out / "checkpoints").glob("checkpoint_*"),
                  key=lambda p: int(p.name.split("_")[1]))


def zero_to_fp32_average(dirs: list[Path]) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sds = [get_fp32_state_dict_from_zero_checkpoint(str(d)) for d in dirs]
    return {n: (sum(sd[n].double() for sd in sds) / len(sds)).float() for n in sds[0]}


# the ZeRO-3 and AutoEP Trainer runs are those of the PMACallback tests (same checkpoints)
RUNS = {"hf_z2": ("hf", 2, 1, 0), "hf_z3": ("hf", 3, 1, 3),
        "accelerate_z2": ("accelerate", 2, 1, 0)}
AUTOEP = ("hf", 2, 2, 3)


@pytest.mark.parametrize("kind", RUNS)
def test_a_trainer_run_is_found_ordered_and_merged_without_flags(kind, foreign, tmp_path):
    trainer = RUNS[kind][0]
    out = foreign(*RUNS[kind])
    proc = cli("inspect", out, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    writer = {"hf": "transformers Trainer", "accelerate": "Accelerate"}[trainer]
    assert rep["written_by"] == [writer] and rep["mergeable"], rep["problems"]
    assert [r["step"] for r in rep["tags"]] == [2, 4, 6]
    assert [Path(r["folder"]).name for r in rep["tags"]] == [f.name for f in folders(out,
                                                                                    trainer)]
    assert rep["hf_config"] == str(folders(out, trainer)[-1] if trainer == "hf" else out)
    text = cli("inspect", out)
    assert text.returncode == 0 and f"written by {writer}" in text.stdout

    merged = tmp_path / "m"
    proc = cli("merge", out, "--last", "2", "--out", merged, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in merged.iterdir()} <= HF_OUTPUT | {"tokenizer.json"}
    assert {"config.json", "model.safetensors", "merge_manifest.json"} <= \
        {p.name for p in merged.iterdir()}
    manifest = json.loads((merged / "merge_manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [4, 6]
    want = zero_to_fp32_average(folders(out, trainer)[1:])
    got = safetensors_out(merged)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name

    # one checkpoint folder named alone is one checkpoint; naming several folders works too
    one = tmp_path / "one"
    assert cli("merge", folders(out, trainer)[0], "--out", one, "--quiet").returncode == 0
    ref = zero_to_fp32_average(folders(out, trainer)[:1])
    assert all(torch.equal(safetensors_out(one)[n], t) for n, t in ref.items())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert all(torch.equal(p.detach(), want[n]) for n, p in model.named_parameters())


def dump(out: Path, ckpt_folder: Path, prefix: Path) -> dict[str, torch.Tensor]:
    """What a fresh engine holds after load_checkpoint of ``ckpt_folder``'s tag: every rank's
    module parameters, the experts each rank holds under their rank-local names."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    proc = run_cli([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(_free_port()), str(SCRIPT), "--trainer", "hf", "--zero", "2", "--ep", "2",
                    "--out", str(out), "--dump-from", str(ckpt_folder), "--dump-to",
                    str(prefix)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from safetensors.torch import load_file

    return {f"rank{r}:{n}": t for r in (0, 1)
            for n, t in load_file(f"{prefix}.rank{r}.safetensors").items()}


def test_an_autoep_trainer_run_merges_to_what_the_engine_averages(foreign, tmp_path):
    """HF Trainer, ZeRO-2 + AutoEP EP=2: the merge of the latest 2 saves, written as a
    DeepSpeed checkpoint and loaded by the engine, holds on every rank the average of what
    the engine holds after loading each input; its HF output loads in transformers."""
    out = foreign(*AUTOEP)
    rep = json.loads(cli("inspect", out, "--json").stdout)
    assert rep["mergeable"] and [r["ep_size"] for r in rep["tags"]] == [2, 2, 2]
    ds_out = tmp_path / "ds"
    proc = cli("merge", out, "--last", "2", "--format", "deepspeed", "--out", ds_out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    a, b = (dump(out, f, tmp_path / f.name / "d") for f in folders(out, "hf")[1:])
    got = dump(out, ds_out, tmp_path / "merged" / "d")
    assert set(got) == set(a) and any(".experts." in n for n in got)
    for name in a:
        assert torch.equal(got[name], ((a[name].double() + b[name].double()) / 2).float()), name

    hf = tmp_path / "hf"
    assert cli("merge", out, "--last", "2", "--out", hf, "--quiet").returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.num_experts == 4
    dense = {n.split(":", 1)[1]: t for n, t in got.items()
             if n.startswith("rank0:") and ".experts." not in n and "gate" not in n}
    held = dict(model.named_parameters())
    common = set(dense) & set(held)
    assert common, "no dense parameter shared by the HF model and the engine"
    for n in common:
        assert torch.equal(held[n].detach(), dense[n]), n


def copy_run(out: Path, dst: Path) -> Path:
    shutil.copytree(out, dst, symlinks=True)
    return dst


def test_a_save_in_progress_is_skipped_unless_named(foreign, tmp_path):
    """A live run's newest checkpoint folder without its ``latest`` yet, or missing a rank's
    optimizer partition, is left out with a warning naming it when chosen by --last; named
    itself, a tag that misses files is refused in one line."""
    run = copy_run(foreign("hf", 2), tmp_path / "run")
    newest = folders(run, "hf")[-1]
    (newest / "latest").unlink()
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "a", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipped {newest / 'global_step6'}: no {newest / 'latest'} yet" in proc.stderr
    manifest = json.loads((tmp_path / "a" / "merge_manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [2, 4]

    (newest / "latest").write_text("global_step6")
    part = sorted((newest / "global_step6").glob("*optim_states.pt"))[-1]
    part.unlink()
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "b", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipped {newest / 'global_step6'}: " in proc.stderr
    assert "optimizer partition of rank 1 missing" in proc.stderr
    proc = cli("merge", newest, "--out", tmp_path / "c", "--quiet")
    assert proc.returncode == 2 and not (tmp_path / "c").exists()
    assert "error: " in proc.stderr.strip().splitlines()[-1]
    assert "optimizer partition of rank 1 missing" in proc.stderr
    rep = json.loads(cli("inspect", run, "--json").stdout)
    assert [s["tag"] for s in rep["skipped"]] == ["global_step6"]


def test_our_run_with_a_tag_newer_than_latest(trained, tmp_path):
    """In a run of ours, a tag newer than the one ``checkpoints/latest`` names is being written:
    --last leaves it out with a warning."""
    run = tmp_path / "run"
    shutil.copytree(trained("moe_z2"), run, symlinks=True)
    (run / "checkpoints" / "latest").write_text("global_step6")
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "m", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "global_step8: newer than the tag" in proc.stderr
    manifest = json.loads((tmp_path / "m" / "merge_manifest.json").read_text())
    assert [i["step"] for i in manifest["inputs"]] == [4, 6]


def test_trainer_folders_without_their_tag_or_from_two_runs_are_refused(foreign, tmp_path):
    run = copy_run(foreign("hf", 2), tmp_path / "run")
    shutil.rmtree(folders(run, "hf")[1] / "global_step4")  # as save_only_model leaves it
    proc = cli("merge", run, "--last", "2", "--out", tmp_path / "m", "--quiet")
    assert proc.returncode == 2 and not (tmp_path / "m").exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert str(folders(run, "hf")[1]) in line and "without its DeepSpeed tag" in line

    two = tmp_path / "two"  # checkpoints of two different models in one directory
    two.mkdir()
    shutil.copytree(folders(foreign("hf", 2), "hf")[0], two / "checkpoint-2")
    shutil.copytree(folders(foreign(*AUTOEP), "hf")[1], two / "checkpoint-4")
    proc = cli("merge", two, "--out", tmp_path / "m2", "--quiet")
    assert proc.returncode == 2 and not (tmp_path / "m2").exists()
    assert "error: " in proc.stderr.strip().splitlines()[-1]


def eval_loss(model_dir: Path) -> float:
    """The Trainer's eval loss, computed by hand: the mean over the eval set's batches of 2
    (each batch's mean token loss) of the HF model in ``model_dir``."""
    from support.other_trainers import EVAL_ROWS, Tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = Tokens(EVAL_ROWS, 2).ids
    with torch.no_grad():
        losses = [model(input_ids=rows[i:i + 2], labels=rows[i:i + 2]).loss.item()
                  for i in range(0, len(rows), 2)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("zero,ep", [(2, 1), (3, 1), (2, 2)])
def test_the_trainer_callback_logs_the_merge_of_the_latest_saves(zero, ep, foreign, tmp_path):
    """PMACallback(n=3) in a Trainer run: at the save of step 6 it logs pma/eval_loss, which
    equals ``moe-merge merge --last 3`` of the run's checkpoints scored on the same eval set,
    and pma/eval_gap, the live model's eval loss minus it; both reach trainer_state.json and
    TensorBoard; the training losses are those of the run without the callback, bit for bit;
    the merged model written at the end is that merge."""
    out = foreign("hf", zero, ep, 3)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    pma = [e for e in state["log_history"] if "pma/eval_loss" in e]
    assert [e["step"] for e in pma] == [6]  # the window is full at the 3rd save
    assert (pma[0]["pma/n"], pma[0]["pma/first_step"]) == (3, 2)
    merged = tmp_path / "m"
    assert cli("merge", out, "--last", "3", "--out", merged, "--quiet").returncode == 0
    assert pma[0]["pma/eval_loss"] == pytest.approx(eval_loss(merged), rel=1e-5)
    latest = tmp_path / "latest"
    assert cli("merge", out / "checkpoint-6", "--out", latest, "--quiet").returncode == 0
    assert pma[0]["pma/eval_gap"] == pytest.approx(eval_loss(latest) - eval_loss(merged),
                                                   abs=1e-5)
    assert pma[0]["pma/eval_gap"] != 0

    from support.runs import tb_tags

    scalars, _ = tb_tags(out)
    assert {"train/pma/eval_loss", "train/pma/eval_gap"} <= scalars  # the Trainer's prefix
    without = foreign("hf", zero, ep, 0) if ep == 1 else None  # ZeRO-2 and ZeRO-3
    if without is not None:
        assert json.loads((out / "losses.json").read_text()) == \
            json.loads((without / "losses.json").read_text())
    assert safetensors_out(out / "pma_merged").keys() == safetensors_out(merged).keys()
    assert all(torch.equal(safetensors_out(out / "pma_merged")[n], t)
               for n, t in safetensors_out(merged).items())


def test_the_callback_takes_the_gap_from_the_trainers_own_evaluation(tmp_path):
    """With the Trainer evaluating at every save, pma/eval_gap is its eval_loss at that step
    minus pma/eval_loss (no second evaluation of the live model)."""
    from support.runs import launch_foreign

    out = launch_foreign(tmp_path / "run", "hf", 2, "--pma", "3", "--eval-every", "2")
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    at6 = {k: v for e in history if e["step"] == 6 for k, v in e.items()}
    assert {"eval_loss", "pma/eval_loss", "pma/eval_gap", "loss"} <= set(at6)
    assert at6["pma/eval_gap"] == at6["eval_loss"] - at6["pma/eval_loss"]


@pytest.mark.parametrize("zero,ep", [(3, 1), (2, 2)])
def test_live_pma_in_a_plain_deepspeed_loop(zero, ep, tmp_path):
    """LivePMA in a loop of one's own (ZeRO-3; ZeRO-2 + AutoEP): the merged loss at the 3rd
    save equals the loss of ``moe-merge merge --last 3`` of the saved checkpoints on the same
    rows, and training goes on bit for bit as without it."""
    def launch(out: Path, *extra: str) -> Path:
        proc = run_cli([str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                        str(_free_port()), str(SCRIPT.with_name("plain_loop.py")), "--zero",
                        str(zero), "--ep", str(ep), "--out", str(out), *extra])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return out

    with_pma, without = launch(tmp_path / "a"), launch(tmp_path / "b", "--no-pma")
    assert json.loads((with_pma / "losses.json").read_text()) == \
        json.loads((without / "losses.json").read_text())
    scores = json.loads((with_pma / "pma.json").read_text())
    assert list(scores) == ["6"]
    merged = tmp_path / "m"
    proc = cli("merge", with_pma / "ckpts", "--last", "3", "--hf-config",
               foreign_config(tmp_path), "--out", merged, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert scores["6"]["merged"] == pytest.approx(eval_loss(merged), rel=1e-5)
    assert scores["6"]["merged"] != pytest.approx(scores["6"]["live"], rel=1e-6)


def foreign_config(where: Path) -> Path:
    """The tiny model's HF config directory (the plain loop saves none)."""
    from support.other_trainers import model_config

    d = where / "hf"
    model_config().save_pretrained(str(d))
    return d


def test_analyze_a_trainer_run_on_its_own_data(foreign, tmp_path):
    """``moe-merge analyze OUT --data FILE``: the second-order terms of a Trainer run's merge,
    with no recipe (the default windows of the data given)."""
    import numpy as np

    val = tmp_path / "val.bin"
    np.random.default_rng(5).integers(0, 128, 2048).astype(np.uint16).tofile(val)
    out = tmp_path / "a"
    proc = cli("analyze", foreign(*RUNS["hf_z2"]), "--last", "3", "--data", val, "--set",
               "data.seq_len=16", "--batches", "2", "--micro-batch", "2", "--out", out,
               "--quiet", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "analysis.json").read_text())
    assert result["steps"] == [2, 4, 6] and result["batches"] == 2
    assert result["recipe"] == "(defaults)"
