#!/usr/bin/env python3
"""The dequantizing per-group config c20 in one pass against its L2-sized column slices: for each bench shape and M,
the W8A8 default (fp16 out, the bench's baseline) and c20 (fp16 out) at each scratch budget of
QTOOL_I8_W4PG_DQ_L2_MB (0 = one pass), every variant timed twice, interleaved; each variant's output checked
bitwise against the one-pass result. Usage:

    python3 kernels_cuda/ab_dq_slices.py [Ms, default 1024,4096] [budgets MiB, default 0,12,16,24,32] [shapes KxN]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_rotating  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))


def timed(fn, weights):
    """µs per call of fn over the rotated weight copies (L2 cold)."""
    return time_rotating([lambda t=t: fn(t) for t in weights], target_s=0.03, max_reps=40)


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,4096").split(",")]
    budgets = (sys.argv[2] if len(sys.argv) > 2 else "0,12,16,24,32").split(",")
    shapes = ([tuple(int(x) for x in v.split("x")) for v in sys.argv[3].split(",")] if len(sys.argv) > 3
              else SHAPES)
    ops.load(verbose=False)
    bad = 0
    for K, N in shapes:
        w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
        w4s = make_w4a8_weights(K, N, 128, _copies(K * N // 2, 192 << 20))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)

            def c20(t):
                ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"],
                                  128, None, o16, 20, 0)

            times = {"w8a8": []}
            times.update({b: [] for b in budgets})
            for _ in range(2):
                times["w8a8"].append(timed(lambda t: ops.w8a8_gemm_out(xq, xs, t[0], t[1], None, o16, -1, 0), w8))
                for b in budgets:
                    os.environ["QTOOL_I8_W4PG_DQ_L2_MB"] = b
                    times[b].append(timed(c20, w4s))
            os.environ["QTOOL_I8_W4PG_DQ_L2_MB"] = "0"
            c20(w4s[0])
            ref = o16.clone()
            parts = [f"{K}x{N} M={M:4d} w8a8 {min(times['w8a8']):7.1f}"]
            t8 = min(times["w8a8"])
            for b in budgets:
                os.environ["QTOOL_I8_W4PG_DQ_L2_MB"] = b
                o16.fill_(float("nan"))
                c20(w4s[0])
                same = torch.equal(o16, ref)
                bad += not same
                t = times[b]
                parts.append(f"L2 {b:>2s} MiB {t[0]:6.1f}/{t[1]:6.1f} ({t8 / min(t):.2f}){'' if same else ' DIFFERENT'}")
            os.environ.pop("QTOOL_I8_W4PG_DQ_L2_MB")
            print(" | ".join(parts), flush=True)
        del w8, w4s
        torch.cuda.empty_cache()
    print("ALL BITWISE EQUAL" if not bad else f"{bad} variants DIFFER")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
