#!/usr/bin/env python3
"""Times the int8 decode defaults (W8A8, W4A8 g128, W4A8 per-channel) at M = 1 / 4 / 16 on four Llama shapes and
prints each row with its ratio to W8A8 and the medians; for A/B runs of one build under environment switches
(QTOOL_I8_DECODE_G1, QTOOL_I8_PDL, QTOOL_I8_DECODE_SW), e.g.

    QTOOL_I8_DECODE_G1=0 python3 kernels_cuda/ab_decode_i8.py base
    QTOOL_I8_DECODE_G1=1 python3 kernels_cuda/ab_decode_i8.py g1
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_rotating  # noqa: E402



def timed(fn, weights):
    """µs per call of fn over the rotated weight copies (L2 cold)."""
    return time_rotating([lambda t=t: fn(t) for t in weights], target_s=0.03, max_reps=60)


ops.load(verbose=False)
tag = sys.argv[1] if len(sys.argv) > 1 else "run"
rat = {"g128": [], "chn": []}
for K, N in ((4096, 4096), (4096, 22016), (11008, 4096), (14336, 4096)):
    w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
    w4 = make_w4a8_weights(K, N, 128, _copies(K * N // 2, 192 << 20))
    w4c = make_w4a8_weights(K, N, -1, _copies(K * N // 2, 192 << 20))
    for M in (1, 4, 16):
        xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        xs = torch.rand(M, 1, device="cuda") * 0.01
        xsum = xq.float().sum(-1, keepdim=True) * xs
        o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
        o32 = torch.empty(M, N, device="cuda")
        t8 = timed(lambda t: ops.w8a8_gemm_out(xq, xs, t[0], t[1], None, o16, -1, 0), w8)
        tg = timed(lambda t: ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"],
                                               t["s2_zeros"], 128, None, o32, -1, 0), w4)
        tc = timed(lambda t: ops.w4a8_gemm_out(xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None,
                                               -1, None, o32, -1, 0), w4c)
        rat["g128"].append(t8 / tg)
        rat["chn"].append(t8 / tc)
        cfg = ops.i8_choose(ops.FMT_W4PG, M, N, K)
        print(f"[{tag}] {K}x{N} M={M:2d} w8 {t8:6.1f} g128 {tg:6.1f} ({t8 / tg:.2f}) chn {tc:6.1f} ({t8 / tc:.2f}) "
              f"cfg g128 {cfg}")
    del w8, w4, w4c
    torch.cuda.empty_cache()
print(f"[{tag}] median x w8a8: g128 {statistics.median(rat['g128']):.2f} chn {statistics.median(rat['chn']):.2f}")
