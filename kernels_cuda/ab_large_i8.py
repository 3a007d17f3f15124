#!/usr/bin/env python3
"""W4A8 per-group g128 beyond decode: the fused kernels (the default before the dequantizing config) against the
dequantizing config c20 (int8 weights written to scratch memory, then the W8A8 GEMM; fp32 and fp16 out) and the W8A8
default (fp16 out) they are measured against, on the five bench shapes; also the dequantizing kernel alone (µs and
GB/s of its reads + writes) and a bitwise check of c20 against the fused result. Usage:

    python3 kernels_cuda/ab_large_i8.py [Ms, default 64,256,512,1024,2048,4096]
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_rotating  # noqa: E402


def timed(fn, weights):
    """µs per call of fn over the rotated weight copies (L2 cold)."""
    return time_rotating([lambda t=t: fn(t) for t in weights], target_s=0.03, max_reps=40)


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "64,256,512,1024,2048,4096").split(",")]
    ops.load(verbose=False)
    rows, bad = [], 0
    for K, N in ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096)):
        w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
        w4s = make_w4a8_weights(K, N, 128, _copies(K * N // 2, 192 << 20))
        t_dq = timed(lambda t: ops.w4a8_dequantize(t["qweight"], t["s2_scales"], t["s2_zeros"], 128), w4s)
        gbs = (K * N * 1.5 + 2 * K * N / 128 * 2) / t_dq / 1e3
        print(f"{K}x{N} dequantize alone {t_dq:6.1f} us ({gbs:.0f} GB/s)", flush=True)
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            o32 = torch.empty(M, N, device="cuda")

            def g128(cfg, o=o32):
                return lambda t: ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"],
                                                   t["s2_zeros"], 128, None, o, cfg, 0)

            t8 = timed(lambda t: ops.w8a8_gemm_out(xq, xs, t[0], t[1], None, o16, -1, 0), w8)
            os.environ["QTOOL_I8_W4PG_DQ"] = "0"
            fused_cfg = ops.i8_choose(ops.FMT_W4PG, M, N, K)
            tf = timed(g128(-1), w4s)
            g128(-1)(w4s[0])
            ref = o32.clone()
            os.environ.pop("QTOOL_I8_W4PG_DQ")
            tq = timed(g128(20), w4s)
            o32.fill_(float("nan"))
            g128(20)(w4s[0])
            same = torch.equal(o32, ref)
            # fp16 out (what a layer returns): the same fp32 value rounded once in the kernel's store
            tq16 = timed(g128(20, o16), w4s)
            o16.fill_(float("nan"))
            g128(20, o16)(w4s[0])
            same = same and torch.equal(o16, ref.half())
            bad += not same
            rows.append((K, N, M, t8, tf, tq, tq16))
            print(f"{K}x{N} M={M:4d} w8a8 {t8:7.1f} | fused c{fused_cfg[0]}/s{fused_cfg[1]} {tf:7.1f} ({t8 / tf:.2f}) | "
                  f"dq c20 {tq:7.1f} ({t8 / tq:.2f}) | c20 fp16 out {tq16:7.1f} ({t8 / tq16:.2f}) | default "
                  f"{ops.i8_choose(ops.FMT_W4PG, M, N, K)} {'bitwise equal' if same else 'DIFFERENT'}", flush=True)
        del w8, w4s
        torch.cuda.empty_cache()
    big = [r for r in rows if r[2] >= 1024]
    if big:
        print(f"M>=1024 median x w8a8: fused {statistics.median(r[3] / r[4] for r in big):.2f}, "
              f"dq {statistics.median(r[3] / r[5] for r in big):.2f}, dq fp16 out "
              f"{statistics.median(r[3] / r[6] for r in big):.2f}, best-of "
              f"{statistics.median(r[3] / min(r[4], r[5]) for r in big):.2f}")
    print("ALL BITWISE EQUAL" if not bad else f"{bad} rows DIFFER")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
