#!/usr/bin/env python3
"""Run one int8 GEMM problem a few times (for ncu / compute-sanitizer).

    python kernels_cuda/profile_i8.py FMT M K N [cfg] [split] [out]   FMT: w8 | chn | gNN (group size NN, e.g. g128);
                                                                      out: fp16 | bf16 | fp32 (W8 default fp16, W4 fp32)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import random_w4a8  # noqa: E402

fmt = sys.argv[1]
M, K, N = (int(v) for v in sys.argv[2:5])
cfg = int(sys.argv[5]) if len(sys.argv) > 5 else -1
split = int(sys.argv[6]) if len(sys.argv) > 6 else 0
ops.load()
gen = torch.Generator(device="cuda").manual_seed(0)
xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.01
odt = sys.argv[7] if len(sys.argv) > 7 else ("fp16" if fmt == "w8" else "fp32")
dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
out = torch.empty(M, N, device="cuda", dtype=dtypes[odt])
if fmt == "w8":
    w = torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
    ws = torch.rand(N, device="cuda", generator=gen) * 1e-3
    for _ in range(3):
        ops.w8a8_gemm_out(xq, xs, w, ws, None, out, cfg, split)
else:
    g = -1 if fmt == "chn" else int(fmt[1:])  # gNN: group size NN
    t = random_w4a8(K, N, g, "cuda", gen)
    xsum = xq.float().sum(-1, keepdim=True) * xs if g < 0 else None
    for _ in range(3):
        ops.w4a8_gemm_out(xq, xs, xsum, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"),
                          t.get("s2_zeros"), g, None, out, cfg, split)
torch.cuda.synchronize()
print("ok", fmt, M, K, N, cfg, split)
