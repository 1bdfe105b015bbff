"""Hostile checkpoint layouts: copies of real tags written by the suite's runs, changed as an
attacker would (a well-formed file with a bad value: loaded with torch, changed, saved back),
must each end in one line naming the file or key, exit 2, nothing written, the inputs
unchanged, and ``inspect`` answering "mergeable: NO" with the reason. Before, these inputs read
outside the tag (FIFOs that hang, /dev/zero, another run's files), allocated gigabytes
(``dp_world_size: 3e7``), wrote outputs of zeros (``num_experts: 20000``), merged wrong values
with exit 0 (duplicate expert placements, overlapping fragments, uint8 masters, renamed tags) or
ended in a traceback."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from moe_merge.checkpoint.reader import DSCheckpoint
from moe_merge.cli import main
from moe_merge.errors import CheckpointError

pytestmark = pytest.mark.distributed  # the trained runs come from 2-rank launches

MODEL = "mp_rank_00_model_states.pt"
OPTIM0 = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
Z3_MODEL1 = "zero_pp_rank_1_mp_rank_00_model_states.pt"
EXPERT = "layer_1_expert_3_mp_rank_00_model_states.pt"
EMBED = "model.embed_tokens.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
SLICES = ["optimizer_state_dict", "param_slice_mappings"]
FLATS = ["optimizer_state_dict", "single_partition_of_fp32_groups"]
Z3_GROUPS = ["optimizer_state_dict", "ds_zero_partition_groups"]
PLACEMENT = ["ds_autoep_layers", 0, "expert_placement"]
DELETE = object()


# ---- helpers -------------------------------------------------------------------------------
class Copies:
    """Fresh copies of a real run's newest tag, as ``<tmp>/<n>/run/checkpoints/<name>``."""

    def __init__(self, trained, tmp_path: Path):
        self.trained, self.tmp, self.n = trained, tmp_path, 0

    def __call__(self, kind: str, name: str = "global_step8") -> Path:
        self.n += 1
        dst = self.tmp / str(self.n) / "run" / "checkpoints" / name
        shutil.copytree(self.trained(kind) / "checkpoints" / "global_step8", dst, symlinks=True)
        return dst


@pytest.fixture
def copies(trained, tmp_path) -> Copies:
    return Copies(trained, tmp_path)


