#!/bin/bash
# The two-tile W4 decode configs (c29-c33) and the L1-cached activation copies (c34-c36) on a GPU machine, from the
# repository root: build; the W4A8 kernel tests that run every decode config (odd tile counts, G1 against the general
# path bitwise, half outputs) and the rule tests; the KV4 attention / quantizer tests and a W4A16 subset (kernel files
# refactored without a GPU, twenty-fourth session); the issue-7 int8 bench with the defaults (skipped with BENCH=0);
# the paired A/B at M = 16 of c1 / c19 / c27 against c29-c36 (kernels_cuda/ab_decode_cfgs.py; configs from AB_CFGS);
# unless NCU=0, ncu's L1 / L2 / DRAM view of c1, c29 and c34 on g128 4096x22016 M = 16 (the question: do the 16-row
# W4 decodes wait on activation reads from L2?). About 8-9 minutes with the build.
# Set-up and build: kernels_cuda/device_build.sh (wheels the device lacks expected in .whl/).
source "$(dirname "$0")/device_build.sh"
T="tests/kernels/test_w8a8_w4a8_kv4_cuda.py"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider $T \
  -k "w4a8_matches or refuse or one_group_path or bitwise or half_outputs or rule" 2>&1 | tail -3
[ "${PIPESTATUS[0]}" = 124 ] && { echo "kernel tests timed out (a hang?)"; exit 1; }
# the twenty-fourth session's SASS-changing refactors (KV4 ring / v1 softmax step; the shared dev_info for W4A16)
timeout 120 python3 -m pytest -q -p no:cacheprovider $T -k "kv4_decode_attention or quantize" 2>&1 | tail -2
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_w4a16_cuda.py -k "default_matches or every_config" \
  2>&1 | tail -2
i8_bench
timeout 200 python3 kernels_cuda/ab_decode_cfgs.py 16 "${AB_CFGS:-1,19,27,29,30,31,32,33,31/2,32/2,33/2,33/4,34,35,36}" \
  w8a8,g128,chn "" "${AB_TGT:-0.03}" 2>&1 | tee "$OUT/ab16.txt" | tail -19
if [ "${NCU:-1}" != 0 ]; then
  for a in "g128 16 4096 22016 1 1" "g128 16 4096 22016 29 1" "g128 16 4096 22016 34 1"; do
    echo "--- ncu $a"
    QTOOL_I8_PDL=0 timeout 40 ncu --clock-control none --kernel-name regex:decode --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis python3 kernels_cuda/profile_i8.py $a 2>&1 \
      | grep -E "Duration|Throughput|Hit Rate|Busy|Bandwidth" | head -14
  done
fi
