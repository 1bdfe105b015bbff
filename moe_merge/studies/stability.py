"""``moe-merge study pma-init`` and ``moe-merge study spike``: warmup stability with controls.

pma-init: for each seed, train the recipe (a constant-LR stable-phase run), then continue
training (CT: warmup + cosine) at each of 2-3 peak LRs from (a) the run's latest checkpoint and
(b) the merge of its last N checkpoints (PMA-init, ``train.init_from``), with the same optimizer
policy, data and schedule, so the arms differ only in their initial weights. Compared: the
gradient norm during the re-warmup (max, standard deviation), loss spikes (the trainer's
detector, in ``continue`` mode), validation loss at the start, over time and at the end.

spike: for each seed, train the recipe (a deliberately too-high LR) once per arm of
``stability.on_spike``: continue (the detector only logs), rollback (reload the newest
pre-spike checkpoint) and pma (reload the merge of the last N pre-spike checkpoints). Compared:
recovery rate, executed steps from the first spike until the run is past it and back on trend,
recoveries, final validation loss.

Both write report.md, results.json, PNG plots and TensorBoard scalars into the study directory;
runs are launched with the deepspeed launcher and reused when complete, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moe_merge.config.recipe import RecipeConfig
from moe_merge.errors import ConfigError
from moe_merge.merge.selection import Selection
from moe_merge.merge.strategies import STRATEGIES
from moe_merge.studies.anneal import StudyBase, _metrics, mean_std

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=1", "model.head_dim=32", "model.moe_intermediate_size=64",
        "model.num_experts=4", "data.seq_len=64", "parallel.micro_batch=2",
        "parallel.global_batch=4", "logging.val_batches=2"]
PMA_INIT_QUICK = {
    "train": [*TINY, "schedule.warmup_tokens=512", "checkpoint.every_tokens=512",
              "train.max_tokens=4096", "logging.val_every=4"],
    "study": ["study.seeds=[1]", "study.ct_lrs=[3e-3,6e-3]", "study.ct_tokens=2048",
              "study.ct_warmup_tokens=1024", "study.n=3", "study.val_points=4",
              "study.spike_min_steps=2"],
}
SPIKE_QUICK = {
    "train": [*TINY, "schedule.warmup_tokens=512", "checkpoint.every_tokens=512",
              "train.max_tokens=4096", "logging.val_every=4", "stability.min_steps=4",
              "stability.inject_nan_step=11"],
    "study": ["study.seeds=[1]"],
}
ARMS = ("continue", "rollback", "rollback+skip", "pma")


def arm_overrides(arm: str, skip: int) -> list[str]:
    """The training overrides of a spike-study arm: a value of stability.on_spike, "+skip"
    adding stability.skip_batches (new data after each reload)."""
    action, _, plus = arm.partition("+")
    return [f"stability.on_spike={action}", f"stability.skip_batches={skip if plus else 0}"]


# ---- reading a run -----------------------------------------------------------------------------
def read_run(run: Path) -> dict:
    """The run's metrics.jsonl as curves: ``executed`` (step, loss, grad norm) in the order the
    steps ran (replays after a recovery included), ``steps`` the kept trajectory (the last value
    of each step), the validation curve, and the stability events."""
    records = _metrics(run)
    # executed steps in order: logged steps, and spike steps a reload dropped unlogged
    executed, spike_at, pending = [], [], None
    for i, r in enumerate(records):
        if "train/loss" in r:
            if pending == r["step"]:  # a spike step that training kept (continue)
                spike_at.append(len(executed))
                pending = None
            executed.append((r["step"], r["train/loss"], r.get("train/grad_norm", float("nan"))))
        elif r.get("event") == "spike":
            if i + 1 < len(records) and records[i + 1].get("event") in ("recovery", "gave_up"):
                spike_at.append(len(executed))
                executed.append((r["step"], r["loss"], r["grad_norm"]))
            else:
                pending = r["step"]
    kept: dict[int, tuple[float, float]] = {}
    for r in records:  # the kept trajectory: the last logged value of each step
        if "train/loss" in r:
            kept[r["step"]] = (r["train/loss"], r.get("train/grad_norm", float("nan")))
    val: dict[int, float] = {}
    for r in records:
        if "val/loss" in r:
            val[r["step"]] = r["val/loss"]
    events = [r for r in records if "event" in r]
    exit_file = run / "exit.json"
    return {"executed": executed, "spike_at": spike_at,
            "steps": sorted((s, v[0], v[1]) for s, v in kept.items()),
            "val": sorted(val.items()), "events": events,
            "exit": json.loads(exit_file.read_text())["exit"] if exit_file.exists() else 0}


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


# ---- pma-init ---------------------------------------------------------------------------------
@dataclass
class PMAInitStudyConfig:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds of the stable-phase runs (the CT data order uses seed + ct_seed_offset)."""
    ct_lrs: list[float] = field(default_factory=lambda: [3e-3, 6e-3])
    """Peak LRs of the continued training (2-3 of them)."""
    ct_tokens: float = 1.536e5
    """Length of each CT run."""
    ct_warmup_tokens: float = 3.072e4
    """Linear re-warmup of each CT run (then cosine to ct_min_lr_ratio x peak)."""
    ct_min_lr_ratio: float = 0.1
    """CT's final LR as a fraction of its peak."""
    ct_seed_offset: int = 100
    """CT runs see other data than the start of the stable-phase run."""
    n: int = 6
    """PMA-init: the last n checkpoints of the stable-phase run, ..."""
    interval: int = 1
    """... every interval-th one."""
    strategy: str = "sma"
    """sma, wma or ema."""
    alpha: float = 0.2
    """EMA coefficient."""
    optimizer: str = "reset"
    """Adam state of both arms: reset (a fresh optimizer) or latest (the stable-phase run's
    latest moments); the arms then differ only in their initial weights."""
    val_points: int = 15
    """Validation passes over each CT run."""
    spike_min_steps: int = 10
    """Steps of history before the spike detector may fire in the CT runs."""


