#!/usr/bin/env python3
"""W8A8 at large M: the TMA-multicast configs c26 (weights shared by 2 row tiles), c27 (4 row tiles) and c28 (2 x 2,
activations shared too) against c6 and `F.linear` fp16, on the five bench shapes, timed paired
(`qtool.bench.time_paired`: the ops' graphs replayed in alternating rounds over L2-rotated weight copies). Also
W4A8 g128 through c20 (dequantize, then the W8A8 GEMM) with c6 and with a TMA config as that GEMM, each against the
W8A8 config it runs on. Bitwise equality with c6 is
`tests/kernels/test_w8a8_w4a8_kv4_cuda.py::test_w8a8_tma_configs_bitwise_equal_to_c6`. Usage:

    python3 kernels_cuda/ab_w8_tma.py [Ms, default 1024,4096] [target seconds, default 0.05] [c20's TMA cfg, 27]
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_paired  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))
CFGS = (6, 26, 27, 28)
ROT = 192 << 20


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,4096").split(",")]
    tgt = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    c20_tma = sys.argv[3] if len(sys.argv) > 3 else "27"
    ops.load(verbose=False)
    rows = []

    def with_tma(v, f):
        os.environ["QTOOL_I8_W8_TMA"] = v
        try:
            f()
        finally:
            os.environ.pop("QTOOL_I8_W8_TMA", None)

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
            sets = [[lambda w=w: F.linear(xh, w) for w in w16]]
            for c in CFGS:
                sets.append([lambda w=w, c=c: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, c, 1) for w in w8])
            for v in ("0", c20_tma):
                sets.append([lambda t=t, v=v: with_tma(v, lambda: ops.w4a8_gemm_out(
                    xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128, None, o16,
                    20, 0)) for t in w4s])
            ts = time_paired(sets, target_s=tgt)
            t16, t8 = ts[0], dict(zip(CFGS, ts[1:5]))
            t20, t20t = ts[5], ts[6]
            rows.append((K, N, M, t16, t8, t20, t20t))
            tops = {c: 2 * M * K * N / (t * 1e-6) / 1e12 for c, t in t8.items()}
            print(f"{K}x{N} M={M:5d} fp16 {t16:7.1f} | " +
                  " | ".join(f"c{c} {t8[c]:7.1f} x{t16 / t8[c]:.2f} {tops[c]:5.0f}T" for c in CFGS) +
                  f" || g128 c20/c6 {t20:7.1f} ({t8[6] / t20:.3f})  c20/c{c20_tma} {t20t:7.1f} "
                  f"({t8[int(c20_tma)] / t20t:.3f})", flush=True)
        del w8, w4s, w16
        torch.cuda.empty_cache()
    print(f"\nmedian per M (paired)   M  " + "  ".join(f"c{c} xfp16" for c in CFGS) +
          f"  c{CFGS[1]}+/c6  g128/W8 (c6)  g128/W8 (c{c20_tma})")
    for M in ms:
        r = [x for x in rows if x[2] == M]
        xf = [statistics.median(x[3] / x[4][c] for x in r) for c in CFGS]
        sp = [statistics.median(x[4][6] / x[4][c] for x in r) for c in CFGS[1:]]
        g1 = statistics.median(x[4][6] / x[5] for x in r)
        g2 = statistics.median(x[4][int(c20_tma)] / x[6] for x in r)
        print(f"{'':22s}{M:5d}  " + "  ".join(f"{v:9.3f}" for v in xf) + "  " + "/".join(f"{v:.3f}" for v in sp) +
              f"  {g1:12.3f}  {g2:12.3f}")
    # the fastest config over every row (median of its speed-up against c6), for a caller that benches it next
    best = max(CFGS[1:], key=lambda c: statistics.median(x[4][6] / x[4][c] for x in rows))
    print(f"best TMA config: c{best}")
    if os.environ.get("AB_BEST_FILE"):
        Path(os.environ["AB_BEST_FILE"]).write_text(str(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
