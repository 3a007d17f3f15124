#!/usr/bin/env python3
"""W8A8 at large M: c6 (the default) and the TMA-multicast config c26 against `F.linear` fp16 on the five bench
shapes, timed paired (`qtool.bench.time_paired`: the ops' graphs replayed in alternating rounds over L2-rotated weight
copies), with W4A8 g128 through c20 (dequantize, then the W8A8 default GEMM) against c6. Then, as a check of the
bench's own method, c6 / fp16 paired three ways: alone, beside `torch._int_mm` (as `qtool bench` pairs them), and
block-timed. Bitwise equality of c26 with c6 is
`tests/kernels/test_w8a8_w4a8_kv4_cuda.py::test_w8a8_tma_config_bitwise_equal_to_c6`. Usage:

    python3 kernels_cuda/ab_w8_tma.py [Ms, default 1024,4096] [target seconds, default 0.05]
"""
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
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            xh = xq.half()
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            c16 = [lambda w=w: F.linear(xh, w) for w in w16]
            c6, c26 = ([lambda w=w, c=c: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, c, 1) for w in w8]
                       for c in (6, 26))
            cim = [lambda w=w: torch._int_mm(xq, w[0].t()) for w in w8]
            c20 = [lambda t=t: ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"],
                                                 t["s2_zeros"], 128, None, o16, 20, 0) for t in w4s]
            t16, t6, t26, t20 = time_paired([c16, c6, c26, c20], target_s=tgt)
            p2 = time_paired([c6, c16], target_s=tgt)
            p3 = time_paired([c6, c16, cim], target_s=tgt)
            b6, b16 = time_rotating(c6, tgt), time_rotating(c16, tgt)
            r = {"K": K, "N": N, "M": M, "fp16": t16, "c6": t6, "c26": t26, "c20": t20,
                 "x_all": t16 / t6, "x_pair": p2[1] / p2[0], "x_pair_imm": p3[1] / p3[0], "x_block": b16 / b6}
            rows.append(r)
            tops = 2 * M * K * N / (t6 * 1e-6) / 1e12
            print(f"{K}x{N} M={M:5d} fp16 {t16:7.1f} | c6 {t6:7.1f} x{t16 / t6:.3f} {tops:5.0f}T | c26 {t26:7.1f} "
                  f"x{t16 / t26:.3f} | g128 c20 {t20:7.1f} ({t6 / t20:.3f}) || c6 x fp16: pair {r['x_pair']:.3f} "
                  f"pair+_int_mm {r['x_pair_imm']:.3f} block {r['x_block']:.3f}", flush=True)
        del w8, w4s, w16
        torch.cuda.empty_cache()
    print("\nmedian per M        M  c6 xfp16  c26 xfp16  c26/c6  g128/c6 | c6 xfp16: pair  pair+_int_mm  block")
    for M in ms:
        r = [x for x in rows if x["M"] == M]

        def med(f):
            return statistics.median(f(x) for x in r)

        print(f"{'':15s}{M:5d}  {med(lambda x: x['fp16'] / x['c6']):8.3f}  {med(lambda x: x['fp16'] / x['c26']):9.3f}"
              f"  {med(lambda x: x['c6'] / x['c26']):6.3f}  {med(lambda x: x['c6'] / x['c20']):7.3f} |"
              f"       {med(lambda x: x['x_pair']):.3f}  {med(lambda x: x['x_pair_imm']):12.3f}"
              f"  {med(lambda x: x['x_block']):5.3f}")
    r = rows
    print(f"all M >= 1024: c6 x fp16 median, paired with c26/c20 {statistics.median(x['x_all'] for x in r):.3f}, "
          f"pair {statistics.median(x['x_pair'] for x in r):.3f}, pair+_int_mm "
          f"{statistics.median(x['x_pair_imm'] for x in r):.3f}, block {statistics.median(x['x_block'] for x in r):.3f}")
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
