"""What live PMA costs a transformers Trainer run: none, PMACallback, and moe-merge watch beside it.

The same HF Trainer + DeepSpeed run (tests/support/other_trainers.py: a Qwen3-MoE of
``--hidden``/``--layers``, 2 CPU ranks, ZeRO-2) is timed three ways, in alternating order,
``--repeats`` times: plain; with ``PMACallback(n=3)`` (an in-memory merge and two evaluations
of the eval set per save); and plain with ``moe-merge watch`` running beside it as another
process on the same host (merging and scoring each new checkpoint from disk). The Trainer's own
``train_runtime`` is the measure. The callback's cost is work the training ranks do; the
watcher does none on them, but on this 2-core host it competes with them for the cores, which
on a cluster it would not (it runs on another node).

    .venv/bin/python bench/pma_callback_overhead.py [--repeats 2] [--steps 40] [--save-every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "support" / "other_trainers.py"
PY = Path(sys.executable)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, args, *extra: str) -> float:
    cmd = [str(PY.parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
           str(SCRIPT), "--trainer", "hf", "--zero", "2", "--out", str(out), "--steps",
           str(args.steps), "--save-every", str(args.save_every), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--rows", str(4 * args.steps), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return float(json.loads((out / "summary.json").read_text())["train_runtime"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"plain": [], "PMACallback": [], "watch beside": []}
    watched = []
    with tempfile.TemporaryDirectory(prefix="pma_overhead_") as tmp:
        tmp = Path(tmp)
        val = tmp / "val.bin"
        np.random.default_rng(0).integers(0, 128, 1 << 15).astype(np.uint16).tofile(val)
        train(tmp / "warmup", args)  # page cache, compiled ops
        for r in range(args.repeats):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for kind in order:
                out = tmp / f"{kind.replace(' ', '_')}_{r}"
                out.mkdir()
                if kind == "PMACallback":
                    times[kind].append(train(out, args, "--pma", "3"))
                elif kind == "plain":
                    times[kind].append(train(out, args))
                else:
                    w = subprocess.Popen(
                        [str(PY), "-m", "moe_merge", "watch", str(out), "data.seq_len=32",
                         "logging.val_batches=1", "parallel.micro_batch=8", "--out",
                         str(tmp / f"watch_{r}"), "--last", "3", "--data", str(val),
                         "--poll", "1", "--no-latest"],
                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, "DS_ACCELERATOR": "cpu"})
                    times[kind].append(train(out, args))
                    w.send_signal(signal.SIGTERM)
                    _, err = w.communicate(timeout=600)
                    log = tmp / f"watch_{r}" / "watch.jsonl"
                    watched.append(len(log.read_text().splitlines()) if log.is_file() else 0)
                print(f"repeat {r}: {kind:<13} {times[kind][-1]:7.2f} s", flush=True)
    base = statistics.median(times["plain"])
    saves = args.steps // args.save_every
    print(f"\n{args.steps} steps, a save every {args.save_every} ({saves} saves; merges from the "
          f"3rd), hidden {args.hidden}, {args.layers} layers, median of {args.repeats}:")
    for kind, ts in times.items():
        med = statistics.median(ts)
        each = ", ".join(f"{t:.2f}" for t in ts)
        print(f"  {kind:<13} {med:7.2f} s   {med / base:5.2f}x plain   ({each})")
    print(f"  the watcher scored {watched} merges while the runs trained (the rest after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
