#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine, sized to its lease (<= 8 minutes).
#
#   bash bench/gpu_check.sh [OUTDIR]        OUTDIR default: $OUT (the device tool's folder), else a temp dir
#
# Runs with the machine's own python3 and packages (PYTHONPATH=., no venv, installs nothing):
#   device          nvidia-smi, and both GPU backends must be available
#   pytest_gpu      pytest -m gpu (oracle tests of cupy and numba_cuda, model on the GPU)
#   memcheck, racecheck, synccheck
#                   compute-sanitizer on one small launch of every kernel of both backends
#                   (bench/gpu_sanitize.py); skipped with a line saying so if it is absent
#   kernels         every kernel's GFLOP/s, both backends, next to cupy.matmul of the same FLOPs
#   train_cupy, train_numba_cuda
#                   a 2C2F GloRo epoch of 60000 MNIST-shaped samples with device="gpu" on that
#                   backend, with host syncs per step
# Each step has a timeout and its own log in OUTDIR; OUTDIR/summary.txt is the one summary
# table (steps, then the measurements). Exit status: 0 only when every step passed.
# GPU_CHECK_STEPS="kernels train_cupy" runs only those steps (a rerun of what failed).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
PY=python3
DIR="${1:-${OUT:-}}"
[ -n "$DIR" ] || DIR="$(mktemp -d -t gloro_gpu_check.XXXXXX)"
mkdir -p "$DIR" || { echo "gpu_check: cannot create $DIR" >&2; exit 2; }
DIR="$(cd "$DIR" && pwd)"
SUMMARY="$DIR/summary.txt"
BUDGET_S="${GPU_CHECK_BUDGET_S:-440}"  # all steps; + kill grace and the report: < 8 min
T0=$(date +%s)
FAILED=0
ROWS=()

SAN=""
for cand in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
            /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then SAN="$cand"; break; fi
done

wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

row() { ROWS+=("$(printf '%-18s %-8s %5s %7s  %s' "$1" "$2" "$3" "$4" "$5")"); }

# step NAME LIMIT_S CMD...: run CMD under timeout (the smaller of LIMIT_S and what is left
# of the budget), log to DIR/NAME.log, add a row; a failure, a timeout or no time left fails
step() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$((BUDGET_S - ($(date +%s) - T0)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        row "$name" FAIL - - "not run: the ${BUDGET_S}s budget is spent"
        FAILED=1
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    local s=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - s)) status=PASS detail
    detail="$(grep -v '^\s*$' "$DIR/$name.log" | tail -1 | cut -c1-110)"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=FAIL detail="timed out after ${limit}s; $detail"
    elif [ "$rc" -ne 0 ]; then
        status=FAIL
    fi
    [ "$status" = PASS ] || FAILED=1
    row "$name" "$status" "$rc" "${dt}s" "$detail"
    echo "   $status (rc $rc, ${dt}s): $detail"
}

step device 30 "$PY" - <<'PY'
import subprocess, sys
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip())
except Exception as exc:
    print(f"nvidia-smi: {exc}")
import importlib
missing = []
for mod in ("numpy", "numba", "scipy", "threadpoolctl", "tqdm", "cupy", "pytest", "hypothesis"):
    try:  # the project's dependencies: nothing can be installed on a lent machine
        m = importlib.import_module(mod)
        print(f"{mod:13s} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # threadpoolctl, tqdm, scipy, hypothesis: some features or tests only
        if mod in ("numpy", "numba", "cupy", "pytest"):
            missing.append(mod)
        print(f"{mod:13s} MISSING: {type(exc).__name__}: {exc}")
print("python", sys.version.split()[0])
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print(f"cupy: {type(exc).__name__}: {exc}")
from kernels import registry
avail = registry.availability()
for b in ("cupy", "numba_cuda"):
    print(f"{b:11s}", "available" if avail[b] is None else f"UNAVAILABLE: {avail[b]}")
bad = [b for b in ("cupy", "numba_cuda") if avail[b] is not None]
print(("both GPU backends available" if not bad else f"no GPU backend: {', '.join(bad)}")
      + (f"; missing packages: {', '.join(missing)}" if missing else ""))
sys.exit(1 if bad or missing else 0)
PY

step pytest_gpu 120 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests

for tool in memcheck racecheck synccheck; do
    wanted "$tool" || continue
    if [ -z "$SAN" ]; then
        row "$tool" SKIPPED - - "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        echo "== $tool: SKIPPED, compute-sanitizer not found"
        continue
    fi
    step "$tool" 50 "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" bench/gpu_sanitize.py
done

step kernels 60 "$PY" bench/gpu_bench.py kernels --reps 10 --json "$DIR/kernels.json"

for be in cupy numba_cuda; do
    step "train_$be" 70 "$PY" bench/gpu_bench.py train --arch 2C2F --n 60000 --n-test 10000 --batch 256 \
        --backend "$be" --out "$DIR/run_$be" --json "$DIR/train_$be.json"
done

{
    echo "GPU check, $(date -u +%FT%TZ), $(($(date +%s) - T0))s of ${BUDGET_S}s, logs in $DIR"
    printf '%-18s %-8s %5s %7s  %s\n' step status rc time "last log line"
    printf '%s\n' "${ROWS[@]}"
    echo
    pyline="$(grep -E '(passed|failed|skipped|error)' "$DIR/pytest_gpu.log" 2>/dev/null | tail -1)"
    timeout 20 "$PY" bench/gpu_bench.py report --kernels "$DIR/kernels.json" \
        --train "$DIR/train_cupy.json" --train "$DIR/train_numba_cuda.json" \
        --pytest-line "${pyline:-not run}" 2>&1
    echo
    echo "overall: $([ "$FAILED" -eq 0 ] && echo PASS || echo FAIL)"
} >"$SUMMARY"
echo
cat "$SUMMARY"
exit "$FAILED"
