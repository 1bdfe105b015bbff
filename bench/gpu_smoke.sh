#!/usr/bin/env bash
# GPU smoke test: does moe-merge train, checkpoint, merge and evaluate on this node's GPUs?
#
#   ./bench/gpu_smoke.sh                   # on a node with 1-8 GPUs, from a fresh clone
#   OUT=/tmp/smoke ./bench/gpu_smoke.sh    # another scratch directory (default bench/out/gpu_smoke)
#   NUM_RANKS=4 ./bench/gpu_smoke.sh       # use 4 of the GPUs (default: all that torch sees)
#   ALLOW_CPU=1 ./bench/gpu_smoke.sh       # no GPU: the same checks on 2 CPU ranks with gloo
#
# It trains the tiny MoE recipe (recipes/moe_tiny.yaml, 60 optimizer steps, a checkpoint every
# 15) with ./launch/train.sh, which starts one rank per GPU with nccl (DS_ACCELERATOR=cpu and
# gloo without a GPU), in three configurations, each in its own run directory under $OUT:
#   zero2       bf16, ZeRO-2, expert parallelism 2 (AutoEP; 1 when the rank count is odd),
#   zero3       bf16, ZeRO-3, the same expert parallelism,
#   zero2_ckpt  bf16, ZeRO-2, activation checkpointing and sdpa attention
#               (model.activation_checkpointing=true model.attn_implementation=sdpa),
# then merges the last 3 checkpoints of the ZeRO-2 run (moe-merge merge --last 3, SMA) into an
# HF model and evaluates the merge and the run's latest checkpoint (moe-merge eval).
#
# One line per check on stdout: "PASS <check> (<detail>)", "FAIL <check>: <the last error line
# of its log>" or "SKIP <check> (<why>)"; each check's full log is $OUT/<check>.log. It goes on
# after a failure and exits 1 if any check failed (0 with "SKIP no GPU" when there is no GPU and
# ALLOW_CPU is not 1). The checks:
#   setup           launch/setup_env.sh: .venv with the pinned dependencies (minutes the first
#                   time on a fresh clone, not counted in the times below)
#   gpu             torch.cuda.is_available() in .venv; the GPUs, torch's CUDA, bf16 support
#   nccl            torch.distributed.is_nccl_available()
#   train_<run>     the launch exits 0, metrics.jsonl ends with a finite train/loss and val/loss,
#                   and at least 3 checkpoints exist; zero2_ckpt also shows its val loss minus
#                   zero2's (activation checkpointing recomputes the same forward: ~0)
#   config_<run>    bf16 was used: ds_config.json (what the engine ran with) has bf16 enabled and
#                   the checkpoint's optimizer files are DeepSpeed's bf16 ones (bf16_*); the
#                   ZeRO stage, expert-parallel size and ZeRO data-parallel size (the rank
#                   count) that moe-merge inspect reads from the checkpoint are the ones asked
#                   for; on GPU, AutoEP's grouped GEMM (use_grouped_mm) is on; zero2_ckpt:
#                   the resolved recipe holds activation checkpointing and sdpa
#   merge           moe-merge merge of the ZeRO-2 run's newest 3 checkpoints into an HF model
#   eval            moe-merge eval of the merge and of the latest checkpoint: both losses finite
#   total           every check passed; the wall time of the whole script
#
# Time: expected 3-5 minutes on one GPU node after set-up (an estimate, not yet measured on a
# GPU: each launch is mostly start-up; the first may also JIT-compile DeepSpeed's fused Adam,
# which needs nvcc); with ALLOW_CPU=1, 4.6-5.2 minutes on 2 CPU cores shared with a test run
# (3 launches of 62-136 s, the two evaluations 37-43 s).
# Environment: OUT, NUM_RANKS, ALLOW_CPU, SMOKE_TIMEOUT (seconds one step may take; default 480),
# MASTER_PORT (passed on to launch/train.sh).
set -euo pipefail
start=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out/gpu_smoke}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
TIMEOUT=${SMOKE_TIMEOUT:-480}
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"   # ROOT, VENV, PY, gpu_count
MERGE="$VENV/bin/moe-merge"
cd "$ROOT"

