"""Downstream benchmarks through lm-eval-harness: ``moe-merge eval MODEL --tasks T1,T2``.

The model is an HF directory (a merge output), or a checkpoint gathered first (as ``moe-merge
eval`` does for the validation loss); lm-eval's own HF model class (``HFLM``) scores it, in
fp32, on the CPU unless a GPU is there. ``--include-path DIR`` adds task YAMLs, as lm-eval's
CLI does. Nothing is downloaded here: the hub is off unless the environment says otherwise
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), so a standard benchmark needs its dataset in
the local cache; a local task (``dataset_path: json`` with ``data_files``) needs nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moe_merge.errors import MergeError


@dataclass(frozen=True)
class TaskOptions:
    limit: int | None = None  # documents per task (lm-eval's --limit)
    batch_size: int = 1
    include_path: str | None = None  # a directory of task YAMLs
    num_fewshot: int | None = None


_MANAGERS: dict = {}


def _task_manager(tasks: list[str], options: TaskOptions):
    """lm-eval's task index: of ``--include-path`` alone when it holds every task asked for
    (indexing lm-eval's thousands of bundled YAMLs takes ~10 s), else of both."""
    from lm_eval.tasks import TaskManager

    include = options.include_path
    if include is not None and not Path(include).is_dir():
        raise MergeError(f"--include-path: {include} is not a directory")
    if include is not None:
        if (include, False) not in _MANAGERS:
            _MANAGERS[include, False] = TaskManager(include_path=include, include_defaults=False)
        if set(tasks) <= set(_MANAGERS[include, False].all_tasks):
            return _MANAGERS[include, False]
    if (include, True) not in _MANAGERS:
        _MANAGERS[include, True] = TaskManager(include_path=include)
    return _MANAGERS[include, True]


def check_tasks(tasks: list[str], options: TaskOptions) -> None:
    """Every task known to lm-eval (with ``--include-path``), else a one-line error naming it."""
    known = set(_task_manager(tasks, options).all_tasks)
    for t in tasks:
        if t not in known:
            raise MergeError(f"--tasks: unknown task {t!r} (not an lm-eval task"
                             + ("" if options.include_path else "; local task YAMLs need "
                                "--include-path DIR") + ")")


def run_tasks(model_dir: Path, tasks: list[str], options: TaskOptions | None = None) -> dict:
    """lm-eval's scores of the HF model in ``model_dir``: ``{"scores": {task: {metric:
    value}}, "results": lm-eval's results section, "versions": ...}``."""
    options = options or TaskOptions()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError:
        raise MergeError("--tasks needs lm-eval-harness: pip install lm-eval==0.4.13") from None
    from moe_merge.checkpoint.names import check_no_remote_code

    check_no_remote_code(model_dir)
    check_tasks(tasks, options)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32",
                                "trust_remote_code": False},
        tasks=list(tasks), batch_size=options.batch_size, limit=options.limit,
        num_fewshot=options.num_fewshot, device=device, task_manager=_task_manager(tasks, options),
        log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0)
    results = out["results"]
    scores = {}
    for task, metrics in results.items():
        # "acc,none" (metric, filter) -> "acc"; stderr, aliases and sample counts left out
        scores[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                        if "," in k and isinstance(v, (int, float))
                        and not isinstance(v, bool) and "_stderr" not in k}
    return {"scores": scores, "results": json.loads(json.dumps(results, default=str)),
            "versions": json.loads(json.dumps(out.get("versions", {}), default=str))}


def render(model: str, scores: dict) -> str:
    lines = [f"{model}:", f"  {'task':<28} {'metric':<16} {'value':>10}"]
    for task, metrics in scores.items():
        for name, value in metrics.items():
            lines.append(f"  {task:<28} {name:<16} {value:>10.4f}")
    return "\n".join(lines)
