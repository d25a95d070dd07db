#!/usr/bin/env bash
# The first run of ZipR1 on a real GPU: one script, at most 9 minutes on one H100 / H200, every step run, a summary.
# Usage and the CPU rehearsal that comes before any GPU run: benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh [--install-from .whl] [--log-dir DIR] [--budget S] [--limit STEP=S ...]
#   bash benchmarks/gpu_check.sh --dry-run ...     # any CPU machine: the same steps at tiny shapes (TRITON_INTERPRET=1)
#   bash benchmarks/gpu_check.sh --steps env,tests # only these steps (the others are listed as SKIPPED)
#
# Steps, in this order, each under its own time limit (GPU defaults in seconds; --limit STEP=S or
# GPU_CHECK_LIMITS="tests=150 3b=120" change them), and all under one budget (--budget, default 540 s: no step
# starts with less than 10 s of it left, and none runs past it):
#   install  25  (--install-from DIR only) pip install --no-index --no-deps --target TMP DIR/*.whl, TMP first on
#                PYTHONPATH for every later step; then wheel_deps.py checks every requirement of those wheels
#                against what is installed (the machine's torch, triton, ... are never touched)
#   env      30  nvidia-smi; a C compiler (Triton builds its launcher with it); Python, torch, CUDA, Triton versions
#   compat   30  sparse_qwen.check_transformers(): the transformers features ZipR1 relies on (one line if missing)
#   tests   120  pytest -q -rs tests/test_kernels.py tests/test_sparse_attention.py (no -x: every test runs), on CUDA
#   ragged   90  benchmarks/ragged_check.py: B = 64, ℓ = 32k, bf16, per-row τ ~ U(0.05, 0.5); forward, backward,
#                decode with ragged key_valid, probe mass vs the torch reference
#   kernels  80  benchmarks/bench_kernels.py at ℓ = 32k, τ ∈ {0.25, 0.1}; names the SDPA backend of the dense baseline
#   3b      140  benchmarks/bench_3b.py, reduced: prefill at 8k and 32k with KV bytes (τ ≈ 0.25 by a 6-step
#                bisection), decode tok/s at 32k (batch 8), one ZipR1 step with its peak memory
# A step that fails or runs out of time does not stop the next ones (only a failed env step skips the GPU steps on
# a GPU run). After every step, DIR/summary.json (--log-dir; default a new /tmp folder) is rewritten with each
# step's result, seconds, limit, figures, Triton fallback warnings and skipped tests, so what ran comes back even
# when the run is cut off; DIR/STEP.log holds each step's full output. Exit 1 if any step did not pass.
# PYTHON defaults to `python`, else `python3` (the GPU machine has only python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS=(install env compat tests ragged kernels 3b)
declare -A LIMIT=([install]=25 [env]=30 [compat]=30 [tests]=120 [ragged]=90 [kernels]=80 [3b]=140)
declare -A DRY_LIMIT=([install]=120 [env]=120 [compat]=120 [tests]=900 [ragged]=300 [kernels]=300 [3b]=400)
usage() {
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--install-from DIR] [--log-dir DIR] [--budget S]" \
       "[--limit STEP=S] [--steps a,b]   (steps: ${STEPS[*]})" >&2
  exit 2
}
DRY_RUN=0 WHEELS="" LOG_DIR="${TMPDIR:-/tmp}/zipr1_gpu_check_$(date +%Y%m%d_%H%M%S)" BUDGET="" ONLY="" SET_LIMITS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install-from) [ $# -ge 2 ] || usage; WHEELS="$2"; shift ;;
    --log-dir) [ $# -ge 2 ] || usage; LOG_DIR="$2"; shift ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET="$2"; shift ;;
    --limit) [ $# -ge 2 ] || usage; SET_LIMITS+=("$2"); shift ;;
    --steps) [ $# -ge 2 ] || usage; ONLY=",$2," ; shift ;;
    *) usage ;;
  esac
  shift
done
if [ "$DRY_RUN" = 1 ]; then
  for s in "${STEPS[@]}"; do LIMIT[$s]=${DRY_LIMIT[$s]}; done
  BUDGET="${BUDGET:-3600}"
fi
BUDGET="${BUDGET:-540}"
read -r -a FROM_ENV <<< "${GPU_CHECK_LIMITS:-}"
for pair in "${FROM_ENV[@]}" "${SET_LIMITS[@]}"; do
  name="${pair%%=*}" value="${pair#*=}"
  if [ -z "${LIMIT[$name]+x}" ] || ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$value" -lt 1 ]; then
    echo "gpu_check.sh: bad limit '$pair': STEP=SECONDS with STEP one of ${STEPS[*]} and SECONDS >= 1" >&2; exit 2
  fi
  LIMIT[$name]=$value
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: bad --budget '$BUDGET': whole seconds" >&2; exit 2; }
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: --install-from $WHEELS: no .whl files there (make them with benchmarks/gpu_wheels.sh)" >&2; exit 2
fi
mkdir -p "$LOG_DIR" || exit 2
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$(command -v python || command -v python3 || true)"
  [ -n "$PYTHON" ] || { echo "gpu_check.sh: neither python nor python3 is on the PATH (set PYTHON)" >&2; exit 2; }
