#!/bin/bash
# The int8 GEMM engine's decode configs on a GPU machine, from the repository root: build; the int8 kernel tests but
# the KV4 decode ones (every live decode config against the integer reference, G1 bitwise, the default-rule and
# refusal tests, the retired ids refused; TESTS_K sets the pytest -k filter instead, TESTS_K= runs the whole file,
# KV4 attention included); the issue-7 int8 bench with the defaults (skipped with BENCH=0; PK_BENCH=1 runs it again
# with QTOOL_I8_DECODE_PK=1, the per-group scales packed for the decode kernels, into $OUT/bench_pk); and, when
# AB_CFGS names configs (e.g. AB_CFGS=19,40/1,47/1; "-" for the defaults only), their paired A/B against the defaults
# at the M of AB_MS (default 16) for the formats of AB_FMTS (default w8a8,g128,chn; g128pk = g128 with packed scales;
# kernels_cuda/ab_decode_cfgs.py). About 2-3 minutes with the build. Set-up and build: kernels_cuda/device_build.sh
# (wheels expected in .whl/).
source "$(dirname "$0")/device_build.sh"
timeout 360 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_w8a8_w4a8_kv4_cuda.py -k "${TESTS_K-not kv4_decode}" \
  2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 124 ] && { echo "kernel tests timed out (a hang?)"; exit 1; }
i8_bench
if [ "${PK_BENCH:-0}" = 1 ]; then QTOOL_I8_DECODE_PK=1 i8_bench bench_pk; fi
if [ -n "${AB_CFGS:-}" ]; then
  timeout 300 python3 kernels_cuda/ab_decode_cfgs.py "${AB_MS:-16}" "$AB_CFGS" "${AB_FMTS:-w8a8,g128,chn}" "" \
    "${AB_TGT:-0.03}" 2>&1 \
    | tee "$OUT/ab.txt" | tail -19
fi
