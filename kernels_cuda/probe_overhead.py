#!/usr/bin/env python3
"""Fixed per-call cost of the decode W4A16 kernels (one GPU call): the same harness as the bench
(CUDA graph of back-to-back calls, median of replays) on problems with almost no bytes, beside a
trivial PyTorch kernel and F.linear at the same sizes.

    PYTHONUNBUFFERED=1 python kernels_cuda/probe_overhead.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import make_w4a16_weights, time_rotating  # noqa: E402


def main() -> int:
    ops.load(verbose=False)
    t = torch.zeros(16, device="cuda")
    print(f"trivial add_ kernel: {time_rotating([lambda: t.add_(1)] * 16, target_s=0.05):.2f} us", flush=True)
    for K, N in ((512, 128), (4096, 128), (4096, 1024), (4096, 4096)):
        wq = make_w4a16_weights(K, N, 128, 16)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(8)]
        line = f"K={K:5d} N={N:5d} M=1: fp16 {time_rotating([lambda w=w: F.linear(x, w) for w in w16], target_s=0.05):5.2f}"
        for mode in ("0", "1", "2"):
            os.environ["QTOOL_W4A16_PDL"] = mode
            for c, s in ((2, 1), (2, 8), (20, 1), (20, 4), (20, 8)):
                if not ops.config_fits(c, N, K, 128, s):
                    continue
                us = time_rotating([lambda q=q: ops.w4a16_gemm_cfg(x, q["qweight"], q["scales"], q["qzeros"], 128, c, s)
                                    for q in wq], target_s=0.05)
                line += f" | p{mode} c{c}/s{s} {us:5.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
