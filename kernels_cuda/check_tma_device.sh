#!/bin/bash
# W8A8 at large M on a GPU machine, from the repository root: build, the int8 GEMM kernel tests (c26's bitwise test
# against c6 first), the A/B of c6 / c26 / fp16 with the pairing check (kernels_cuda/ab_w8_tma.py; Ms and target
# seconds from AB_MS / AB_TGT), then the issue-7 int8 bench with the defaults (skipped with BENCH=0).
# Set-up and build: kernels_cuda/device_build.sh (wheels the device lacks expected in .whl/).
source "$(dirname "$0")/device_build.sh"
T="tests/kernels/test_w8a8_w4a8_kv4_cuda.py"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider $T -k "tma or per_channel_dequantizing" 2>&1 | tail -2
[ "${PIPESTATUS[0]}" = 124 ] && { echo "new kernel tests timed out (a hang?)"; exit 1; }
timeout 180 python3 -m pytest -q -p no:cacheprovider $T -k "not kv4_decode" 2>&1 | tail -2
timeout 300 python3 kernels_cuda/ab_w8_tma.py "${AB_MS:-1024,4096}" "${AB_TGT:-0.05}" 2>&1 | tee "$OUT/ab.txt" | tail -30
i8_bench
