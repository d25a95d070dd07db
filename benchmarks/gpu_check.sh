#!/usr/bin/env bash
# The first run of ZipR1's kernels on a real GPU: one script, at most 9 minutes on one H100 / H200, with a summary.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --dry-run       # any CPU machine: the same steps at tiny shapes (TRITON_INTERPRET=1)
#   bash benchmarks/gpu_check.sh --log-dir DIR   # where each step's full output goes (default: a new /tmp folder)
#
# Steps, in this order, each under its own time limit (at most 540 s in all on the GPU;
# GPU_CHECK_LIMITS="20 130 105 95 165" sets the five, in seconds):
#   env      nvidia-smi; a C compiler (Triton builds its launcher with it at the first kernel launch);
#            Python, torch, CUDA and Triton versions
#   tests    pytest -x -q tests/test_kernels.py tests/test_sparse_attention.py: natively on CUDA, the fp32 and
#            bf16 kernel paths against the references
#   ragged   benchmarks/ragged_check.py: B = 64, ℓ = 32k, bf16, per-row τ ~ U(0.05, 0.5); forward, backward (B = 4),
#            decode with ragged key_valid, probe mass vs the torch reference; q holds 2^32 elements there
#   kernels  benchmarks/bench_kernels.py at ℓ = 32k, τ ∈ {0.25, 0.1}; names the SDPA backend of the dense baseline
#   3b       benchmarks/bench_3b.py, reduced: prefill at 8k and 32k with KV bytes (τ ≈ 0.25 by a 6-step bisection),
#            decode tok/s at 32k (batch 8), one ZipR1 step with its peak memory
# The dry run uses the same scripts with their tiny-shape flags; bench_3b's then runs on the torch path, because the
# 3B pipeline through the interpreted kernels takes over 13 minutes on a CPU (the other steps cover the kernels).
# A step that fails or runs out of time does not stop the next ones; the summary at the end lists every step, and
# the script exits 1 if any of them did not pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
LOG_DIR="${TMPDIR:-/tmp}/zipr1_gpu_check_$(date +%Y%m%d_%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --log-dir) LOG_DIR="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--log-dir DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$LOG_DIR"
PYTHON="${PYTHON:-python}"
unset ZIPR1_ATTN_BACKEND  # "auto": what a user's run does
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the kernels in Triton's interpreter, on the CPU
  MODE="dry run (CPU, TRITON_INTERPRET=1, tiny shapes)"
else
  unset TRITON_INTERPRET
  MODE="GPU"
fi

NAMES=() RESULTS=() SECONDS_TAKEN=() LIMITS=()
START=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

summary() {
  local code=0 i
  echo
  echo "==== gpu_check summary: $MODE, commit $COMMIT, $(( $(date +%s) - START )) s in all, logs in $LOG_DIR ===="
  echo "| step | result | s | limit s |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} | ${LIMITS[$i]} |"
    [ "${RESULTS[$i]}" = PASS ] || code=1
  done
  [ "${#NAMES[@]}" -eq 5 ] || { echo "(stopped after ${#NAMES[@]} of 5 steps)"; code=1; }
  key_lines tests '(passed|failed|error)' | tail -n 1
  key_lines ragged '^(# offsets|\| (forward|backward|decode|probe)|ragged check)'
  key_lines kernels '^(- dense|goal|\| prefill incl|\| decode .*Triton)'
  key_lines 3b '^\| [0-9]'
  echo "result: $([ "$code" = 0 ] && echo "all steps passed" || echo "NOT all steps passed")"
  exit "$code"
}
trap summary EXIT

key_lines() {  # the lines of a step's log worth reading in the summary, prefixed with the step
  [ -f "$LOG_DIR/$1.log" ] || return 0
  grep -E "$2" "$LOG_DIR/$1.log" | sed "s/^/$1: /" || true
}

run_step() {  # run_step NAME LIMIT_S CMD...: output to the screen and $LOG_DIR/NAME.log; result recorded
  local name=$1 limit=$2 rc t0
  shift 2
  echo
  echo "==== $name (limit ${limit} s): $*"
  t0=$(date +%s)
  set +e
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  NAMES+=("$name") SECONDS_TAKEN+=("$(( $(date +%s) - t0 ))") LIMITS+=("$limit")
  case "$rc" in
    0) RESULTS+=(PASS) ;;
    124|137) RESULTS+=("TIMEOUT (rc $rc)") ;;
    *) RESULTS+=("FAIL (rc $rc)") ;;
  esac
}

env_check() {  # exit 1 when the machine cannot run the GPU steps
  local ok=0 cc
  if command -v nvidia-smi >/dev/null; then nvidia-smi || ok=1
  else echo "nvidia-smi: not found"; [ "$DRY_RUN" = 1 ] || ok=1; fi
  cc="${CC:-$(command -v gcc || command -v clang || true)}"
  if [ -n "$cc" ]; then echo "C compiler for Triton's launcher: $cc ($("$cc" --version | head -n 1))"
  else
    echo "no C compiler (gcc, clang or \$CC): Triton cannot build its launcher; the kernels would fall back to torch"
    ok=1
  fi
  "$PYTHON" - "$DRY_RUN" <<'EOF' || ok=1
import os, sys
import torch
dry = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
    sys.exit(1)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
elif not dry:
    sys.exit("torch sees no CUDA device")
EOF
  return "$ok"
}

echo "# gpu_check: $MODE; commit $COMMIT; logs in $LOG_DIR"
if [ "$DRY_RUN" = 1 ]; then
  LIMITS_S=(60 300 120 200 200)  # env tests ragged kernels 3b
  RAGGED=(--dry-run)
  KERNELS=(--smoke --lengths 64 --taus 0.25,0.1)
  BENCH_3B=(--smoke --decode-lengths 512)
else
  LIMITS_S=(20 130 105 95 165)  # 515 s + 5 s grace each = 540 s at most; a guess before any GPU run
  RAGGED=()
  KERNELS=(--lengths 32768 --taus 0.25,0.1)
  BENCH_3B=(--lengths 8192,32768 --bisect-iters 6 --repeats 1 --decode-lengths 32768 --decode-batches 8
            --decode-steps 32 --step-new-tokens 128)
fi

[ -z "${GPU_CHECK_LIMITS:-}" ] || read -r -a LIMITS_S <<< "$GPU_CHECK_LIMITS"

run_step env "${LIMITS_S[0]}" bash -c "$(declare -f env_check); DRY_RUN=$DRY_RUN PYTHON=$PYTHON env_check"
if [ "${RESULTS[0]}" != PASS ] && [ "$DRY_RUN" = 0 ]; then
  echo "the environment cannot run the GPU steps: stopping here"
  exit 1
fi
run_step tests "${LIMITS_S[1]}" "$PYTHON" -m pytest -x -q tests/test_kernels.py tests/test_sparse_attention.py
run_step ragged "${LIMITS_S[2]}" "$PYTHON" benchmarks/ragged_check.py "${RAGGED[@]}"
run_step kernels "${LIMITS_S[3]}" "$PYTHON" benchmarks/bench_kernels.py "${KERNELS[@]}"
run_step 3b "${LIMITS_S[4]}" "$PYTHON" benchmarks/bench_3b.py "${BENCH_3B[@]}"