def edit(path: Path, keys: list, value) -> None:
    """Set ``keys`` of the torch.save file ``path`` to ``value`` (a callable: applied to the
    old value; DELETE: removed), and save it back."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    obj = sd
    for k in keys[:-1]:
        obj = obj[k]
    if value is DELETE:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value
    torch.save(sd, path)


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (symlinks and FIFOs not followed or opened) and its content."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[p] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[p] = ("other", stat.S_IFMT(st.st_mode))
    return out


def merge_cli(capsys, ckpt: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(["merge", str(ckpt), "--out", str(out), "--format", "safetensors", "--quiet",
               *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


def refused(capsys, ckpt: Path, *words: str, extra: tuple = (), top: Path | None = None) -> str:
    """A merge of ``ckpt`` ends in one line holding ``words``, exit 2, nothing written, the
    inputs under ``top`` unchanged; inspect says "mergeable: NO" with the same reason."""
    top = top or ckpt.parent.parent.parent
    before = snapshot(top)
    out = top / "out"
    rc, err = merge_cli(capsys, ckpt, out, *extra)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("moe-merge merge: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists() and not list(top.glob(".out*")), "output written"
    assert snapshot(top) == before, "inputs changed"
    if not extra:  # inspect reads the layout as a master-weight merge does
        rc = main(["inspect", str(ckpt)])
        report = capsys.readouterr().out
        assert rc == 1 and "mergeable: NO" in report, report
        assert words[0] in report, report
        assert snapshot(top) == before
    return err[0]


def safetensors_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def merges_as_the_original(capsys, ckpt: Path, original: Path, *extra: str) -> None:
    """The control: a copy changed in a harmless way merges to the same bits as the tag it was
    copied from."""
    rc, err = merge_cli(capsys, ckpt, ckpt.parent.parent.parent / "out", *extra)
    assert rc == 0, err
    rc, err = merge_cli(capsys, original, ckpt.parent.parent.parent / "want", *extra)
    assert rc == 0, err
    got = safetensors_of(ckpt.parent.parent.parent / "out")
    want = safetensors_of(ckpt.parent.parent.parent / "want")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


# ---- the tests -----------------------------------------------------------------------------
def test_rewritten_files_and_inside_symlinks_still_merge_bit_for_bit(copies, trained, capsys):
    """The controls for everything below: a file loaded and saved back by torch with no change,
    a placement and fragments rewritten with their own values, and a symlink to a regular file
    inside the tag merge exactly as the original; inspect says yes."""
    original = trained("moe_z2") / "checkpoints" / "global_step8"
    tag = copies("moe_z2")
    edit(tag / MODEL, PLACEMENT, lambda p: {**p})
    edit(tag / OPTIM0, SLICES + [0, Q_PROJ], lambda f: type(f)(numel=f.numel, start=f.start))
    (tag / OPTIM1).rename(tag / "rank1.bin")
    os.symlink("rank1.bin", tag / OPTIM1)
    rc = main(["inspect", str(tag)])
    assert rc == 0 and "mergeable: yes" in capsys.readouterr().out
    merges_as_the_original(capsys, tag, original)


def test_only_regular_files_inside_the_tag_are_read(copies, trained, capsys, tmp_path):
    """A FIFO (a merge would hang), /dev/zero, another run's partition, a private file or a
    meta.json leading out of the tag: refused by name before anything is opened."""
    secret = tmp_path / "secret"
    secret.write_text("API_TOKEN=do-not-leak\n" * 100)
    other_run = trained("moe_z2") / "checkpoints" / "global_step6" / OPTIM1

    tag = copies("moe_z2")
    (tag / OPTIM1).unlink()
    os.mkfifo(tag / OPTIM1)
    refused(capsys, tag, OPTIM1, "not a regular file")
    tag = copies("moe_z2")
    os.mkfifo(tag / "notes")
    refused(capsys, tag, "notes", "not a regular file")
    for target, name in ((Path("/dev/zero"), OPTIM1), (other_run, OPTIM1), (secret, EXPERT),
                         (secret, "tokenizer.json"), (secret, "meta.json")):
        tag = copies("moe_z2")
        (tag / name).unlink(missing_ok=True)
        os.symlink(target, tag / name)
        refused(capsys, tag, name, str(target), "outside")
    tag = copies("moe_z2")
    os.symlink("nothing-here", tag / "dangling.pt")
    refused(capsys, tag, "dangling.pt", "symlink to nothing")


def test_symlinks_leading_out_of_what_was_named_are_refused(copies, trained, capsys, tmp_path):
    """A run whose checkpoints/ (or one tag) is a symlink to another run's: refused, saying to
    name the target itself; named directly, it is read."""
    victim = trained("moe_z2") / "checkpoints"
    run = tmp_path / "attacker"
    run.mkdir()
    os.symlink(victim, run / "checkpoints")
    refused(capsys, run, str(run / "checkpoints"), f"name {victim.resolve()} itself", top=run)
    tag = copies("moe_z2")
    os.symlink(victim / "global_step6", tag.parent / "global_step6")
    run = tag.parent.parent
    refused(capsys, run, "global_step6", "outside", "itself", top=run.parent)
    rc, err = merge_cli(capsys, victim / "global_step6", tmp_path / "direct")
    assert rc == 0, err


def test_metadata_numbers_must_agree_with_the_files(copies, capsys):
    """dp_world_size 3e7 (a 3 GB range), ep sizes, num_experts 20000 (a 704 MB output of
    zeros), expert files missing or extra: refused before anything large is allocated."""
    for keys, value, words in (
            (["dp_world_size"], 30_000_000, ("dp_world_size", "30000000")),
            (["dp_world_size"], 3, ("rank 2 missing", "dp_world_size")),
            (["dp_world_size"], 3e7, ("dp_world_size", "not an integer")),
            (["ds_autoep_layers", 0, "ep_size"], 3, ("ep_size", "does not divide")),
            (["ds_autoep_layers", 0, "num_experts"], 20000, ("num_experts", "20000"))):
        tag = copies("moe_z2")
        edit(tag / MODEL, keys, value)
        refused(capsys, tag, MODEL, *words)
    tag = copies("moe_z2")  # without a placement: local experts x ep size must be num_experts
    edit(tag / MODEL, PLACEMENT, DELETE)
    edit(tag / MODEL, ["ds_autoep_layers", 0, "num_experts"], 20000)
    refused(capsys, tag, MODEL, "2 local experts on each of 2 EP ranks are not 20000")
    tag = copies("moe_z3")  # ZeRO-3 has no expert files: the shapes bound it
    edit(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", ["dp_world_size"], 30_000_000)
    refused(capsys, tag, "dp_world_size")
    tag = copies("moe_z2")
    (tag / EXPERT).unlink()
    refused(capsys, tag, EXPERT, "missing")
    tag = copies("moe_z2")
    shutil.copy(tag / EXPERT, tag / "layer_1_expert_4_mp_rank_00_model_states.pt")
    refused(capsys, tag, "layer_1_expert_4_mp_rank_00_model_states.pt", "4 experts")
    tag = copies("moe_z2")
    shutil.copy(tag / OPTIM0, tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    refused(capsys, tag, "zero_pp_rank_2_mp_rank_00_optim_states.pt", "dp_world_size")


def test_expert_placements_must_place_every_expert_once(copies, capsys):
    """Duplicate, negative and out-of-range expert ids, EP ranks missing or twice, counts that
    do not fit the local shapes: before, experts were left at zero or summed twice (exit 0)."""
    def ranks(*experts):
        return lambda p: {**p, "ranks": [{"rank": r, "experts": list(e)}
                                         for r, e in enumerate(experts)]}

    for change, words in ((ranks([0, 1], [1, 3]), ("expert_placement", "places expert 1 twice")),
                          (ranks([-1, 1], [2, 3]), ("experts' is -1",)),
                          (ranks([0, 7], [2, 3]), ("experts' is 7",)),
                          (ranks([0, 1, 2, 3]), ("not a list of the 2 EP ranks",)),
                          (ranks([0], [1, 2, 3]), ("placement of MoE layer 0", "non-uniform")),
                          (lambda p: {**p, "ranks": [{"rank": 0, "experts": [0, 1]},
                                                     {"rank": 0, "experts": [2, 3]}]},
                           ("EP rank 0 twice",)),
                          (lambda p: {**p, "ranks": None}, ("ranks' is None",))):
        tag = copies("moe_z2")
        edit(tag / MODEL, PLACEMENT, change)
        refused(capsys, tag, MODEL, *words)
    tag = copies("moe_z2")  # 6 experts, 3 per rank: the local shapes hold 2
    edit(tag / MODEL, ["ds_autoep_layers", 0, "num_experts"], 6)
    edit(tag / MODEL, PLACEMENT, lambda p: {**ranks([0, 1, 2], [3, 4, 5])(p), "num_experts": 6})
    refused(capsys, tag, "layer_0_expert_4", "has 6 experts")
    tag = copies("moe_z3")
    edit(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", PLACEMENT, ranks([0, 1], [0, 1]))
    refused(capsys, tag, "places expert 0 twice")


def test_partitions_must_cover_each_parameter_exactly_once(copies, capsys):
    """ZeRO-1/2 fragments outside their flat partition or overlapping another (merged
    silently before), ZeRO-3 partition ranks twice or counts that disagree, shapes larger than
    the partitions hold."""
    def frag(start=None, numel=None):
        return lambda f: type(f)(numel=f.numel if numel is None else numel,
                                 start=f.start if start is None else start)

    for change, words in ((frag(start=100), ("overlap", EMBED, Q_PROJ)),
                          (frag(start=-1), (Q_PROJ + ".start", "-1")),
                          (frag(start=10 ** 9), (Q_PROJ, "outside the flat partition")),
                          (frag(numel=2 ** 70), (Q_PROJ + ".numel",))):
        tag = copies("moe_z2")
        edit(tag / OPTIM0, SLICES + [0, Q_PROJ], change)
        refused(capsys, tag, OPTIM0, *words)
    tag = copies("moe_z2")
    edit(tag / OPTIM0, SLICES + [0], lambda m: {k: v for k, v in m.items() if k != EMBED})
    refused(capsys, tag, EMBED, "in no optimizer partition")
    tag = copies("moe_z2")
    edit(tag / MODEL, ["param_shapes", 0, EMBED], (8192, 64))
    refused(capsys, tag, EMBED, "262144 master elements", "expected 524288")
    tag = copies("moe_z2")
    edit(tag / MODEL, ["param_shapes", 0, EMBED], (2 ** 40, 2 ** 40))
    refused(capsys, tag, MODEL, EMBED, "not a tensor shape")
    tag = copies("moe_z2")  # same element count, another shape: the module copy disagrees
    edit(tag / MODEL, ["param_shapes", 0, EMBED], (2048, 128))
    refused(capsys, tag, MODEL, EMBED, "expected [2048, 128]")
    tag = copies("moe_z2")  # two groups viewing the same bytes
    edit(tag / OPTIM0, FLATS, lambda v: [v[0], v[0][:224], *v[2:]])
    refused(capsys, tag, OPTIM0, "share bytes")
    tag = copies("moe_z3")
    edit(tag / OPTIM1, Z3_GROUPS + [0, "partition_rank"], 0)
    refused(capsys, tag, EMBED, "ranks [0, 0]")
    tag = copies("moe_z3")
    edit(tag / OPTIM0, Z3_GROUPS + [0, "partition_count"], 1)
    refused(capsys, tag, OPTIM1, "partition_count", "1 partition")
    tag = copies("moe_z3")
    edit(tag / OPTIM0, Z3_GROUPS + [0, "partition_count"], 5)
    refused(capsys, tag, OPTIM0, "partition_count' is 5")
    tag = copies("moe_z3")
    edit(tag / Z3_MODEL1, ["ds_autoep_layers", 0, "ep_rank"], 0)
    refused(capsys, tag, "model.layers.0.mlp.experts.w1", "ranks [0, 0]")


def test_fp32_masters_are_float32_and_module_weights_floating_point(copies, capsys):
    """A uint8 or int32 storage declared as the fp32 master partition (torch's copy_ converted
    it silently before), a ZeRO-3 flat group of int32, integer module weights."""
    for view in (torch.uint8, torch.int32):
        tag = copies("moe_z2")
        edit(tag / OPTIM0, FLATS, lambda v, d=view: [v[0].view(d), *v[1:]])
        refused(capsys, tag, OPTIM0, "single_partition_of_fp32_groups.0", f"{view}"[6:],
                "float32")
    tag = copies("moe_z3")
    edit(tag / OPTIM1, ["optimizer_state_dict", "fp32_flat_groups"],
         lambda v: [v[0], v[1].clone().view(torch.int32), *v[2:]])
    refused(capsys, tag, OPTIM1, "fp32_flat_groups.1", "int32")
    tag = copies("llama_z0")  # ZeRO-0: the module weights are the values merged
    edit(tag / MODEL, ["module", EMBED], lambda t: t.view(torch.int32))
    refused(capsys, tag, MODEL, EMBED, "int32")
    tag = copies("moe_z2")
    edit(tag / MODEL, ["module", "model.norm.weight"], lambda t: t.view(torch.int32))
    refused(capsys, tag, MODEL, "model.norm.weight", "int32", extra=("--source", "module"))
    tag = copies("moe_z2")  # per-expert files are read with --source module
    edit(tag / EXPERT, ["model.layers.1.mlp.experts.w1.3"], lambda t: t.view(torch.int32))
    c = DSCheckpoint(tag)
    with pytest.raises(CheckpointError, match=f"{EXPERT}: module weight .*w1.3 is a tensor of "
                                              "int32"):
        c.check_module()
    with pytest.raises(CheckpointError, match="int32"):
        c.read("model.layers.1.mlp.experts.w1", source="module")


def test_a_tag_whose_stored_step_disagrees_with_its_name_is_refused(copies, capsys):
    """A tag renamed global_step99999 would be merged as the newest (exit 0 before); its
    meta.json or model states say step 8. Junk steps and sidecars end in one line."""
    tag = copies("moe_z2", "global_step99999")
    refused(capsys, tag, "global_step99999", "99999", "meta.json says step 8")
    tag = copies("moe_z2", "global_step99999")
    (tag / "meta.json").unlink()
    refused(capsys, tag, "global_step99999", "99999", "global_steps", "step 8")
    tag = copies("moe_z2", "global_step" + "9" * 240)  # int() of it works; a step it is not
    (tag / "meta.json").unlink()
    refused(capsys, tag, "240 digits")
    for text, words in (('{"step": "junk"}', ("meta.json", "'step' is 'junk'")),
                        ('{"step": 8.5}', ("meta.json", "'step' is 8.5")),
                        ('{"step": ' + "9" * 5000 + "}", ("meta.json", "not valid JSON")),
                        ("[8]", ("meta.json", "not a JSON object")),
                        ("[" * 100_000, ("meta.json", "not valid JSON")),
                        ('{"step": 8, "tokens": "many"}', ("meta.json", "'tokens' is 'many'"))):
        tag = copies("moe_z2")
        (tag / "meta.json").write_text(text)
        refused(capsys, tag, *words)
    tag = copies("moe_z2")
    edit(tag / MODEL, ["global_steps"], 7)
    refused(capsys, tag, "global_step8", "named for step 8", "global_steps", "step 7")


JUNK = [
    ("moe_z2", MODEL, ["module"], None),
    ("moe_z2", MODEL, ["ds_version"], 5),
    ("moe_z2", MODEL, ["ds_config"], "x"),
    ("moe_z2", MODEL, ["ds_config", "bf16"], [1]),
    ("moe_z2", MODEL, ["ds_autoep_layers"], [None]),
    ("moe_z2", MODEL, ["ds_autoep_layers", 0, "ep_size"], None),
    ("moe_z2", MODEL, ["ds_autoep_layers", 0, "expert_key_prefix"], "a\nb"),
    ("moe_z2", MODEL, ["ds_autoep_layers", 0, "moe_layer_id"], "0"),
    ("moe_z2", MODEL, ["buffer_names"], 5),
    ("moe_z2", MODEL, ["param_shapes"], {}),
    ("moe_z2", MODEL, ["param_shapes", 1], None),
    ("moe_z2", MODEL, ["global_steps"], 2 ** 100),
    ("moe_z2", OPTIM0, ["optimizer_state_dict"], None),
    ("moe_z2", OPTIM0, ["optimizer_state_dict", "zero_stage"], "2"),
    ("moe_z2", OPTIM0, FLATS, [None]),
    ("moe_z2", OPTIM0, SLICES, [None, None, None]),
    ("moe_z2", OPTIM0, SLICES + [0, Q_PROJ], (0, 4096)),
    ("moe_z3", OPTIM1, Z3_GROUPS, "x"),
    ("moe_z3", OPTIM1, Z3_GROUPS + [2], None),
    ("moe_z3", Z3_MODEL1, ["ds_autoep_layers", 0, "ep_rank"], -1),
    ("llama_z0", MODEL, ["module", EMBED], [1.0]),
]


@pytest.mark.parametrize("kind,file,keys,value", JUNK, ids=[
    f"{k}:{'.'.join(map(str, keys))}={v!r}"[:60] for k, _, keys, v in JUNK])
def test_junk_in_any_layout_key_ends_in_one_line(copies, capsys, kind, file, keys, value):
    """Wrong types, huge and negative numbers in the keys the layout is read from: one line
    naming the file and the key (tracebacks before: KeyError, TypeError, ValueError ...)."""
    tag = copies(kind)
    edit(tag / file, keys, value)
    key = str(keys[0]) if keys[0] != "optimizer_state_dict" or len(keys) == 1 else str(keys[1])
    refused(capsys, tag, file, key if kind != "llama_z0" else EMBED)
