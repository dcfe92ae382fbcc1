#!/usr/bin/env bash
# GPU check, for a machine with a CUDA device (CPU-only CI runs tests/kernels/test_cuda_compile.py
# and test_numba_cuda_sim.py instead):
#   1. pytest -m gpu            every gpu-marked test (oracle tests of cupy and numba_cuda, ...)
#   2. kernel benchmark         both GPU backends, GFLOP/s next to cupy.matmul of the same FLOPs
#   3. one GloRo 2C2F epoch     synthetic MNIST-shaped data, 60000 samples, batch 256, cupy backend
# and prints one summary table at the end. Outputs land in $GPU_CHECK_OUT (default a temp dir).
# Usage: bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t gloro_gpu_check.XXXXXX)}"
mkdir -p "$OUT"
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not found)"
"$PY" - <<'PY'
from kernels import registry
for b in ("cupy", "numba_cuda"):
    why = registry.availability()[b]
    print(f"  {b:11s}", "available" if why is None else f"UNAVAILABLE: {why}")
PY

echo "== 1. pytest -m gpu"
"$PY" -m pytest -q -m gpu -rs tests 2>&1 | tee "$OUT/pytest_gpu.txt"
rc_pytest=${PIPESTATUS[0]}
pytest_line="$(grep -E '(passed|failed|skipped|error)' "$OUT/pytest_gpu.txt" | tail -1)"

echo "== 2. kernel benchmark"
"$PY" bench/gpu_bench.py kernels --json "$OUT/kernels.json"
rc_kernels=$?

echo "== 3. GloRo 2C2F epoch (synthetic 60000 x 1x28x28, batch 256, backend cupy)"
"$PY" bench/gpu_bench.py train --arch 2C2F --n 60000 --batch 256 --backend cupy --json "$OUT/train.json"
rc_train=$?

echo
echo "================ GPU check summary (outputs in $OUT) ================"
"$PY" bench/gpu_bench.py report "$OUT/kernels.json" "$OUT/train.json" --pytest-line "${pytest_line:-none} (rc $rc_pytest)"
echo "exit codes: pytest $rc_pytest, kernels $rc_kernels, train $rc_train"
[ "$rc_pytest" -eq 0 ] && [ "$rc_kernels" -eq 0 ] && [ "$rc_train" -eq 0 ]
