#!/bin/bash
# The dequantizing config c20 on a GPU machine, from the repository root: build, the c20 tests (dequantizing variants,
# the chained GEMM, bitwise), the A/B of its variants (kernels_cuda/ab_dequant.py; Ms and target seconds from AB_MS /
# AB_TGT), the issue-7 int8 bench with the defaults (skipped with BENCH=0), then the whole int8 kernel test file.
# Wheels the device lacks (omegaconf, antlr4, gguf) are expected in .whl/.
export QTOOL_HOME=${QTOOL_HOME:-/tmp/qm} PYTHONUNBUFFERED=1
OUT=${OUT:-.out}
mkdir -p "$OUT"
pip install -q --no-deps .whl/*.whl 2>&1 | grep -v "root user" | tail -1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
t0=$(date +%s)
MAX_JOBS=16 python3 -c "from kernels_cuda import ops; ops.load(verbose=False)" 2>&1 | tail -3
echo "build $(( $(date +%s) - t0 )) s"
T="tests/kernels/test_w8a8_w4a8_kv4_cuda.py"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider $T -k "dequantiz" 2>&1 | tail -2
[ "${PIPESTATUS[0]}" = 124 ] && { echo "c20 tests timed out (a hang?)"; exit 1; }
timeout 240 python3 kernels_cuda/ab_dequant.py "${AB_MS:-1024,4096}" "${AB_TGT:-0.05}" 2>&1 | tee "$OUT/ab.txt" | tail -40
if [ "${BENCH:-1}" != 0 ]; then
  timeout 200 python3 kernels_cuda/check_issue7.py --no-check --no-sweep \
    --ms 1,16,256,1024,4096 --bench-ops w8a8,w4a8 --kv4-variants "" --out "$OUT/bench" 2>&1 | tail -9
fi
if [ "${FULL:-1}" != 0 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider $T -k "not kv4_decode" 2>&1 | tail -2
fi
