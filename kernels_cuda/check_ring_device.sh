#!/bin/bash
# The twenty-fifth session's pending device call, from the repository root on a GPU machine: build; the int8 kernel
# tests but the KV4 decode ones (every decode config, c37-c47 included; the rule tests assert c37 / c40 at 9-16 rows);
# the issue-7 int8 bench with the defaults (skipped with BENCH=0); the paired A/B at M = 16 of the exploratory ring
# configs c43-c47 against c19 / c37 and the defaults (kernels_cuda/ab_decode_cfgs.py; configs from AB_CFGS).
# About 2-3 minutes with the build. Set-up and build: kernels_cuda/device_build.sh (wheels expected in .whl/).
source "$(dirname "$0")/device_build.sh"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_w8a8_w4a8_kv4_cuda.py -k "not kv4_decode" \
  2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 124 ] && { echo "kernel tests timed out (a hang?)"; exit 1; }
i8_bench
timeout 300 python3 kernels_cuda/ab_decode_cfgs.py 16 "${AB_CFGS:-19,37,43,44,45,46/1,47/1}" \
  w8a8,g128,chn "" "${AB_TGT:-0.03}" 2>&1 | tee "$OUT/ab16.txt" | tail -19
