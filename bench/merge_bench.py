"""Merging N checkpoints of a ~111M-parameter MoE: moe-merge against the alternatives, side by side.

The run: tests/recipes/moe_tiny.yaml (the frozen tiny recipe) scaled to a 111M-parameter
Qwen3-MoE (16 experts, 8 layers, AutoEP EP=2, ZeRO-2, fp32, 2 gloo ranks), 10 steps with a
checkpoint after every step (1.7 GB per tag), trained once and kept in bench/out/runs/ (re-used
by later invocations). For each N the newest N tags are merged (SMA) by:

  floor                 one plain read (os.preadv into a reused buffer, no torch) of exactly the
                        zip records a master-weight merge must read: the fp32 partitions
                        (single_partition_of_fp32_groups) and the pickles of the files holding them
  moe-merge             `moe-merge merge RUN --last N --out DIR --max-shard-size S --quiet`
                        (HF output)
  moe-merge --no-verify the same without the CRC-32 check of the records read
  naive                 torch.load of every file of every tag, gather, fp32 running sum / N,
                        torch.save
  ds_to_universal       DeepSpeed's converter per tag, then the average of its per-parameter fp32.pt
  mergekit              mergekit-yaml linear merge (mergekit 0.1.5, its own venv) of the tags
                        exported to HF directories beforehand with `moe-merge merge TAG` (the
                        export is timed apart)

Each contender is one child process: wall time from start to exit; peak RSS = ru_maxrss as
GNU time reports it (the largest of the process and its descendants, not their sum; it counts
the touched pages of mmapped files); the peak anonymous memory of its process tree (RssAnon
summed over the tree, sampled every 0.1 s: heap and tensors, no file pages); and the CPU that
other processes used meanwhile. Each contender runs in two page-cache states (--cache): hot, the
files (for the floor and moe-merge: the byte ranges) that it reads were read once beforehand,
untimed; and cold, its input files were evicted from the page cache (posix_fadvise DONTNEED), so
it reads them from disk, as a merge of checkpoints written hours before does. The machine may be
shared, so each timed run waits (up to --max-wait s) until other processes use < 0.25 cores.
Contenders alternate within a repeat, in reversed order on odd repeats; ds_to_universal, 10-20x
slower than the rest, runs --universal-repeats times (1). On the first repeat every output is
compared with moe-merge's (max |difference| after the AutoEP -> HF name map), and the moe_merge/
sources are hashed before and after the run.

    .venv/bin/python bench/merge_bench.py [--n 4,10] [--repeats 2] [--max-shard-size 200MB]
                                          [--cache hot,cold]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
PY = str(REPO / ".venv" / "bin" / "python")
MOE_MERGE = str(REPO / ".venv" / "bin" / "moe-merge")
CHILD = str(REPO / "bench" / "merge_contenders.py")
MERGEKIT_VENV = OUT / "venv-mergekit"
RUN_NAME = "moe111m"
STEPS = 10
# 111.2M parameters (100.7M in experts): tests/recipes/moe_tiny.yaml widened, 2 sequences of
# 64 tokens per step so that 10 steps train in ~2 minutes, a checkpoint after every step, all kept.
RUN_OVERRIDES = [
    "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=4",
    "model.head_dim=64", "model.moe_intermediate_size=512", "model.num_experts=16",
    "data.seq_len=64", "parallel.micro_batch=1", "parallel.global_batch=2",
    "schedule.warmup_tokens=0", "checkpoint.every_tokens=128", "checkpoint.keep_last=0",
    f"train.max_tokens={128 * STEPS}", "logging.val_every=0", "logging.log_every=1",
    "logging.progress=false", f"name={RUN_NAME}",
]
CONTENDERS = ["floor", "moe-merge", "moe-merge --no-verify", "naive", "ds_to_universal", "mergekit"]
MIB = 2**20
TIME = shutil.which("time", path="/usr/bin:/bin")  # GNU time, for the peak RSS of a child


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu"}


# ---- measurement -----------------------------------------------------------------------
def _tree_anon_kib(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:"))
        except (OSError, StopIteration):
            pass
    return total


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


def busy_cores(seconds: float) -> float:
    """Cores kept busy by all processes over the next ``seconds``."""
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def wait_quiet(max_wait: float, limit: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``limit`` cores for 2 s; returns
    the last reading. The machine is shared: a test suite on 2 cores would distort the timings."""
    start = time.time()
    busy = busy_cores(2.0)
    warned = False
    while busy >= limit and time.time() - start < max_wait:
        if not warned:
            print(f"    waiting for a quiet machine ({busy:.2f} cores busy elsewhere)", flush=True)
            warned = True
        busy = busy_cores(5.0)
    return busy


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child; wall time, peak RSS (MiB) and the sampled peak anonymous RSS of
    its process tree (MiB). Exits on failure, with the tail of its log.

    Peak RSS is taken by GNU time (``%M``, from wait4: the largest of the child and its
    descendants) rather than by wait4 here: a child forked from this process starts with this
    process's own peak RSS, which would then be counted as the child's."""
    rss_file = log.with_suffix(".maxrss")
    wrap = [TIME, "-f", "%M", "-o", str(rss_file)] if TIME else []
    with open(log, "w") as logf:
        busy0, total0 = _cpu_jiffies()
        t0 = time.perf_counter()
        proc = subprocess.Popen([*wrap, *cmd], cwd=REPO, env=env(), stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak_anon = 0
        done = threading.Event()

        def sample():
            nonlocal peak_anon
            while not done.wait(0.1):
                peak_anon = max(peak_anon, _tree_anon_kib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1, total1 = _cpu_jiffies()
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"error: {' '.join(cmd)} failed ({proc.returncode}), log {log}:\n{tail}")
    maxrss_kib = int(rss_file.read_text().split()[-1]) if TIME else usage.ru_maxrss
    tick = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    # CPU used by everything but the contender during its run (this process's sampler included)
    other = ((busy1 - busy0) / tick - usage.ru_utime - usage.ru_stime) / (
        (total1 - total0) / tick / cores)
    return {"wall_s": wall, "maxrss_mib": maxrss_kib / 1024, "anon_peak_mib": peak_anon / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "other_cores": max(other, 0.0)}


def warm(ranges: list[tuple[str, int, int]]) -> None:
    """Read byte ranges once (untimed) so that they are in the page cache."""
    buf = memoryview(bytearray(64 << 20))
    for path, offset, length in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            end = offset + length
            while offset < end:
                n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
                if n <= 0:
                    break
                offset += n
        finally:
            os.close(fd)


def evict(ranges: list[tuple[str, int, int]]) -> None:
    """Drop files from the page cache (POSIX_FADV_DONTNEED: clean pages no process maps), so
    that the next run reads them from disk, as a merge of checkpoints written hours ago does."""
    os.sync()
    for path in sorted({r[0] for r in ranges}):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def whole_files(dirs: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), 0, p.stat().st_size)
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()]


# ---- set-up ------------------------------------------------------------------------------
def ensure_run() -> Path:
    run = OUT / "runs" / RUN_NAME
    tags = [run / "checkpoints" / f"global_step{s}" for s in range(1, STEPS + 1)]
    if all((t / "meta.json").is_file() for t in tags):
        print(f"re-using the trained run {run.relative_to(REPO)}", flush=True)
        return run
    shutil.rmtree(run, ignore_errors=True)
    print(f"training {run.relative_to(REPO)} ({STEPS} steps, a checkpoint every step)", flush=True)
    t0 = time.time()
    proc = subprocess.run(["bash", str(REPO / "launch" / "train.sh"),
                           "tests/recipes/moe_tiny.yaml", *RUN_OVERRIDES,
                           f"output_dir={OUT / 'runs'}"], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: training failed:\n{proc.stderr[-3000:]}")
    print(f"  trained in {time.time() - t0:.0f} s", flush=True)
    return run


def hf_exports(tags: list[Path], shard: str, logs: Path,
               max_wait: float) -> tuple[list[Path], list[dict]]:
    """Each tag exported to an HF directory by moe-merge (mergekit's input). The run's HF config
    has no ``architectures`` entry, which mergekit requires: it is added to the copies."""
    dirs, times = [], []
    for tag in tags:
        dst = OUT / "hf" / tag.name
        wait_quiet(max_wait)
        cmd = [MOE_MERGE, "merge", str(tag), "--out", str(dst), "--overwrite",
               "--max-shard-size", shard, "--quiet"]
        times.append(measure(cmd, logs / f"export_{tag.name}.log"))
        subprocess.run([PY, CHILD, "add-architectures", str(dst)], check=True, env=env())
        dirs.append(dst)
    return dirs, times


def mergekit_config(hf_dirs: list[Path], path: Path) -> None:
    models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in hf_dirs)
    path.write_text(f"merge_method: linear\nmodels:\n{models}parameters: {{normalize: true}}\n"
                    "dtype: float32\nout_dtype: float32\n")


# ---- one N -------------------------------------------------------------------------------
def bench_n(run: Path, n: int, args, contenders: list[str], logs: Path) -> dict:
    tags = [run / "checkpoints" / f"global_step{s}" for s in range(STEPS - n + 1, STEPS + 1)]
    work = OUT / f"merge_n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan_file = work / "plan.json"
    subprocess.run([PY, CHILD, "plan", str(plan_file), *map(str, tags)], check=True, env=env())
    plan = json.loads(plan_file.read_text())
    plan_ranges = [tuple(r) for r in plan["ranges"]] + whole_files([run / "hf"])
    result = {"n": n, "tags": [t.name for t in tags], "floor_bytes": plan["bytes"],
              "input_bytes": sum(r[2] for r in whole_files(tags)), "runs": {}, "check": {}}
    hf_dirs = []
    if "mergekit" in contenders:
        hf_dirs, export = hf_exports(tags, args.max_shard_size, logs, args.max_wait)
        result["hf_export"] = export
        mergekit_config(hf_dirs, work / "mergekit.yml")
    out = {c: work / c.replace(" --", "_").replace("-", "_") for c in contenders}
    ref = out["moe-merge"]
    for rep in range(args.repeats):
        order = contenders if rep % 2 == 0 else contenders[::-1]
        for cache in args.cache:
            for c in order:
                if c == "ds_to_universal" and (rep >= args.universal_repeats or cache == "cold"):
                    continue
                o = out[c]
                key = c if cache == "hot" else f"{c} [cold]"
                shutil.rmtree(o, ignore_errors=True) if o.is_dir() else o.unlink(missing_ok=True)
                log = logs / f"n{n}_r{rep}_{cache}_{o.name}.log"
                prepare = warm if cache == "hot" else evict
                if c == "floor":
                    prepare(plan_ranges)
                    cmd = [sys.executable, CHILD, "floor", str(plan_file)]
                elif c.startswith("moe-merge"):
                    prepare(plan_ranges if cache == "hot" else whole_files([run / "hf", *tags]))
                    cmd = [MOE_MERGE, "merge", str(run), "--last", str(n), "--out", str(o),
                           "--max-shard-size", args.max_shard_size, "--quiet", *c.split()[1:]]
                elif c == "naive":
                    prepare(whole_files(tags))
                    cmd = [PY, CHILD, "naive", str(o), *map(str, tags)]
                elif c == "ds_to_universal":
                    prepare(whole_files(tags))
                    uw = work / "universal_tmp"
                    shutil.rmtree(uw, ignore_errors=True)
                    uw.mkdir()
                    cmd = [PY, CHILD, "universal", str(o), str(uw), *map(str, tags)]
                else:
                    prepare(whole_files(hf_dirs))
                    cmd = [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(work / "mergekit.yml"),
                           str(o), "--quiet"]
                quiet = wait_quiet(args.max_wait)
                m = measure(cmd, log)
                m["busy_before"] = quiet
                if c == "floor":
                    m.update(json.loads(log.read_text().strip().splitlines()[-1]))
                result["runs"].setdefault(key, []).append(m)
                print(f"  N={n:<2} repeat {rep}  {key:29s} {m['wall_s']:7.2f} s  "
                      f"peak RSS {m['maxrss_mib']:7.0f} MiB  (anon {m['anon_peak_mib']:.0f})  "
                      f"other load {m['other_cores']:.2f} cores", flush=True)
                if c == "ds_to_universal":
                    shutil.rmtree(work / "universal_tmp", ignore_errors=True)
                if rep == 0 and cache == args.cache[0] and c not in ("floor", "moe-merge"):
                    kind = "hf" if c.startswith("moe-merge") or c == "mergekit" else "ckpt"
                    chk = subprocess.run(
                        [PY, CHILD, "check", str(ref), str(tags[-1]), kind, str(o)],
                        check=True, env=env(), capture_output=True, text=True)
                    result["check"][c] = json.loads(chk.stdout.strip().splitlines()[-1])
                    print(f"      max |{c} - moe-merge| = "
                          f"{result['check'][c]['max_abs_diff']:.3g}"
                          f" (largest |weight| {result['check'][c]['max_abs_value']:.3g})",
                          flush=True)
                if c != "moe-merge":
                    (shutil.rmtree(o, ignore_errors=True) if o.is_dir()
                     else o.unlink(missing_ok=True))
    shutil.rmtree(work, ignore_errors=True)
    return result


# ---- report ------------------------------------------------------------------------------
MODES = {"hot": "", "cold": " [cold]"}  # page-cache state -> suffix of the contender's key


def _mode_runs(res: dict, mode: str) -> dict[str, list[dict]]:
    """The runs of one page-cache mode, keyed by contender name."""
    sfx = MODES[mode]
    return {k[:len(k) - len(sfx)] if sfx else k: v for k, v in res["runs"].items()
            if (k.endswith(sfx) if sfx else not k.endswith("]"))}


def table(res: dict) -> str:
    out = []
    for mode in MODES:
        runs = _mode_runs(res, mode)
        if "floor" not in runs:
            continue
        floor = statistics.median(r["wall_s"] for r in runs["floor"])
        rate = statistics.median(r["read_bytes"] / r["read_s"] for r in runs["floor"]) / 1e9
        lines = [f"N = {res['n']} ({', '.join(res['tags'][:1] + ['...'] + res['tags'][-1:])}), "
                 + ("inputs in the page cache" if mode == "hot"
                    else "inputs evicted from the page cache (read from disk)")
                 + f": {res['floor_bytes'] / 1e9:.2f} GB of fp32 master records to read "
                 f"({res['input_bytes'] / 1e9:.1f} GB on disk); floor read rate {rate:.1f} GB/s",
                 "",
                 "| contender | wall s (median) | runs | × floor | peak RSS MiB | peak anon MiB "
                 "| max abs diff vs moe-merge |", "|---|---|---|---|---|---|---|"]
        for c, rs in runs.items():
            med = statistics.median(r["wall_s"] for r in rs)
            diff = res["check"].get(c, {}).get("max_abs_diff")
            diff = "reference" if c == "moe-merge" else "-" if diff is None else f"{diff:.2g}"
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
            lines.append(f"| {c} | {med:.2f} | {walls} | "
                         f"{med / floor:.1f} | {max(r['maxrss_mib'] for r in rs):.0f} | "
                         f"{max(r['anon_peak_mib'] for r in rs):.0f} | {diff} |")
        out.append("\n".join(lines))
    other = max(r["other_cores"] for rs in res["runs"].values() for r in rs)
    out.append(f"other processes used at most {other:.2f} cores during any timed run")
    if "hf_export" in res:
        ex = res["hf_export"]
        out.append(f"mergekit's input: {len(ex)} HF exports (`moe-merge merge TAG`), "
                   f"{statistics.median(e['wall_s'] for e in ex):.2f} s each (median), "
                   f"{sum(e['wall_s'] for e in ex):.1f} s in all, not in the mergekit row")
    return "\n\n".join(out)


def goals(results: list[dict], shard_bytes: int) -> str:
    lines = []
    for mode in MODES:
        for res in results:
            runs = _mode_runs(res, mode)
            if "moe-merge" not in runs:
                continue
            med = {c: statistics.median(r["wall_s"] for r in rs) for c, rs in runs.items()}
            a = med["moe-merge"]
            rss = max(r["maxrss_mib"] for r in runs["moe-merge"])
            limit = shard_bytes / MIB + 512
            n = f"N={res['n']} {mode}:"
            if "floor" in med:
                lines.append(f"{n} moe-merge / floor = {a / med['floor']:.1f} (goal <= 1.5): "
                             f"{'met' if a <= 1.5 * med['floor'] else 'NOT met'}")
            for c, goal in (("ds_to_universal", 5), ("mergekit", 2)):
                if c in med:
                    lines.append(f"{n} {c} / moe-merge = {med[c] / a:.1f} (goal >= {goal}): "
                                 f"{'met' if med[c] >= goal * a else 'NOT met'}")
            lines.append(f"{n} moe-merge peak RSS {rss:.0f} MiB (goal <= {limit:.0f} MiB = "
                         f"--max-shard-size + 512 MiB): {'met' if rss <= limit else 'NOT met'}")
        modal = [_mode_runs(r, mode) for r in results]
        if len(results) >= 2 and all("floor" in m for m in modal):
            lo, hi = results[0], results[-1]
            db = hi["floor_bytes"] - lo["floor_bytes"]
            for c in ("floor", "moe-merge", "moe-merge --no-verify"):
                if c in modal[0] and c in modal[-1]:
                    dt = (statistics.median(r["wall_s"] for r in modal[-1][c])
                          - statistics.median(r["wall_s"] for r in modal[0][c]))
                    lines.append(f"{mode}: marginal rate of {c} (N={lo['n']} -> N={hi['n']}): "
                                 f"{db / dt / 1e9:.2f} GB/s of fp32 master bytes")
    return "\n".join(lines)


def source_state() -> dict:
    """The moe-merge code measured: git commit, uncommitted changes, a hash of moe_merge/*.py."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "moe_merge").rglob("*.py")):
        h.update(f.read_bytes())

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "moe_merge_dirty": bool(git("status", "--porcelain", "moe_merge").strip()),
            "moe_merge_sha256": h.hexdigest()[:16]}


def machine() -> dict:
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "cpu": cpu,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="4,10", help="comma-separated numbers of checkpoints (<= 10)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of: {', '.join(CONTENDERS)} "
                         "(floor and moe-merge always run)")
    ap.add_argument("--universal-repeats", type=int, default=1,
                    help="repeats of ds_to_universal, the slowest contender by far (default 1)")
    ap.add_argument("--max-wait", type=float, default=900,
                    help="seconds to wait, before each timed run, for other processes to leave "
                         "the CPU (< 0.25 cores busy)")
    ap.add_argument("--cache", default="hot,cold",
                    help="page-cache state of the inputs before each timed run: hot (read once "
                         "beforehand), cold (evicted, read from disk), or both (default; "
                         "ds_to_universal runs hot only)")
    ap.add_argument("--json", default=str(OUT / "merge_bench.json"))
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    args.cache = [m.strip() for m in args.cache.split(",")]
    if not args.cache or any(m not in MODES for m in args.cache):
        ap.error("--cache: hot, cold or hot,cold")
    if any(not 1 <= n <= STEPS for n in ns):
        ap.error(f"--n: each N must be in 1..{STEPS}")
    contenders = list(CONTENDERS) if args.only is None else [
        c for c in CONTENDERS if c in ("floor", "moe-merge") or c in args.only.split(",")]
    if "mergekit" in contenders and not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
        print(f"mergekit left out: no {MERGEKIT_VENV}; create it with\n  python3 -m venv "
              f"{MERGEKIT_VENV} && {MERGEKIT_VENV}/bin/pip install -c launch/constraints.txt "
              "torch==2.13.0 mergekit==0.1.5", flush=True)
        contenders.remove("mergekit")
    shard_bytes = int(subprocess.run(  # moe-merge's own reading of the size, torch kept out of here
        [PY, "-c", "import sys; from moe_merge.merge.writer import parse_size; "
         "print(parse_size(sys.argv[1]))", args.max_shard_size],
        check=True, capture_output=True, text=True, env=env()).stdout)
    run = ensure_run()
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Untimed: fills moe-merge's cache of the HF model's tensor names (~/.cache/moe-merge; the
    # first merge of a model imports transformers to build it) and warms the interpreter's files.
    warmup = OUT / "warmup_merge"
    measure([MOE_MERGE, "merge", str(run / "checkpoints" / f"global_step{STEPS}"), "--out",
             str(warmup), "--overwrite", "--quiet", "--no-verify"], logs / "warmup.log")
    shutil.rmtree(warmup, ignore_errors=True)
    src = source_state()
    results = [bench_n(run, n, args, contenders, logs) for n in ns]
    src_end = source_state()
    if src_end != src:
        print(f"WARNING: moe_merge/ changed during the run ({src} -> {src_end}): the moe-merge "
              "rows mix two versions; run again", flush=True)
    report = "\n\n".join(table(r) for r in results) + "\n\n" + goals(results, shard_bytes)
    info = machine()
    print(f"\n{info['nproc']} cores ({info['cpu']}), {info['mem_gib']} GiB; moe-merge at "
          f"{src['commit']}{' + uncommitted changes' if src['moe_merge_dirty'] else ''} "
          f"(moe_merge/*.py sha256 {src['moe_merge_sha256']}); run {run.relative_to(REPO)}; "
          f"--max-shard-size {args.max_shard_size}; median of {args.repeats} "
          f"(ds_to_universal: {args.universal_repeats})\n\n{report}")
    Path(args.json).write_text(json.dumps({"machine": info, "source": src,
                                           "source_at_end": src_end, "command": sys.argv,
                                           "max_shard_size": args.max_shard_size,
                                           "results": results}, indent=1) + "\n")
    print(f"\nraw results: {args.json}")


if __name__ == "__main__":
    main()