fi
unset ZIPR1_ATTN_BACKEND  # "auto": what a user's run does
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the kernels in Triton's interpreter, on the CPU
  MODE="dry run (CPU, TRITON_INTERPRET=1, tiny shapes)"
  RAGGED=(--dry-run) KERNELS=(--smoke --lengths 64 --taus 0.25,0.1) BENCH_3B=(--smoke --decode-lengths 512)
else
  unset TRITON_INTERPRET
  MODE="GPU"
  RAGGED=() KERNELS=(--lengths 32768 --taus 0.25,0.1)
  BENCH_3B=(--lengths 8192,32768 --bisect-iters 6 --repeats 1 --decode-lengths 32768 --decode-batches 8
            --decode-steps 32 --step-new-tokens 128)
fi
export PYTHONUNBUFFERED=1

START=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
declare -A RESULT SECS RC
for s in "${STEPS[@]}"; do RESULT[$s]="PENDING"; SECS[$s]=""; RC[$s]=""; done

json_str() {  # a JSON string of $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}; s=${s//$'\t'/ }; s=${s//$'\r'/}
  printf '"%s"' "$s"
}
json_lines() {  # a JSON list of the lines on stdin
  local first=1 line
  printf '['
  while IFS= read -r line; do
    [ "$first" = 1 ] || printf ', '
    first=0
    json_str "$line"
  done
  printf ']'
}
figures() {  # the lines of a step's log worth reading in the summary
  local log="$LOG_DIR/$1.log" pattern
  [ -f "$log" ] || return 0
  case "$1" in
    install) pattern='^(wheelhouse|Successfully|ERROR)' ;;
    env) pattern='^(python |triton |device 0|C compiler|no C compiler|nvidia-smi: not found|torch sees no)' ;;
    compat) pattern='^(transformers |ZipR1 needs)' ;;
    tests) pattern='([0-9]+ (passed|failed|skipped|error)|^(FAILED|ERROR) )' ;;
    ragged) pattern='^(# offsets|\| (forward|backward|decode|probe)|ragged check)' ;;
    kernels) pattern='^(- dense|goal|\| prefill incl|\| decode .*Triton)' ;;
    3b) pattern='^(\| [0-9]|ZipR1 needs)' ;;
  esac
  grep -E "$pattern" "$log" | head -n 40 || true
}
fallbacks() {  # Triton fallback warnings (zipr1_kernels warns once per kernel, in one line)
  [ -f "$LOG_DIR/$1.log" ] || return 0
  grep -oE 'zipr1_kernels: the Triton [a-z ]+ kernel failed \([A-Za-z]+(: [^)"]{0,80})?|.*fall back to torch' \
    "$LOG_DIR/$1.log" | sort -u | head -n 20 || true
}
skipped_tests() {  # pytest's "SKIPPED [n] file:line: reason" lines (-rs)
  [ -f "$LOG_DIR/$1.log" ] || return 0
  grep -E '^SKIPPED ' "$LOG_DIR/$1.log" | head -n 40 || true
}
write_summary() {  # $LOG_DIR/summary.json, rewritten after every step (written to a temp file, then moved)
  local s first=1 tmp="$LOG_DIR/.summary.json.tmp"
  {
    printf '{"mode": %s, "commit": %s, "python": %s, "budget_s": %s, "elapsed_s": %s, "done": %s, "log_dir": %s,\n' \
      "$(json_str "$MODE")" "$(json_str "$COMMIT")" "$(json_str "$PYTHON")" "$BUDGET" "$(( $(date +%s) - START ))" \
      "$1" "$(json_str "$LOG_DIR")"
    printf ' "steps": ['
    for s in "${STEPS[@]}"; do
      [ "$first" = 1 ] || printf ','
      first=0
      printf '\n  {"name": %s, "result": %s, "rc": %s, "seconds": %s, "limit_s": %s, "log": %s,\n' \
        "$(json_str "$s")" "$(json_str "${RESULT[$s]}")" "${RC[$s]:-null}" "${SECS[$s]:-null}" "${LIMIT[$s]}" \
        "$(json_str "$s.log")"
      printf '   "figures": %s,\n   "fallback_warnings": %s,\n   "skipped_tests": %s}' \
        "$(figures "$s" | json_lines)" "$(fallbacks "$s" | json_lines)" "$(skipped_tests "$s" | json_lines)"
    done
    printf '\n]}\n'
  } > "$tmp" && mv "$tmp" "$LOG_DIR/summary.json"
}

