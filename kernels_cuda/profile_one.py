#!/usr/bin/env python3
"""Run one W4A16 problem a few times (for ncu / compute-sanitizer).

    python kernels_cuda/profile_one.py M K N [cfg] [split] [group]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from kernels_cuda.reference import random_problem  # noqa: E402

M, K, N = (int(v) for v in sys.argv[1:4])
cfg = int(sys.argv[4]) if len(sys.argv) > 4 else -1
split = int(sys.argv[5]) if len(sys.argv) > 5 else 0
g = int(sys.argv[6]) if len(sys.argv) > 6 else 128
ops.load()
x, q, z, s, t = random_problem(M, N, K, g)
for _ in range(3):
    y = ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], g, cfg, split)
torch.cuda.synchronize()
print("ok", tuple(y.shape), ops.choose(M, N, K, g))