FAILED=()
pass() { echo "PASS $1 ($2)"; }
skip() { echo "SKIP $1 ($2)"; }
fail() { echo "FAIL $1: $2"; FAILED+=("$1"); }

# The line of a log that best says what went wrong: the trainer's or moe-merge's one-line
# "error: ...", else the last exception line of a traceback, else the last line naming an
# error, else the last line.
last_error() {
  local log=$1 line=""
  local strip='s/^\[rank[0-9]+\]:[[:space:]]*//; s/^[[:space:]]+//'
  for pattern in '^(\[rank[0-9]+\]:[[:space:]]*)?error: ' \
                 '^(\[rank[0-9]+\]:[[:space:]]*)?[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(:|$)' \
                 '[Ee]rror|ERROR|Killed|[Tt]imed out'; do
    line=$(grep -aE "$pattern" "$log" 2>/dev/null | grep -avE '[Ww]arning' | tail -n 1 || true)
    [ -n "$line" ] && break
  done
  [ -n "$line" ] || line=$(grep -a '[^[:space:]]' "$log" 2>/dev/null | tail -n 1 || true)
  line=$(printf '%s' "$line" | tr -d '\r' | sed -E "$strip")
  echo "${line:0:300}"
}

# run LOG CMD...: CMD with its output to LOG, within $TIMEOUT seconds; sets rc and secs.
# run_json JSON LOG CMD...: the same with stdout (a --json answer) to JSON, stderr to LOG.
run() { run_json "$1" "$@"; }
run_json() {
  local json=$1 log=$2 t0
  shift 2
  t0=$(date +%s)
  rc=0
  if [ "$json" = "$log" ]; then
    timeout -k 20 "$TIMEOUT" "$@" >"$log" 2>&1 </dev/null || rc=$?
  else
    timeout -k 20 "$TIMEOUT" "$@" >"$json" 2>"$log" </dev/null || rc=$?
  fi
  secs=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "smoke: timed out after ${TIMEOUT} s (SMOKE_TIMEOUT)" >>"$log"
  fi
}

why() {  # the FAIL text of a step that exited non-zero
  local log=$1
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "timed out after ${secs} s; last line: $(grep -a '[^[:space:]]' "$log" | grep -v '^smoke:' | tail -n 1 | cut -c1-200)"
  else
    echo "$(last_error "$log") (exit $rc, log $log)"
  fi
}

# --- gpu present? (nvidia-smi, without a virtualenv; torch in .venv below) --------------------
if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -x "$PY" ] \
   && { compgen -G "/dev/nvidia[0-9]*" >/dev/null || compgen -G "/dev/kfd" >/dev/null; }; then
  mkdir -p "$OUT"
  "$ROOT/launch/setup_env.sh" >"$OUT/setup.log" 2>&1 || true  # gpu_count needs torch here