def _check_pma_init(cfg: RecipeConfig, st: PMAInitStudyConfig, path: Path) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: key '{key}': {msg}")

    need(cfg.checkpoint.every_tokens > 0, "checkpoint.every_tokens",
         "PMA-init merges the run's checkpoints: set an interval")
    need(bool(st.seeds) and len(set(st.seeds)) == len(st.seeds), "study.seeds",
         "need one or more distinct seeds")
    need(bool(st.ct_lrs) and all(lr > 0 for lr in st.ct_lrs), "study.ct_lrs",
         "need one or more positive peak LRs")
    need(st.optimizer in ("reset", "latest"), "study.optimizer",
         f"'{st.optimizer}' is not reset or latest (a plain checkpoint has no merged moments)")
    need(st.strategy in STRATEGIES, "study.strategy", f"must be one of {', '.join(STRATEGIES)}")
    need(st.n >= 2 and st.interval >= 1, "study.n", "need n >= 2 and interval >= 1")
    need((st.n - 1) * st.interval + 1 <= cfg.total_steps // cfg.checkpoint_every_steps,
         "study.n", f"the run saves {cfg.total_steps // cfg.checkpoint_every_steps} checkpoints, "
         f"fewer than the window of {st.n} every {st.interval}")
    tps = cfg.tokens_per_step
    need(st.ct_tokens >= 2 * tps, "study.ct_tokens", "less than two steps")
    need(0 <= st.ct_warmup_tokens < st.ct_tokens, "study.ct_warmup_tokens",
         "must be shorter than study.ct_tokens")
    need(0 <= st.ct_min_lr_ratio <= 1, "study.ct_min_lr_ratio", "must be in [0, 1]")
    need(st.val_points >= 1, "study.val_points", "must be >= 1")


