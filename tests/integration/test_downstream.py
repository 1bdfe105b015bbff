"""``moe-merge eval --tasks``: lm-eval-harness on a merge output and on a checkpoint, with a
local task (task YAML + local JSONL: no hub), its scores checked against a hand computation of
the same log-likelihoods with transformers; an unknown task is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from support.merging import cli

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "Rome"], 0),
    ("Two plus two is", ["three", "four"], 1),
    ("The sky is", ["blue", "green", "loud"], 0),
    ("Water is", ["dry", "wet"], 1),
    ("A cat says", ["meow", "moo", "quack"], 0),
    ("The sun rises in the", ["east", "west"], 0),
    ("Ice is", ["cold", "hot"], 0),
    ("A week has seven", ["days", "years", "rivers"], 0),
]


def write_task(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    data = where / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (where / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return where


def by_hand(model_dir: Path) -> dict[str, float]:
    """acc and acc_norm as lm-eval defines them for a multiple-choice task: the summed
    log-likelihood of " " + choice after the question (the continuation's tokens are those
    the whole string adds to the question's), argmax; acc_norm divides by the choice's length
    in characters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc = norm = 0
    for question, choices, answer in QUESTIONS:
        lls = []
        for c in choices:
            ctx = tok(question, add_special_tokens=False).input_ids
            whole = tok(question + " " + c, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        acc += max(range(len(choices)), key=lambda i: lls[i]) == answer
        norm += max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == answer
    return {"acc": acc / len(QUESTIONS), "acc_norm": norm / len(QUESTIONS)}


def test_lm_eval_scores_a_merge_and_a_checkpoint_as_computed_by_hand(trained, tmp_path):
    run = trained("moe_z2")
    tasks = write_task(tmp_path / "tasks")
    merged = tmp_path / "m"
    assert cli("merge", run, "--last", "3", "--out", merged, "--quiet").returncode == 0
    results = tmp_path / "r.json"
    proc = cli("eval", merged, "--tasks", "tiny_mc", "--include-path", tasks,
               "--results", results, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(results.read_text())
    want = by_hand(merged)
    assert got["scores"]["tiny_mc"] == want
    assert "tiny_mc" in proc.stdout and f"{want['acc']:.4f}" in proc.stdout

    # a checkpoint is gathered first: the run's newest tag, scored as its HF gather
    latest = tmp_path / "latest"
    assert cli("merge", run, "--last", "1", "--out", latest, "--quiet").returncode == 0
    proc = cli("eval", run, "--tasks", "tiny_mc", "--include-path", tasks, "--results",
               tmp_path / "r2.json", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["tiny_mc"] == by_hand(latest)


def test_an_unknown_task_is_one_line_naming_it(trained, tmp_path):
    proc = cli("eval", trained("moe_z2"), "--tasks", "no_such_task_here", "--results",
               tmp_path / "r.json")
    assert proc.returncode == 2 and not (tmp_path / "r.json").exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown task 'no_such_task_here'" in line and "--include-path" in line