fi
gpus=$(gpu_count 2>/dev/null || echo 0)
if [ "$gpus" = 0 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
  echo "SKIP no GPU (none seen by nvidia-smi or torch; ALLOW_CPU=1 runs the same checks on CPU)"
  exit 0
fi
mkdir -p "$OUT"

# --- setup -------------------------------------------------------------------------------------
run "$OUT/setup.log" "$ROOT/launch/setup_env.sh"
if [ "$rc" = 0 ] && [ -x "$MERGE" ]; then
  pass setup "$secs s, $VENV"
else
  fail setup "$(why "$OUT/setup.log")"
  fail total "setup failed; $(( $(date +%s) - start )) s"
  exit 1
fi

# --- gpu, nccl ---------------------------------------------------------------------------------
if [ "$gpus" = 0 ]; then
  on_gpu=0
  N=${NUM_RANKS:-2}
  skip gpu "none found; ALLOW_CPU=1: $N CPU ranks with gloo"
else
  on_gpu=1
  N=${NUM_RANKS:-$gpus}
  run "$OUT/gpu.log" "$PY" -c '
import torch
hint = " (a CPU-only build, installed before this node had a GPU: remove .venv and run again; launch/setup_env.sh installs the CUDA build on a GPU node)" if torch.version.cuda is None else ""
assert torch.cuda.is_available(), "torch.cuda.is_available() is False, torch %s%s" % (torch.__version__, hint)
n = torch.cuda.device_count()
names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
print("%d x %s, torch %s, CUDA %s, bf16 %s" % (n, " / ".join(names), torch.__version__, torch.version.cuda,
      "supported" if torch.cuda.is_bf16_supported() else "NOT supported"))'
  if [ "$rc" = 0 ]; then
    pass gpu "$(tail -n 1 "$OUT/gpu.log"); using $N"
  else
    fail gpu "$(why "$OUT/gpu.log")"
  fi
fi
run "$OUT/nccl.log" "$PY" -c '
import torch.distributed as dist
assert dist.is_available(), "torch.distributed is not available"
assert dist.is_nccl_available(), "torch.distributed.is_nccl_available() is False"
import torch
print("nccl %s" % ".".join(map(str, torch.cuda.nccl.version())))'
if [ "$rc" = 0 ]; then
  pass nccl "$(tail -n 1 "$OUT/nccl.log")"
elif [ "$on_gpu" = 0 ]; then
  skip nccl "not in this torch build; on CPU the launcher uses gloo"
else
  fail nccl "$(why "$OUT/nccl.log")"
fi

# --- training runs -----------------------------------------------------------------------------
# Batch arithmetic: 2 sequences of 256 tokens per rank per step, no gradient accumulation, so
# global_batch = 2 x N; 60 steps, a checkpoint every 15 (4 checkpoints), 10 warmup steps.
EP=1
if [ "$N" -ge 2 ] && [ $(( N % 2 )) = 0 ]; then EP=2; fi
MB=2
GB=$(( MB * N ))
TOK=$(( GB * 256 ))
STEPS=60
COMMON=(output_dir="$OUT" parallel.world_size=0 parallel.micro_batch="$MB" parallel.global_batch="$GB"
        parallel.precision=bf16 parallel.ep_size="$EP"
        train.max_tokens=$(( STEPS * TOK )) checkpoint.every_tokens=$(( 15 * TOK ))
        schedule.warmup_tokens=$(( 10 * TOK )) checkpoint.keep_last=0 train.resume=never
        logging.log_every=5 logging.val_every=30 logging.val_batches=8 logging.progress=false)
echo "[gpu_smoke] $N rank(s) on $([ "$on_gpu" = 1 ] && echo GPU || echo CPU), EP $EP," \
     "$STEPS steps of $TOK tokens; logs and runs in $OUT" >&2

declare -A TRAINED=()
train() {  # NAME ZERO_STAGE REFERENCE_RUN|- [key=value ...]
  local name=$1 zero=$2 ref=$3 log="$OUT/train_$1.log" dir="$OUT/$1" out
  shift 3
  rm -rf "$dir"
  run "$log" env NUM_RANKS="$N" "$ROOT/launch/train.sh" recipes/moe_tiny.yaml "${COMMON[@]}" \
      name="$name" parallel.zero_stage="$zero" "$@"
  if [ "$rc" != 0 ]; then
    fail "train_$name" "$(why "$log")"
    return 0
  fi
  if out=$("$PY" - "$dir" 3 "$OUT/$ref" <<'EOF' 2>&1
import json, math, sys
from pathlib import Path


def final(run):
    """The last train/loss and val/loss lines of a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"no {path}")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in recs if "train/loss" in r]
    val = [r for r in recs if "val/loss" in r]
    if not train or not val:
        sys.exit(f"{path}: no train/loss or no val/loss lines")
    return train[-1], val[-1]


run, need, ref = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
train, val = final(run)
loss, vloss = train["train/loss"], val["val/loss"]
if not (math.isfinite(loss) and math.isfinite(vloss)):
    sys.exit(f"final train/loss {loss} (step {train['step']}), val/loss {vloss} (step "
             f"{val['step']}) in {run / 'metrics.jsonl'}")
tags = sorted((run / "checkpoints").glob("global_step*"))
if len(tags) < need:
    sys.exit(f"{len(tags)} checkpoints in {run / 'checkpoints'}, fewer than {need}")
vs = ""
if ref.name != "-" and (ref / "metrics.jsonl").is_file():  # the same run without the option
    vs = f", val loss {vloss - final(ref)[1]['val/loss']:+.4f} vs {ref.name}"
print(f"step {train['step']}, final loss {loss:.4f}, val loss {vloss:.4f}{vs}, "
      f"{len(tags)} checkpoints")
EOF
  ); then
    echo "$out" >>"$log"
    pass "train_$name" "$secs s, ${out##*$'\n'}"
    TRAINED[$name]=$zero
  else
    echo "$out" >>"$log"
    fail "train_$name" "${out##*$'\n'}"
  fi
}

config() {  # NAME: what the run directory and its latest checkpoint say it ran with
  local name=$1 dir="$OUT/$1" log="$OUT/config_$1.log" tag out
  if [ -z "${TRAINED[$name]+x}" ]; then
    skip "config_$name" "train_$name failed"
    return 0
  fi
  tag="$dir/checkpoints/$(cat "$dir/checkpoints/latest" 2>/dev/null || echo latest)"
  run_json "$OUT/config_$name.json" "$log" "$MERGE" inspect "$tag" --json
  if [ "$rc" != 0 ]; then
    fail "config_$name" "$(why "$log")"
    return 0
  fi
  if out=$("$PY" - "$dir" "$tag" "$OUT/config_$name.json" "${TRAINED[$name]}" "$EP" "$N" "$on_gpu" "$name" <<'EOF' 2>&1
import json, sys
from pathlib import Path
import yaml
run, tag, answer = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
zero, ep, n = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
on_gpu, name = sys.argv[7] == "1", sys.argv[8]
problems = []
ds = json.loads((run / "ds_config.json").read_text())
if not ds.get("bf16", {}).get("enabled"):
    problems.append(f"ds_config.json: bf16 {ds.get('bf16')}")
if ds.get("zero_optimization", {}).get("stage") != zero:
    problems.append(f"ds_config.json: zero stage {ds.get('zero_optimization', {}).get('stage')}")
grouped = ds.get("expert_parallel", {}).get("use_grouped_mm")
if on_gpu and grouped is not True:
    problems.append(f"ds_config.json: expert_parallel.use_grouped_mm is {grouped} on GPU")
optim = sorted(p.name for p in tag.glob("*optim_states.pt"))
if not optim or not all(p.startswith("bf16_") for p in optim):
    problems.append(f"{tag.name}: optimizer files {optim[:2]}, not DeepSpeed's bf16_*")
report = json.loads(answer.read_text())
row = report["tags"][-1] if report.get("tags") else {}
if "error" in row or not row:
    problems.append(f"moe-merge inspect: {row.get('error') or report.get('problems')}")
else:
    got = (row["precision"], row["zero_stage"], row["ep_size"], row["dp_size"])
    if got != ("bf16", zero, ep, n):
        problems.append(f"checkpoint precision/zero/ep/dp {got}, expected {('bf16', zero, ep, n)}")
extra = ""
if name.endswith("_ckpt"):
    model = yaml.safe_load((run / "recipe.yaml").read_text())["model"]
    ac, attn = model.get("activation_checkpointing"), model.get("attn_implementation")
    if ac is not True or attn != "sdpa":
        problems.append(f"recipe.yaml: activation_checkpointing {ac}, attn_implementation {attn}")
    extra = ", activation checkpointing, sdpa"
if problems:
    sys.exit("; ".join(problems))
print(f"bf16 (ds_config.json, {optim[0].split('zero')[0]}* optimizer files), ZeRO-{zero}, "
      f"EP {ep}, {n} ranks, grouped_mm {'on' if grouped else 'off'}{extra}")
EOF
  ); then
    echo "$out" >>"$log"
    pass "config_$name" "${out##*$'\n'}"
  else
    echo "$out" >>"$log"
    fail "config_$name" "${out##*$'\n'}"
  fi
}

train zero2 2 -
config zero2
train zero3 3 -
config zero3
train zero2_ckpt 2 zero2 model.activation_checkpointing=true model.attn_implementation=sdpa
config zero2_ckpt

# --- merge and eval ----------------------------------------------------------------------------
MERGED="$OUT/zero2_sma3"
merged_ok=0
if [ -z "${TRAINED[zero2]+x}" ]; then
  skip merge "train_zero2 failed"
else
  run "$OUT/merge.log" "$MERGE" merge "$OUT/zero2" --last 3 --out "$MERGED" --overwrite --quiet
  if [ "$rc" = 0 ] && [ -f "$MERGED/merge_manifest.json" ] && [ -f "$MERGED/config.json" ]; then
    steps=$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("%s of %s" % (m["strategy"], ", ".join(str(i["step"]) for i in m["inputs"])))' \
      "$MERGED/merge_manifest.json" 2>>"$OUT/merge.log" || echo "?")
    pass merge "$secs s, $steps -> $MERGED"
    merged_ok=1
  elif [ "$rc" = 0 ]; then
    fail merge "exit 0 but no merge_manifest.json and config.json in $MERGED"
  else
    fail merge "$(why "$OUT/merge.log")"
  fi
fi

if [ "$merged_ok" = 1 ]; then
  t0=$(date +%s)
  run_json "$OUT/eval_merged.json" "$OUT/eval_merged.log" "$MERGE" eval "$MERGED" --json
  rc_m=$rc
  run_json "$OUT/eval_latest.json" "$OUT/eval_latest.log" "$MERGE" eval "$OUT/zero2" --json
  rc_l=$rc
  secs=$(( $(date +%s) - t0 ))
  for f in eval_merged.log eval_merged.json eval_latest.log eval_latest.json; do
    echo "== $f"; cat "$OUT/$f"
  done >"$OUT/eval.log"
  if [ "$rc_m" != 0 ]; then
    rc=$rc_m; fail eval "merged: $(why "$OUT/eval_merged.log")"
  elif [ "$rc_l" != 0 ]; then
    rc=$rc_l; fail eval "latest: $(why "$OUT/eval_latest.log")"
  elif out=$("$PY" - "$OUT/eval_merged.json" "$OUT/eval_latest.json" <<'EOF' 2>&1
import json, math, sys
from pathlib import Path
m, l = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
if not (math.isfinite(m["loss"]) and math.isfinite(l["loss"])):
    sys.exit(f"merged loss {m['loss']}, latest loss {l['loss']}")
print(f"merged {m['loss']:.4f}, latest {l['loss']:.4f} ({Path(l['model']).name}), "
      f"gain {l['loss'] - m['loss']:+.4f}, {m['windows']} windows")
EOF
  ); then
    pass eval "$secs s, ${out##*$'\n'}"
  else
    echo "$out" >>"$OUT/eval.log"
    fail eval "${out##*$'\n'}"
  fi
else
  skip eval "no merge"
fi

# --- total -------------------------------------------------------------------------------------
total=$(( $(date +%s) - start ))
if [ "${#FAILED[@]}" = 0 ]; then
  pass total "$total s, every check passed"
else
  echo "FAIL total: ${#FAILED[@]} failed (${FAILED[*]}); $total s; logs in $OUT"
  exit 1
fi
