#!/bin/bash
# Config c25 (W4A8 per-group, dequantization inside the W8A8 launch) on a GPU machine, from the repository root:
# build, the W4A8 kernel tests (c25's bitwise test against c20 among them), then the A/B against c20 and the W8A8
# default (kernels_cuda/ab_peer_i8.py; Ms and the paired timing's target seconds from AB_MS / AB_TGT).
# Set-up and build: kernels_cuda/device_build.sh (wheels the device lacks expected in .whl/).
source "$(dirname "$0")/device_build.sh"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_w8a8_w4a8_kv4_cuda.py \
  -k "test_w4a8 or every_config" 2>&1 | tail -3
timeout 300 python3 kernels_cuda/ab_peer_i8.py "${AB_MS:-1024,4096}" "${AB_TGT:-0.05}" 2>&1 | tee "$OUT/ab.txt" | tail -20
