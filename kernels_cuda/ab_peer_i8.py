#!/usr/bin/env python3
"""W4A8 per-group g128 at large M: the peer-dequantizing config c25 (one launch: the CTAs of a weight column
dequantize it together ahead of their W8A8 main loop) against c20 (the dequantizing kernel, then the W8A8 GEMM)
and the W8A8 default, on the five bench shapes, timed paired (`qtool.bench.time_paired`: the three ops' graphs
replayed in alternating rounds over L2-rotated weight copies). c25's bitwise equality with c20 is
`tests/kernels/test_w8a8_w4a8_kv4_cuda.py::test_w4a8_peer_config_bitwise_equal_to_dequantizing`
(kernels_cuda/check_peer_device.sh runs it first). Usage:

    python3 kernels_cuda/ab_peer_i8.py [Ms, default 512,1024,2048,4096] [target seconds, default 0.1]
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_paired  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))


def g128_call(xq, xs, t, out, cfg, group=128):
    return lambda: ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"],
                                     t["s2_zeros"], group, None, out, cfg, 0)


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "512,1024,2048,4096").split(",")]
    tgt = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    ops.load(verbose=False)
    rows = []
    for K, N in SHAPES:
        w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
        w4s = make_w4a8_weights(K, N, 128, _copies(K * N // 2, 192 << 20))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            c8 = [lambda w=w: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, -1, 0) for w in w8]
            c20 = [g128_call(xq, xs, t, o16, 20) for t in w4s]
            c25 = [g128_call(xq, xs, t, o16, 25) for t in w4s]
            t8, t20, t25 = time_paired([c8, c20, c25], target_s=tgt)
            rows.append((K, N, M, t8, t20, t25))
            print(f"{K}x{N} M={M:5d} w8a8 {t8:7.1f} | c20 {t20:7.1f} ({t8 / t20:.3f}) | c25 {t25:7.1f} "
                  f"({t8 / t25:.3f})", flush=True)
        del w8, w4s
        torch.cuda.empty_cache()
    print("\nmedian x W8A8 (paired) per M:   M      c20     c25")
    for M in ms:
        r = [x for x in rows if x[2] == M]
        med = [statistics.median(x[3] / x[i] for x in r) for i in (4, 5)]
        print(f"{'':31s}{M:5d}   " + "   ".join(f"{v:.3f}" for v in med) +
              f"   (min c25 {min(x[3] / x[5] for x in r):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
