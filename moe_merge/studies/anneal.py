"""``moe-merge study anneal``: do merged constant-LR checkpoints predict annealing?

For each seed: train a WSD trunk at constant LR after warmup, saving a checkpoint every
``checkpoint.every_tokens``; at K fork points in the stable phase branch a real annealing run
(``train.fork_from``, LR decayed over ``study.decay_tokens``); then, on the trunk's fixed
validation batches, evaluate the latest checkpoint at each fork, the merges of the checkpoints
before it (SMA, WMA, EMA 0.1, EMA 0.2), the annealed branch's end, the merged models along each
branch (merge gain against LR), an ablation grid (interval V x window N x strategy) at the
earliest and the latest fork, and a second predictor: the annealing law of Tissue et al. fitted
to the trunk's curve plus one branch. Writes ``report.md``, ``results.json``, PNG plots and
TensorBoard scalars into the study directory. Runs are launched with the deepspeed launcher and
resumed if present, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from moe_merge.config.recipe import RecipeConfig, load_recipe
from moe_merge.errors import ConfigError
from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import weighted_sum

# the merges compared, by label
STRATEGIES = {"sma": Selection("sma"), "wma": Selection("wma"),
              "ema0.1": Selection("ema", alpha=0.1), "ema0.2": Selection("ema", alpha=0.2)}
# --quick: a model and run small enough for CI (a few minutes on 2 CPU cores).
QUICK = {
    "train": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
              "model.num_kv_heads=1", "model.head_dim=32", "model.moe_intermediate_size=64",
              "model.num_experts=4", "data.seq_len=64", "parallel.micro_batch=2",
              "parallel.global_batch=4", "schedule.warmup_tokens=512",
              "checkpoint.every_tokens=256", "train.max_tokens=4096", "logging.log_every=2",
              "logging.val_every=2", "logging.val_batches=2", "train.lr=3e-3"],
    "study": ["study.seeds=[1]", "study.forks=2", "study.decay_tokens=1024", "study.n=3",
              "study.interval=1", "study.grid_ns=[2,3]", "study.grid_intervals=[1,2]",
              "study.mechanism_batches=1"],
}


@dataclass
class AnnealStudyConfig:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds of the trunk runs (the headline table gives mean and spread over them)."""
    forks: int = 4
    """Fork points K, evenly spaced over the stable phase: from where the headline window first
    fits after warmup to decay_tokens before the end of the trunk."""
    fork_steps: list[int] = field(default_factory=list)
    """Explicit fork steps (checkpoint steps) instead of ``forks`` evenly spaced ones."""
    decay_tokens: float = 1.6384e5
    """Length D of each annealing branch."""
    decay_shape: str = "1-sqrt"
    """LR decay of the branches: 1-sqrt, cosine or linear."""
    n: int = 6
    """Headline window: checkpoints merged (N)."""
    interval: int = 2
    """Headline interval V in checkpoints (V = interval x checkpoint.every_tokens)."""
    grid_ns: list[int] = field(default_factory=lambda: [3, 6, 10, 15])
    """Ablation grid: windows N."""
    grid_intervals: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Ablation grid: intervals V, in checkpoints."""
    grid_seeds: int = 1
    """Run the ablation grid on the first k seeds."""
    branch_val_points: int = 8
    """Validation passes along each branch (the decayed part of the Tissue fit)."""
    mechanism_batches: int = 4
    """Validation micro-batches for the Hessian-vector-product analysis (``moe-merge analyze``)
    of the headline SMA window at the latest fork, around the merged weights and around the
    annealed branch's end (0: skip)."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval-harness tasks (``--tasks``) scored on the latest, the annealed and the merged
    models of every fork, beside their validation losses (empty: losses only)."""
    task_strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    """The merges scored on the tasks (of sma, wma, ema0.1, ema0.2)."""
    task_limit: Optional[int] = None
    """Documents per task (lm-eval's ``--limit``; none: all)."""
    task_include_path: Optional[str] = None
    """A directory of local task YAMLs (``--include-path``)."""
    task_num_fewshot: Optional[int] = None
    """Few-shot examples per document (none: the task's default)."""
    task_batch_size: int = 1


def load_study(path: str | Path, overrides: list[str] = (), quick: bool = False,
               schema: type = None, quick_overrides: dict | None = None, check=None
               ) -> tuple[RecipeConfig, object, str]:
    """The training recipe (validated), the study settings (``schema``, default the annealing
    study's), and the training recipe as YAML (the study file minus its ``study`` section,
    with the training overrides applied). ``quick_overrides`` and ``check`` go with ``schema``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if schema is None:
        schema, quick_overrides, check = AnnealStudyConfig, QUICK, _check
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    if quick:
        overrides = [*quick_overrides["train"], *quick_overrides["study"], *overrides]
    study_ov = [o for o in overrides if o.startswith("study.")]
    train_ov = [o for o in overrides if not o.startswith("study.")]
    raw = OmegaConf.load(path)
    study_raw = raw.pop("study", None) or {}
    try:
        st = OmegaConf.merge(OmegaConf.structured(schema), study_raw,
                             OmegaConf.from_dotlist([o[len("study."):] for o in study_ov]))
        st = OmegaConf.to_object(st)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{path}: study section: "
                          f"{f'key study.{key}: ' if key else ''}"
                          f"{str(e).splitlines()[0]}") from None
    cfg = load_recipe(path, train_ov, data=raw)
    check(cfg, st, path)
    from moe_merge.config.recipe import to_yaml

    return cfg, st, to_yaml(cfg)


def _check(cfg: RecipeConfig, st: AnnealStudyConfig, path: Path) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: key '{key}': {msg}")

    need(cfg.schedule.kind == "wsd" and cfg.schedule.decay_tokens == 0, "schedule.decay_tokens",
         "the trunk must be WSD with constant LR after warmup (decay_tokens: 0)")
    need(cfg.checkpoint.every_tokens > 0, "checkpoint.every_tokens",
         "the study merges checkpoints: set an interval")
    need(bool(st.seeds) and len(set(st.seeds)) == len(st.seeds), "study.seeds",
         "need one or more distinct seeds")
    need(st.forks >= 1, "study.forks", "must be >= 1")
    need(st.n >= 2 and st.interval >= 1, "study.n", "need n >= 2 and interval >= 1")
    need(st.decay_tokens >= cfg.tokens_per_step, "study.decay_tokens", "less than one step")
    need(st.decay_shape in ("1-sqrt", "cosine", "linear"), "study.decay_shape",
         "must be 1-sqrt, cosine or linear")
    need(all(v >= 1 for v in st.grid_intervals) and all(k >= 2 for k in st.grid_ns),
         "study.grid_ns", "grid windows need N >= 2 and intervals >= 1")
    decay = round(st.decay_tokens / cfg.tokens_per_step)
    need(_first_fork(cfg, st) + decay <= cfg.total_steps, "study.n",
         f"the headline window ({st.n} checkpoints every {st.interval}) plus one branch of "
         f"{decay} steps does not fit in the trunk's {cfg.total_steps} steps")
    for f in st.fork_steps:
        need(f % cfg.checkpoint_every_steps == 0 and 0 < f and f + decay <= cfg.total_steps,
             "study.fork_steps", f"{f} is not a checkpoint step with {decay} steps of trunk "
             "after it")
    bad = [k for k in st.task_strategies if k not in STRATEGIES]
    need(not bad, "study.task_strategies", f"unknown {bad}; choose from {list(STRATEGIES)}")
    if st.tasks:  # an unknown task or a missing lm-eval fails here, before any training
        from moe_merge.evals.downstream import check_tasks

        check_tasks(list(st.tasks), task_options(st))


def task_options(st: AnnealStudyConfig):
    from moe_merge.evals.downstream import TaskOptions

    return TaskOptions(limit=st.task_limit, batch_size=st.task_batch_size,
                       include_path=st.task_include_path, num_fewshot=st.task_num_fewshot)


def _first_fork(cfg: RecipeConfig, st: AnnealStudyConfig) -> int:
    every = cfg.checkpoint_every_steps
    warm = round(cfg.schedule.warmup_tokens / cfg.tokens_per_step)
    return -(-max(warm, every) // every) * every + (st.n - 1) * st.interval * every


def fork_steps(cfg: RecipeConfig, st: AnnealStudyConfig) -> list[int]:
    """K checkpoint steps through the stable phase: the first where the headline window fits
    without reaching into warmup, the last one branch length (decay_tokens) before the end of
    the trunk, so that every branch is compared with the trunk at the same step."""
    if st.fork_steps:
        return sorted(st.fork_steps)
    every = cfg.checkpoint_every_steps
    first = _first_fork(cfg, st)
    last = (cfg.total_steps - round(st.decay_tokens / cfg.tokens_per_step)) // every * every
    if st.forks == 1 or first >= last:
        return [last]
    return sorted({int(round((first + (last - first) * i / (st.forks - 1)) / every)) * every
                   for i in range(st.forks)})


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    if len(x) != len(y) or len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


class Evaluator:
    """Loss of in-memory HF state dicts on the trunk's fixed validation batches."""

    def __init__(self, cfg: RecipeConfig, hf_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from moe_merge.checkpoint.names import auto_config
        from moe_merge.evals.loss import eval_windows

        self.torch = torch
        self.hf_dir = hf_dir
        self.windows = eval_windows(cfg)
        self.micro_batch = cfg.parallel.micro_batch
        self.model = AutoModelForCausalLM.from_config(auto_config(hf_dir), dtype=torch.float32,
                                                      trust_remote_code=False)
        self.states: dict[tuple[str, int], dict] = {}
        self.evals = 0

    def state(self, run: Path, step: int) -> dict:
        key = (str(run), step)
        if key not in self.states:
            from moe_merge.merge.merger import hf_state

            self.states[key] = hf_state(run / "checkpoints" / f"global_step{step}", self.hf_dir)
        return self.states[key]

    def merged(self, parts: list[tuple[Path, int]], weights: list[float]) -> dict:
        states = [self.state(r, s) for r, s in parts]
        return {name: self.torch.from_numpy(weighted_sum([sd[name] for sd in states],
                                                         weights)).float()
                for name in states[0]}

    def loss(self, state: dict) -> float:
        from moe_merge.evals.loss import loss_on

        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(m for m in missing if not m.endswith("lm_head.weight")):
            raise RuntimeError(f"state dict does not fit the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        self.evals += 1
        return loss_on(self.model, self.windows, self.micro_batch)[0]


class Downstream:
    """lm-eval-harness scores of in-memory HF state dicts (``study.tasks``). Each state is
    written as a merge output would be (safetensors + the run's HF config and tokenizer) into
    a temporary directory and scored there; the scores are kept in ``cache`` (a JSON file in
    the seed's directory) under the models' checkpoints, weights and task options, so a
    re-run scores nothing twice."""

    def __init__(self, st: AnnealStudyConfig, hf_dir: Path, cache: Path):
        self.tasks, self.options = list(st.tasks), task_options(st)
        self.hf_dir, self.cache = hf_dir, cache
        self.seen = json.loads(cache.read_text()) if cache.is_file() else {}
        self.scored = 0

    def scores(self, parts: list[tuple[Path, int]], weights: list[float], state) -> dict:
        """``state``: a callable giving the state dict, called only when not cached."""
        key = json.dumps({"parts": [[r.name, s] for r, s in parts],
                          "weights": [round(w, 12) for w in weights], "tasks": self.tasks,
                          "options": asdict(self.options)}, sort_keys=True)
        if key not in self.seen:
            import tempfile

            import torch
            from safetensors.torch import save_file

            from moe_merge.evals.downstream import run_tasks
            from moe_merge.merge.hf_files import copy_files, plan_copy
            from moe_merge.merge.writer import atomic_file

            with tempfile.TemporaryDirectory(dir=self.cache.parent,
                                             prefix=".downstream-") as tmp:
                copy_files(plan_copy(self.hf_dir), Path(tmp))
                save_file({k: torch.as_tensor(v).contiguous() for k, v in state().items()},
                          str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
                self.seen[key] = run_tasks(Path(tmp), self.tasks, self.options)["scores"]
            self.scored += 1
            with atomic_file(self.cache) as f:
                f.write((json.dumps(self.seen, indent=1) + "\n").encode())
        return self.seen[key]


def _metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def _val_curve(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["val/loss"]) for m in _metrics(run) if "val/loss" in m]


def _steps(run: Path) -> list[int]:
    """Steps of the run's checkpoints, oldest first."""
    from moe_merge.training.run_dir import list_tags

    return [step for step, _ in list_tags(run / "checkpoints")]


class StudyBase:
    """A study directory: the training recipe it runs (train_recipe.yaml, fixed for the
    directory), study.json, and the runs it launches (reused when already complete)."""

    def __init__(self, recipe: str | Path, overrides: list[str], out: Path, quick: bool,
                 echo, **load):
        self.cfg, self.st, train_yaml = load_study(recipe, overrides, quick, **load)
        self.out = Path(out)
        self.echo = echo
        self.out.mkdir(parents=True, exist_ok=True)
        self.recipe = self.out / "train_recipe.yaml"
        if self.recipe.exists() and self.recipe.read_text() != train_yaml:
            # the same recipe, written before keys with default values were added, still is
            try:
                from moe_merge.config.recipe import to_yaml

                same = to_yaml(load_recipe(self.recipe)) == train_yaml
            except ConfigError:
                same = False
            if not same:
                raise ConfigError(f"{self.recipe}: the study directory holds a study of another "
                                  "recipe; choose another --out or delete it")
        self.recipe.write_text(train_yaml)
        (self.out / "study.json").write_text(json.dumps(
            {"recipe": str(recipe), "overrides": overrides, "quick": quick,
             "study": asdict(self.st)}, indent=1) + "\n")
        self.tps = self.cfg.tokens_per_step
        self.every = self.cfg.checkpoint_every_steps
        self.warmup_steps = round(self.cfg.schedule.warmup_tokens / self.tps)
        self.trained = self.reused = 0
        self.train_seconds = 0.0

    def _train(self, name: str, seed: int, extra: list[str], end: int,
               root: Path | None = None, ok_codes: tuple[int, ...] = (0,)) -> Path:
        """Train (or resume) one run under ``root`` (default seed<seed>/); a run whose final
        checkpoint exists, or that ended with an accepted non-zero exit (``ok_codes``; recorded
        in its exit.json), is reused as is."""
        from moe_merge.training import launch

        run_root = root or self.out / f"seed{seed}"
        run = run_root / name
        if (run / "checkpoints" / f"global_step{end}" / "meta.json").is_file() or \
                (run / "exit.json").is_file():
            self.echo(f"  seed {seed}: {name} done before, reused")
            self.reused += 1
            return run
        t, code = launch.train(self.recipe, [f"name={name}", f"output_dir={run_root}",
                                                f"seed={seed}", "logging.progress=false",
                                                "train.resume=auto", *extra],
                                  run_root / "logs" / f"{name}.log", self.cfg.parallel.world_size,
                                  ok_codes=ok_codes)
        if code != 0:
            (run / "exit.json").write_text(json.dumps({"exit": code}) + "\n")
        self.echo(f"  seed {seed}: {name} trained ({t:.0f} s{f', exit {code}' if code else ''})")
        self.trained += 1
        self.train_seconds += t
        return run


class AnnealStudy(StudyBase):
    def __init__(self, recipe: str | Path, overrides: list[str], out: Path, quick: bool = False,
                 echo=print):
        super().__init__(recipe, overrides, out, quick, echo)
        self.forks = fork_steps(self.cfg, self.st)
        self.decay_steps = round(self.st.decay_tokens / self.tps)
        # the headline window: every interval-th checkpoint back from the newest, at most n
        self.window = Selection(every=self.st.interval, last=self.st.n)

    def _branch_overrides(self, trunk: Path, fork: int) -> list[str]:
        end = fork + self.decay_steps
        val_every = max(1, self.decay_steps // max(self.st.branch_val_points, 1))
        return [f"train.fork_from={trunk / 'checkpoints' / f'global_step{fork}'}",
                f"train.max_tokens={end * self.tps}",
                f"schedule.decay_tokens={self.decay_steps * self.tps}",
                f"schedule.decay_shape={self.st.decay_shape}", f"logging.val_every={val_every}"]

    def _lrs(self, fork: int | None = None) -> list[float]:
        """The LR of every step of the trunk, or of the branch forked at step ``fork`` (the
        schedule its ``_branch_overrides`` give it: the trunk's, decayed from ``fork``)."""
        from moe_merge.training.schedule import Schedule

        sched = Schedule.from_recipe(self.cfg)
        if fork is not None:
            sched = dataclasses.replace(sched, total_steps=fork + self.decay_steps,
                                        decay_steps=self.decay_steps,
                                        decay_shape=self.st.decay_shape)
        return [sched.lr_at(s) for s in range(sched.total_steps)]

    # ---- one seed ---------------------------------------------------------------------------
    def run_seed(self, seed: int, grid: bool) -> dict:
        trunk = self._train("trunk", seed, [], self.cfg.total_steps)
        branches = {f: self._train(f"anneal_{f}", seed, self._branch_overrides(trunk, f),
                                   f + self.decay_steps) for f in self.forks}
        ev = Evaluator(self.cfg, trunk / "hf")
        t0 = time.perf_counter()
        trunk_steps = _steps(trunk)
        trunk_lrs = self._lrs()
        res = {"seed": seed, "forks": [], "grid": [], "gain_vs_lr": []}
        down = (Downstream(self.st, trunk / "hf", self.out / f"seed{seed}" / "downstream.json")
                if self.st.tasks else None)
        for f in self.forks:
            b = branches[f]
            b_steps = _steps(b)
            end = b_steps[-1]  # the branch's end: compared with the trunk at the same step
            chosen = self.window.choose([s for s in trunk_steps if s <= end], allow_fewer=True)
            last = ev.loss(ev.state(trunk, end))
            annealed = ev.loss(ev.state(b, end))
            row = {"fork_step": f, "fork_tokens": f * self.tps, "step": end,
                   "tokens": end * self.tps, "window": chosen, "latest_at_fork":
                   ev.loss(ev.state(trunk, f)), "latest": last, "annealed": annealed,
                   "annealed_step": end, "merged": {}, "captured": {}, "abs_error": {}}
            for label, sel in STRATEGIES.items():
                loss = ev.loss(ev.merged([(trunk, s) for s in chosen],
                                         sel.weights_for(len(chosen))))
                row["merged"][label] = loss
                gain = last - annealed
                row["captured"][label] = (last - loss) / gain if gain > 0 else None
                row["abs_error"][label] = abs(loss - annealed)
            if down is not None:
                row["downstream"] = self._downstream(down, ev, trunk, b, chosen, end)
            res["forks"].append(row)
            # merge gain along the branch: windows over trunk + branch checkpoints
            b_lrs = self._lrs(f)
            for c in [s for s in b_steps if s > f]:
                pool = [(trunk, s) for s in trunk_steps if s <= f] + [(b, s) for s in b_steps
                                                                      if f < s <= c]
                steps = [s for _, s in pool]
                pick = self.window.choose(steps, allow_fewer=True)
                parts = [p for p in pool if p[1] in pick]
                merged = ev.loss(ev.merged(parts, STRATEGIES["sma"].weights_for(len(parts))))
                latest = ev.loss(ev.state(b, c))
                res["gain_vs_lr"].append({"fork_step": f, "step": c, "lr": b_lrs[c - 1],
                                          "latest": latest, "merged_sma": merged,
                                          "gain": latest - merged})
        if self.st.mechanism_batches > 0:
            res["mechanism"] = self._mechanism(ev, trunk, branches, res["forks"][-1])
        if grid:  # windows ending at the earliest and the latest comparison step
            for f in sorted({r["step"] for r in (res["forks"][0], res["forks"][-1])}):
                avail = [s for s in trunk_steps if s <= f]
                for v in self.st.grid_intervals:
                    for n in self.st.grid_ns:
                        pick = Selection(every=v, last=n).choose(avail, allow_fewer=True)
                        cell = {"fork_step": f, "interval": v, "n": n, "fits": len(pick) == n,
                                "reaches_warmup": bool(pick) and pick[0] <= self.warmup_steps,
                                "latest": None, "merged": {}}
                        if len(pick) == n:
                            cell["latest"] = ev.loss(ev.state(trunk, f))
                            for label, sel in STRATEGIES.items():
                                cell["merged"][label] = ev.loss(
                                    ev.merged([(trunk, s) for s in pick], sel.weights_for(n)))
                        res["grid"].append(cell)
        res["tissue"] = self._tissue(trunk, branches, trunk_lrs, res)
        pairs = [(row["merged"][k], row["annealed"]) for row in res["forks"] for k in STRATEGIES]
        res["spearman_all"] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        res["spearman_sma_forks"] = spearman([r["merged"]["sma"] for r in res["forks"]],
                                             [r["annealed"] for r in res["forks"]])
        res["trunk_val"] = _val_curve(trunk)
        res["branch_val"] = {str(f): _val_curve(b) for f, b in branches.items()}
        res["eval_seconds"] = time.perf_counter() - t0
        res["evaluations"] = ev.evals
        if down is not None:
            res["downstream_scored"] = down.scored
        self.echo(f"  seed {seed}: {ev.evals} evaluations in {res['eval_seconds']:.0f} s")
        return res

    def _downstream(self, down: Downstream, ev: Evaluator, trunk: Path, branch: Path,
                    chosen: list[int], end: int) -> dict:
        """Task scores of the latest checkpoint, the annealed branch's end and the merges of
        ``chosen`` (``study.task_strategies``), as ``{model: {task: {metric: value}}}``."""
        out = {"latest": down.scores([(trunk, end)], [1.0], lambda: ev.state(trunk, end)),
               "annealed": down.scores([(branch, end)], [1.0], lambda: ev.state(branch, end))}
        parts = [(trunk, s) for s in chosen]
        for label in self.st.task_strategies:
            w = STRATEGIES[label].weights_for(len(chosen))
            out[f"merged_{label}"] = down.scores(parts, w, lambda w=w: ev.merged(parts, w))
        return out

    def _mechanism(self, ev: Evaluator, trunk: Path, branches: dict[int, Path], row: dict
                   ) -> dict:
        """The second-order terms of the headline SMA window at the latest fork: around the
        merged weights, and around the annealed branch's end (a stand-in for the optimum θ*
        of the paper's derivation)."""
        from moe_merge.evals.analyze import hvp_model, lm_loss_sum, micro_batches, second_order

        t0 = time.perf_counter()
        chosen = row["window"]
        w = STRATEGIES["sma"].weights_for(len(chosen))
        batches = micro_batches(ev.windows, ev.micro_batch, self.st.mechanism_batches)
        model = hvp_model(ev.hf_dir)
        pts = [ev.state(trunk, s) for s in chosen]
        out = {"step": row["step"], "window": chosen, "batches": len(batches)}
        for label, ref in (("around_merged", None),
                           ("around_annealed", ev.state(branches[row["fork_step"]],
                                                         row["annealed_step"]))):
            out[label] = second_order(model, pts, w, batches, lm_loss_sum,
                                      reference=ref).to_dict()
        out["seconds"] = time.perf_counter() - t0
        return out

    def _tissue(self, trunk: Path, branches: dict[int, Path], trunk_lrs: list[float],
                res: dict) -> dict:
        """Fit the law on the constant-LR part of the trunk's curve (after warmup) plus the
        earliest branch, and predict the end of every branch."""
        from moe_merge.evals.scaling import fit, predict

        fit_fork = self.forks[0]
        stable = [(s, v) for s, v in _val_curve(trunk) if s > self.warmup_steps]
        curves = [(trunk_lrs, [s - 1 for s, _ in stable], [v for _, v in stable])]
        b_curve = [(s, v) for s, v in _val_curve(branches[fit_fork]) if s > fit_fork]
        fit_lrs = self._lrs(fit_fork)
        curves.append((fit_lrs, [s - 1 for s, _ in b_curve], [v for _, v in b_curve]))
        try:
            params = fit(curves)
        except ValueError as e:
            return {"error": str(e)}
        preds = {}
        for row in res["forks"]:
            f = row["fork_step"]
            lrs = self._lrs(f)
            p = float(predict(params, lrs, [row["annealed_step"] - 1])[0])
            row["tissue"] = p
            row["tissue_abs_error"] = abs(p - row["annealed"])
            preds[str(f)] = p
        return {"params": params.to_dict(), "fit_branch": fit_fork, "predictions": preds}

    # ---- all seeds --------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        self.echo(f"study anneal -> {self.out}: seeds {self.st.seeds}, forks at steps "
                  f"{self.forks} (tokens {[f * self.tps for f in self.forks]}), branches of "
                  f"{self.decay_steps} steps ({self.st.decay_shape})")
        seeds = [self.run_seed(s, i < self.st.grid_seeds) for i, s in enumerate(self.st.seeds)]
        results = {"study": asdict(self.st), "recipe": str(self.recipe),
                   "tokens_per_step": self.tps, "checkpoint_every_steps": self.every,
                   "fork_steps": self.forks, "seeds": seeds, "summary": summarize(seeds),
                   "wall_seconds": None}
        results["wall_seconds"] = time.perf_counter() - t0
        results["runs_trained"], results["runs_reused"] = self.trained, self.reused
        results["train_seconds"] = self.train_seconds
        from moe_merge.studies.anneal_report import write_report

        write_report(self.out, results)
        return results


def summarize(seeds: list[dict]) -> dict:
    """Mean and spread over seeds of the headline numbers."""
    out: dict = {"captured": {}, "captured_pooled": {}, "abs_error": {}, "beats_latest": {}}
    for k in STRATEGIES:
        # per seed, the merge gain summed over the fork points over the annealing gain summed
        # likewise: stable where single forks have an annealing gain near 0 (noisy ratios)
        pooled = []
        for s in seeds:
            ann = sum(r["latest"] - r["annealed"] for r in s["forks"])
            if ann > 0:
                pooled.append(sum(r["latest"] - r["merged"][k] for r in s["forks"]) / ann)
        out["captured_pooled"][k] = mean_std(pooled)
        out["captured"][k] = mean_std([r["captured"][k] for s in seeds for r in s["forks"]
                                       if r["captured"][k] is not None])
        out["abs_error"][k] = mean_std([r["abs_error"][k] for s in seeds for r in s["forks"]])
        rows = [r for s in seeds for r in s["forks"]]
        out["beats_latest"][k] = {"count": sum(r["merged"][k] < r["latest"] for r in rows),
                                  "of": len(rows)}
    out["tissue_abs_error"] = mean_std([r.get("tissue_abs_error") for s in seeds
                                        for r in s["forks"]])
    out["annealing_gain"] = mean_std([r["latest"] - r["annealed"] for s in seeds
                                      for r in s["forks"]])
    mech = [s["mechanism"] for s in seeds if s.get("mechanism")]
    if mech:
        out["mechanism"] = {
            ref: {"negative_fraction": mean_std([m[ref]["cross_terms"]["negative_fraction"]
                                                 for m in mech]),
                  "measured_gain": mean_std([m[ref]["gain"]["measured"] for m in mech]),
                  "predicted_gain": mean_std([m[ref]["gain"]["predicted"] for m in mech]),
                  "measured_gain_vs_latest": mean_std([m[ref]["gain_vs_latest"]["measured"]
                                                       for m in mech]),
                  "predicted_gain_vs_latest": mean_std([m[ref]["gain_vs_latest"]["predicted"]
                                                        for m in mech]),
                  "paper_condition_holds": sum(m[ref]["cross_terms"]["merging_helps"]
                                               for m in mech), "of": len(mech)}
            for ref in ("around_merged", "around_annealed")}
    out["spearman_all"] = mean_std([s["spearman_all"] for s in seeds])
    out["spearman_sma_forks"] = mean_std([s["spearman_sma_forks"] for s in seeds])
    per_fork = {}
    for i, f in enumerate(seeds[0]["forks"]):
        rows = [s["forks"][i] for s in seeds]
        per_fork[str(f["fork_step"])] = {
            "step": f["step"],
            "latest": mean_std([r["latest"] for r in rows]),
            "annealed": mean_std([r["annealed"] for r in rows]),
            "tissue": mean_std([r.get("tissue") for r in rows]),
            **{f"merged_{k}": mean_std([r["merged"][k] for r in rows]) for k in STRATEGIES},
            **{f"captured_{k}": mean_std([r["captured"][k] for r in rows
                                          if r["captured"][k] is not None]) for k in STRATEGIES},
        }
    out["per_fork"] = per_fork
    rows = [r["downstream"] for s in seeds for r in s["forks"] if r.get("downstream")]
    if rows:  # {model: {task: {metric: mean ± std over forks and seeds}}}
        out["downstream"] = {
            model: {task: {m: mean_std([r[model][task][m] for r in rows
                                        if m in r.get(model, {}).get(task, {})])
                           for m in metrics}
                    for task, metrics in rows[0][model].items()}
            for model in rows[0]}
    return out