summary() {
  local code=0 s line
  write_summary true
  echo
  echo "==== gpu_check summary: $MODE, commit $COMMIT, $(( $(date +%s) - START )) s of $BUDGET, logs in $LOG_DIR ===="
  echo "| step | result | s | limit s | fallback warnings | skipped tests |"
  echo "|---|---|---|---|---|---|"
  for s in "${STEPS[@]}"; do
    echo "| $s | ${RESULT[$s]} | ${SECS[$s]:--} | ${LIMIT[$s]} | $(fallbacks "$s" | wc -l) | $(skipped_tests "$s" | wc -l) |"
    case "${RESULT[$s]}" in PASS) ;; "SKIPPED (not asked for)"*|"SKIPPED (no --install-from)") ;; *) code=1 ;; esac
  done
  for s in "${STEPS[@]}"; do
    { figures "$s"; fallbacks "$s" | sed 's/^/FALLBACK: /'; skipped_tests "$s"; } | while IFS= read -r line; do
      echo "$s: $line"
    done
  done
  echo "result: $([ "$code" = 0 ] && echo "all steps asked for passed" || echo "NOT all steps passed")"
  echo "summary.json: $LOG_DIR/summary.json"
  exit "$code"
}
trap summary EXIT
trap 'exit 130' INT TERM

run_step() {  # run_step NAME CMD...: output to the screen and $LOG_DIR/NAME.log, under min(limit, budget left)
  local name=$1 rc t0 left limit
  shift
  left=$(( BUDGET - ($(date +%s) - START) - 5 ))  # 5 s: the kill grace below
  limit=${LIMIT[$name]}
  if [ "$left" -lt 10 ]; then
    RESULT[$name]="SKIPPED (budget of $BUDGET s spent)"; write_summary false; return 0
  fi
  [ "$left" -ge "$limit" ] || limit=$left
  echo
  echo "==== $name (limit ${limit} s): $*"
  RESULT[$name]="RUNNING"; write_summary false
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > >(tee "$LOG_DIR/$name.log") 2>&1
  rc=$?
  wait 2>/dev/null  # the tee
  RC[$name]=$rc SECS[$name]=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) RESULT[$name]=PASS ;;
    124|137) RESULT[$name]="TIMEOUT after ${limit} s" ;;
    *) RESULT[$name]="FAIL (rc $rc)" ;;
  esac
  write_summary false
}
skip_step() { RESULT[$1]="SKIPPED ($2)"; write_summary false; }
asked() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

env_check() {  # exit 1 when the machine cannot run the GPU steps
  local ok=0 cc
  if command -v nvidia-smi >/dev/null; then nvidia-smi || ok=1
  else echo "nvidia-smi: not found"; [ "$DRY_RUN" = 1 ] || ok=1; fi
  cc="${CC:-$(command -v gcc || command -v clang || command -v cc || true)}"
  if [ -n "$cc" ]; then echo "C compiler for Triton's launcher: $cc ($("$cc" --version | head -n 1))"
  else
    echo "no C compiler (gcc, clang, cc or \$CC): Triton cannot build its launcher; the kernels would fall back to torch"
    ok=1
  fi
  "$PYTHON" - "$DRY_RUN" <<'EOF' || ok=1
import os, platform, sys
import torch
dry = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]} ({sys.executable}), glibc {platform.libc_ver()[1]}, torch {torch.__version__} "
      f"({os.path.dirname(torch.__file__)}), CUDA build {torch.version.cuda}, cuda available "
      f"{torch.cuda.is_available()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
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

install_wheels() {  # pip install the wheelhouse into $1 (never the machine's own packages), then check its needs
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$1" "$WHEELS"/*.whl || return 1
  PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/wheel_deps.py installed "$WHEELS"
}

echo "# gpu_check: $MODE; commit $COMMIT; python $PYTHON; budget $BUDGET s; logs and summary.json in $LOG_DIR"
write_summary false
if [ -z "$WHEELS" ]; then skip_step install "no --install-from"
elif ! asked install; then skip_step install "not asked for"
else
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/zipr1_wheels.XXXXXX")"
  run_step install bash -c "$(declare -f install_wheels); WHEELS='$WHEELS' PYTHON='$PYTHON' install_wheels '$SITE'"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # also after a failed install: what did install is used
fi
ENV_OK=1
if asked env; then
  run_step env bash -c "$(declare -f env_check); DRY_RUN=$DRY_RUN PYTHON='$PYTHON' env_check"
  [ "${RESULT[env]}" = PASS ] || ENV_OK=0
else skip_step env "not asked for"; fi
COMMANDS=(
  "compat|$PYTHON -c 'import sparse_qwen; print(sparse_qwen.check_transformers())'"
  "tests|$PYTHON -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_sparse_attention.py"
  "ragged|$PYTHON benchmarks/ragged_check.py ${RAGGED[*]}"
  "kernels|$PYTHON benchmarks/bench_kernels.py ${KERNELS[*]}"
  "3b|$PYTHON benchmarks/bench_3b.py ${BENCH_3B[*]}"
)
for entry in "${COMMANDS[@]}"; do
  name="${entry%%|*}" command="${entry#*|}"
  if ! asked "$name"; then skip_step "$name" "not asked for"
  elif [ "$ENV_OK" = 0 ] && [ "$DRY_RUN" = 0 ] && [ "$name" != compat ]; then
    skip_step "$name" "env failed: no usable GPU"
  else run_step "$name" bash -c "$command"; fi
done