def ct_metrics(rec: dict, warmup_steps: int) -> dict:
    """The comparison numbers of one CT run."""
    steps = rec["steps"]
    warm = [gn for s, _, gn in steps if 1 <= s <= max(warmup_steps, 1)]
    early = [gn for s, _, gn in steps if 1 <= s <= max(warmup_steps // 2, 1)]
    gns = [gn for _, _, gn in steps]
    val = rec["val"]
    spikes = [e for e in rec["events"] if e["event"] == "spike"]
    return {
        "val_start": val[0][1] if val and val[0][0] == 0 else None,
        "val_final": val[-1][1] if val else None,
        "val_mean": sum(v for _, v in val) / len(val) if val else None,
        "val_max": max(v for _, v in val) if val else None,
        "early_grad_norm_mean": sum(early) / len(early) if early else None,
        "warmup_grad_norm_max": max(warm) if warm else None,
        "warmup_grad_norm_std": mean_std(warm)["std"],
        "warmup_loss_mean": (sum(loss for s, loss, _ in steps if s <= warmup_steps)
                             / max(1, sum(1 for s, _, _ in steps if s <= warmup_steps))),
        "grad_norm_max": max(gns) if gns else None,
        "grad_norm_std": mean_std(gns)["std"],
        "spikes": len(spikes),
        "spike_steps": [e["step"] for e in spikes],
    }


PMA_INIT_METRICS = ("val_start", "val_final", "val_mean", "val_max", "early_grad_norm_mean",
                    "warmup_grad_norm_max",
                    "warmup_grad_norm_std", "warmup_loss_mean", "grad_norm_max", "grad_norm_std",
                    "spikes")


class _StabilityStudy(StudyBase):
    kind = ""

    def _report(self, t0: float, seeds: list[dict], summary: dict, **extra) -> dict:
        """results.json, report.md, plots and TensorBoard of the finished study."""
        from moe_merge.studies.stability_report import write_report

        results = {"kind": self.kind, "study": asdict(self.st), "recipe": str(self.recipe),
                   "tokens_per_step": self.tps, **extra, "seeds": seeds, "summary": summary,
                   "runs_trained": self.trained, "runs_reused": self.reused,
                   "train_seconds": self.train_seconds,
                   "wall_seconds": time.perf_counter() - t0}
        write_report(self.out, results)
        return results


class PMAInitStudy(_StabilityStudy):
    kind = "pma-init"
    LOAD = {"schema": PMAInitStudyConfig, "quick_overrides": PMA_INIT_QUICK,
            "check": _check_pma_init}  # load_study(path, **LOAD)

    def __init__(self, recipe, overrides, out, quick=False, echo=print):
        super().__init__(recipe, overrides, out, quick, echo, **self.LOAD)
        self.ct_steps = round(self.st.ct_tokens / self.tps)
        self.ct_warmup = round(self.st.ct_warmup_tokens / self.tps)

    def _ct_overrides(self, src: Path, lr: float) -> list[str]:
        st = self.st
        return [f"train.init_from={src}", f"train.init_optimizer={st.optimizer}",
                "schedule.kind=cosine", f"schedule.warmup_tokens={self.ct_warmup * self.tps}",
                "schedule.decay_tokens=0", f"schedule.min_lr_ratio={st.ct_min_lr_ratio}",
                f"train.lr={lr}", f"train.max_tokens={self.ct_steps * self.tps}",
                "checkpoint.every_tokens=0", "logging.log_every=1",
                f"logging.val_every={max(1, self.ct_steps // st.val_points)}",
                "stability.on_spike=continue", f"stability.min_steps={st.spike_min_steps}",
                "pma_monitor.enabled=false"]

    def run_seed(self, seed: int) -> dict:
        from moe_merge.merge.merger import OutputOptions, merge
        from moe_merge.training.run_dir import list_tags

        st = self.st
        root = self.out / f"seed{seed}"
        base = self._train("base", seed, [], self.cfg.total_steps)
        steps = [s for s, _ in list_tags(base / "checkpoints")]
        # the last n checkpoints, every interval-th, merged as the study says
        chosen = Selection(every=st.interval, last=st.n).choose(steps, allow_fewer=True)
        weighting = Selection(st.strategy, st.alpha)
        latest = base / "checkpoints" / f"global_step{chosen[-1]}"
        pma = root / "pma_init"
        if not (pma / "merge_manifest.json").is_file():
            merge([base / "checkpoints" / f"global_step{s}" for s in chosen], pma, weighting,
                  OutputOptions(fmt="deepspeed", optimizer_state="latest", overwrite=True),
                  progress=False, echo=lambda _: None)
        res = {"seed": seed, "window": chosen, "weights": weighting.weights_for(len(chosen)),
               "base_val": read_run(base)["val"], "arms": {}}
        for lr in st.ct_lrs:
            for arm, src in (("latest", latest), ("pma", pma)):
                name = f"ct_lr{lr:g}_{arm}"
                run = self._train(name, seed + st.ct_seed_offset, self._ct_overrides(src, lr),
                                  self.ct_steps, root=root)
                rec = read_run(run)
                res["arms"][f"{lr:g}/{arm}"] = {
                    "lr": lr, "init": arm, "run": str(run), **ct_metrics(rec, self.ct_warmup),
                    "curve": [(s, loss, gn) for s, loss, gn in rec["steps"]], "val": rec["val"]}
        return res

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.echo(f"study pma-init -> {self.out}: seeds {self.st.seeds}, CT peak LRs "
                  f"{self.st.ct_lrs}, {self.ct_steps} steps each ({self.ct_warmup} warmup), "
                  f"PMA of the last {self.st.n} checkpoints ({self.st.strategy})")
        seeds = [self.run_seed(s) for s in self.st.seeds]
        return self._report(t0, seeds, summarize_pma_init(seeds, self.st.ct_lrs),
                            ct_steps=self.ct_steps, ct_warmup_steps=self.ct_warmup)


def summarize_pma_init(seeds: list[dict], lrs: list[float]) -> dict:
    """Per peak LR: each metric per arm (mean ± std over seeds), the paired difference
    pma − latest, and in how many seeds PMA-init had the lower value."""
    out = {}
    for lr in lrs:
        key = f"{lr:g}"
        row = {}
        for m in PMA_INIT_METRICS:
            a = [s["arms"][f"{key}/latest"][m] for s in seeds]
            b = [s["arms"][f"{key}/pma"][m] for s in seeds]
            # an infinite value (a diverged step) still ranks: only missing / NaN pairs drop
            ranked = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
                      and not (math.isnan(x) or math.isnan(y))]
            row[m] = {"latest": mean_std(a), "pma": mean_std(b),
                      "diff": mean_std([y - x for x, y in ranked if _finite(x) and _finite(y)]),
                      "pma_lower": sum(y < x for x, y in ranked), "of": len(ranked),
                      "nonfinite": {"latest": sum(not _finite(x) for x in a),
                                    "pma": sum(not _finite(y) for y in b)}}
        out[key] = row
    return out


# ---- spike ------------------------------------------------------------------------------------
@dataclass
class SpikeStudyConfig:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds; every arm trains each seed from scratch (the arms share the steps before the
    first spike)."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """Arms compared: values of stability.on_spike (continue, rollback, pma), rollback+skip for
    a rollback that also skips the next skip_batches steps' data after each reload."""
    skip_batches: int = 10
    """stability.skip_batches of the +skip arm."""


def _check_spike(cfg: RecipeConfig, st: SpikeStudyConfig, path: Path) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: key '{key}': {msg}")

    need(bool(st.seeds) and len(set(st.seeds)) == len(st.seeds), "study.seeds",
         "need one or more distinct seeds")
    need(bool(st.arms) and all(a in ARMS for a in st.arms), "study.arms",
         f"each arm must be one of {', '.join(ARMS)}")
    need(st.skip_batches >= 1, "study.skip_batches", "must be >= 1")
    need(cfg.checkpoint.every_tokens > 0, "checkpoint.every_tokens",
         "recoveries reload checkpoints: set an interval")


def spike_metrics(rec: dict, loss_factor: float) -> dict:
    """Outcome of one arm: spikes, recoveries, whether and how fast it got back on trend, and
    its final validation loss. *Back on trend*: the first executed step past the first spike's
    step whose loss is within loss_factor x the trend the spike was measured against; the
    count is of executed steps from the spike on, replays after reloads included."""
    events = rec["events"]
    spikes = [e for e in events if e["event"] == "spike"]
    recoveries = [e for e in events if e["event"] == "recovery"]
    gave_up = any(e["event"] == "gave_up" for e in events) or rec["exit"] != 0
    out = {"spikes": len(spikes), "recoveries": len(recoveries), "gave_up": gave_up,
           "first_spike": None, "steps_to_trend": None, "recovered": None,
           "final_val": rec["val"][-1][1] if rec["val"] and not gave_up else None,
           "executed_steps": len(rec["executed"]),
           "final_step": rec["steps"][-1][0] if rec["steps"] else 0,
           "spike_log": [{k: e.get(k) for k in ("step", "kind", "loss", "loss_trend",
                                                "grad_norm", "grad_norm_trend", "attempt")}
                         for e in spikes],
           "recovery_log": [{k: e.get(k) for k in ("spike_step", "resume_step", "checkpoints",
                                                   "retry")} for e in recoveries]}
    if not spikes:
        return out
    first = spikes[0]
    out["first_spike"] = {"step": first["step"], "kind": first["kind"]}
    trend = first.get("loss_trend")
    # the executed steps from the first spike on (metrics.jsonl keeps them in order)
    ex = rec["executed"]
    start = next((i for i, (s, _, _) in enumerate(ex) if s == first["step"]), None)
    if start is not None and _finite(trend):
        for k, (s, loss, _) in enumerate(ex[start + 1:], start=1):
            if s > first["step"] and _finite(loss) and loss <= loss_factor * trend:
                out["steps_to_trend"] = k
                break
    finals = [loss for _, loss, _ in rec["steps"][-5:]]
    out["recovered"] = (not gave_up and out["steps_to_trend"] is not None
                        and all(_finite(x) for x in finals) and _finite(out["final_val"]))
    return out


class SpikeStudy(_StabilityStudy):
    kind = "spike"
    LOAD = {"schema": SpikeStudyConfig, "quick_overrides": SPIKE_QUICK, "check": _check_spike}

    def __init__(self, recipe, overrides, out, quick=False, echo=print):
        super().__init__(recipe, overrides, out, quick, echo, **self.LOAD)

    def run(self) -> dict:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.echo(f"study spike -> {self.out}: seeds {self.st.seeds}, arms {self.st.arms}, LR "
                  f"{cfg.train.lr:g}, {cfg.total_steps} steps, a checkpoint every {self.every}")
        seeds = []
        for seed in self.st.seeds:
            res = {"seed": seed, "arms": {}}
            for arm in self.st.arms:
                run = self._train(arm.replace("+", "_"), seed,
                                  [*arm_overrides(arm, self.st.skip_batches),
                                   "logging.log_every=1"], cfg.total_steps, ok_codes=(0, 3))
                rec = read_run(run)
                res["arms"][arm] = {**spike_metrics(rec, cfg.stability.loss_factor),
                                    "run": str(run), "executed": rec["executed"],
                                    "spike_at": rec["spike_at"], "val": rec["val"]}
            seeds.append(res)
        return self._report(t0, seeds, summarize_spike(seeds, self.st.arms), lr=cfg.train.lr,
                            stability=asdict(cfg.stability), checkpoint_every_steps=self.every,
                            total_steps=cfg.total_steps)


def summarize_spike(seeds: list[dict], arms: list[str]) -> dict:
    """Per arm, over the runs that spiked (a run without a spike is the same in every arm):
    recovery count, steps to trend of the recovered ones, spikes, recoveries, executed steps
    and final validation loss (of the runs that finished). ``final_val_no_spike``: the runs
    without a spike, for reference."""
    out = {}
    for arm in arms:
        rows = [s["arms"][arm] for s in seeds]
        spiked = [r for r in rows if r["spikes"]]
        out[arm] = {
            "runs": len(rows), "spiked": len(spiked),
            "recovered": sum(bool(r["recovered"]) for r in spiked),
            "gave_up": sum(r["gave_up"] for r in rows),
            "steps_to_trend": mean_std([r["steps_to_trend"] for r in spiked
                                        if r["recovered"]]),
            "spikes": mean_std([r["spikes"] for r in spiked]),
            "recoveries": mean_std([r["recoveries"] for r in spiked]),
            "final_val": mean_std([r["final_val"] for r in spiked]),
            "executed_steps": mean_std([r["executed_steps"] for r in spiked]),
            "final_val_no_spike": mean_std([r["final_val"] for r in rows if not r["spikes"]]),
        }
    return out
