"""A local lm-eval-harness task (task YAML + local JSONL: no hub) and a hand computation of
its scores with transformers, for the tests of ``--tasks``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
