#!/bin/bash
# W8A8 TMA-multicast configs c26-c28 on a GPU machine, from the repository root: build, the W8A8 kernel tests (their
# bitwise test against c6 first), the A/B against c6 and fp16 (kernels_cuda/ab_w8_tma.py; Ms and target seconds from
# AB_MS / AB_TGT), then the issue-7 int8 bench with QTOOL_I8_W8_TMA=$BENCH_TMA as the W8A8 large-M choice (skipped
# when BENCH_TMA is empty; "best": the A/B's fastest). Wheels the device lacks (omegaconf, antlr4, gguf) are expected in .whl/.
export QTOOL_HOME=${QTOOL_HOME:-/tmp/qm} PYTHONUNBUFFERED=1
OUT=${OUT:-.out}
mkdir -p "$OUT"
pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
t0=$(date +%s)
MAX_JOBS=16 python3 -c "from kernels_cuda import ops; ops.load(verbose=False)" 2>&1 | tail -3
echo "build $(( $(date +%s) - t0 )) s"
T="tests/kernels/test_w8a8_w4a8_kv4_cuda.py"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider $T -k "tma" 2>&1 | tail -4
[ "${PIPESTATUS[0]}" = 124 ] && { echo "c26-c28 tests timed out (a hang?)"; exit 1; }
timeout 120 python3 -m pytest -q -p no:cacheprovider $T -k "test_w8a8 or dequantizing" 2>&1 | tail -3
AB_BEST_FILE="$OUT/best_tma" timeout 300 python3 kernels_cuda/ab_w8_tma.py "${AB_MS:-1024,4096}" "${AB_TGT:-0.05}" "${AB_C20:-27}" 2>&1 \
  | tee "$OUT/ab.txt" | tail -16
[ "$BENCH_TMA" = best ] && BENCH_TMA=$(cat "$OUT/best_tma" 2>/dev/null)
if [ -n "$BENCH_TMA" ]; then
  echo "bench with QTOOL_I8_W8_TMA=$BENCH_TMA"
  QTOOL_I8_W8_TMA=$BENCH_TMA timeout 200 python3 kernels_cuda/check_issue7.py --no-check --no-sweep \
    --ms 1,16,256,1024,4096 --bench-ops w8a8,w4a8 --kv4-variants "" --out "$OUT/bench" 2>&1 | tail -30
fi
