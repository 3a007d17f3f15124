#!/usr/bin/env python3
"""W8A8 and W4A8 at large M on the five bench shapes, timed paired (`qtool.bench.time_paired`: the ops' graphs
replayed in alternating rounds over L2-rotated weight copies): `F.linear` fp16; c6 with its TMA-store epilogue and
with the int32 tile through shared memory (QTOOL_I8_TMA_OUT=0); the TMA-multicast config c26; W4A8 g128 through c20;
per-channel W4A8 through c10 and through c20 (q4 unpacked to int8, then c6's kernel). Then c6's time over K at one
wave (its cost outside the k loop). Usage:

    python3 kernels_cuda/ab_w8_tma.py [Ms, default 1024,4096] [target seconds, default 0.05]
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_paired, time_rotating  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))
ROT = 192 << 20


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,4096").split(",")]
    tgt = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    ops.load(verbose=False)
    rows = []
    for K, N in SHAPES:
        w8 = make_w8a8_weights(K, N, _copies(K * N, ROT))
        w4s = make_w4a8_weights(K, N, 128, _copies(K * N // 2, ROT))
        gen = torch.Generator(device="cuda").manual_seed(2)
        w16 = [torch.randn(N, K, device="cuda", generator=gen, dtype=torch.float16) * 0.02
               for _ in range(_copies(2 * K * N, ROT))]
        w4c = make_w4a8_weights(K, N, -1, _copies(K * N // 2, ROT))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            xsum = torch.randn(M, 1, device="cuda")
            xh = xq.half()
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)

            def env(v, f):
                os.environ["QTOOL_I8_TMA_OUT"] = v
                try:
                    f()
                finally:
                    os.environ.pop("QTOOL_I8_TMA_OUT", None)

            sets = {
                "fp16": [lambda w=w: F.linear(xh, w) for w in w16],
                "c6": [lambda w=w: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, 6, 1) for w in w8],
                "c6 old epi": [lambda w=w: env("0", lambda: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, 6, 1))
                               for w in w8],
                "c26": [lambda w=w: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, 26, 1) for w in w8],
                "g128 c20": [lambda t=t: ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None,
                                                           t["s2_scales"], t["s2_zeros"], 128, None, o16, 20, 0)
                             for t in w4s],
                "chn c10": [lambda t=t: ops.w4a8_gemm_out(xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"],
                                                          None, None, -1, None, o16, 10, 0) for t in w4c],
                "chn c20": [lambda t=t: ops.w4a8_gemm_out(xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"],
                                                          None, None, -1, None, o16, 20, 0) for t in w4c],
            }
            ts = dict(zip(sets, time_paired(list(sets.values()), target_s=tgt)))
            rows.append({"K": K, "N": N, "M": M, **ts})
            t6 = ts["c6"]
            print(f"{K}x{N} M={M:5d} fp16 {ts['fp16']:6.1f} | c6 {t6:6.1f} x{ts['fp16'] / t6:.3f} "
                  f"{2 * M * K * N / (t6 * 1e-6) / 1e12:5.0f}T | old epi {ts['c6 old epi']:6.1f} | c26 {ts['c26']:6.1f}"
                  f" | g128 c20 {ts['g128 c20']:6.1f} ({t6 / ts['g128 c20']:.3f}) | chn c10 {ts['chn c10']:6.1f} "
                  f"({t6 / ts['chn c10']:.3f}) c20 {ts['chn c20']:6.1f} ({t6 / ts['chn c20']:.3f})", flush=True)
        del w8, w4s, w4c, w16
        torch.cuda.empty_cache()
    print("\nmedian per M     M  c6 xfp16  c6(old epi) xfp16  c26/c6  g128 c20/c6  chn c10/c6  chn c20/c6")
    for M in ms:
        r = [x for x in rows if x["M"] == M]

        def med(a, b):
            return statistics.median(x[a] / x[b] for x in r)

        print(f"{'':12s}{M:5d}  {med('fp16', 'c6'):8.3f}  {med('fp16', 'c6 old epi'):17.3f}  {med('c6', 'c26'):6.3f}"
              f"  {med('c6', 'g128 c20'):11.3f}  {med('c6', 'chn c10'):10.3f}  {med('c6', 'chn c20'):10.3f}")
    # c6's cost outside its k loop: M = 1024, N = 4096 (128 tiles, one wave) over K; the intercept of the line
    print("\nc6, M = 1024, N = 4096, block-timed over K (one wave of 128 tiles):")
    pts = []
    for K in (128, 256, 512, 1024, 2048, 4096, 8192):
        w8 = make_w8a8_weights(K, 4096, _copies(K * 4096, ROT))
        xq = torch.randint(-127, 128, (1024, K), device="cuda", dtype=torch.int8)
        xs = torch.rand(1024, 1, device="cuda") * 0.01
        o16 = torch.empty(1024, 4096, device="cuda", dtype=torch.float16)
        t = time_rotating([lambda w=w: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, 6, 1) for w in w8], tgt)
        pts.append((K // 128, t))
        print(f"  K {K:5d}: {t:7.2f} us")
    n = len(pts)
    mx, my = sum(k for k, _ in pts) / n, sum(t for _, t in pts) / n
    slope = sum((k - mx) * (t - my) for k, t in pts) / sum((k - mx) ** 2 for k, _ in pts)
    print(f"  fit: {my - slope * mx:.2f} us + {slope:.3f} us per k-tile of 128")
    return 0


if __name__ == "__main__":
    sys.exit(main())
