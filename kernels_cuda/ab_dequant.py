#!/usr/bin/env python3
"""The dequantizing config c20 at large M: its dequantizing kernel's variants (QTOOL_I8_DQ_V: 0 = one 128-k step per
CTA, 1 = four, 2 = four with evict-first qweight loads, 3 = 2 with evict-last W8 stores) and its GEMM chained behind
it (QTOOL_I8_DQ_PDL=1: programmatic dependent launch), on the five bench shapes, timed paired
(`qtool.bench.time_paired`: the ops' graphs replayed in alternating rounds over L2-rotated weight copies), µs per
call; ratios against c6 (W8A8) in parentheses. Then the dequantizing kernel alone per variant, against a copy that
moves the same bytes (int8 [N, K/2] into int16: reads N·K/2, writes N·K).

    python3 kernels_cuda/ab_dequant.py [Ms, default 1024,4096] [target seconds, default 0.05]
"""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_paired  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))
ROT = 192 << 20
# (column, QTOOL_I8_DQ_V, QTOOL_I8_DQ_PDL)
G128 = (("g v0", "0", "0"), ("g v0+pdl", "0", "1"), ("g v1+pdl", "1", "1"), ("g v2", "2", "0"),
        ("g v2+pdl", "2", "1"), ("g v3+pdl", "3", "1"))
CHN = (("c v0", "0", "0"), ("c v2+pdl", "2", "1"), ("c v3+pdl", "3", "1"))


def with_env(env, f):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return f()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,4096").split(",")]
    tgt = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    ops.load(verbose=False)
    rows, alone = [], []
    for K, N in SHAPES:
        w8 = make_w8a8_weights(K, N, _copies(K * N, ROT))
        w4g = make_w4a8_weights(K, N, 128, _copies(K * N // 2, ROT))
        w4c = make_w4a8_weights(K, N, -1, _copies(K * N // 2, ROT))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            xsum = torch.randn(M, 1, device="cuda")
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            sets = {"c6": [lambda w=w: ops.w8a8_gemm_out(xq, xs, w[0], w[1], None, o16, 6, 1) for w in w8]}
            for name, v, pdl in G128:
                env = {"QTOOL_I8_DQ_V": v, "QTOOL_I8_DQ_PDL": pdl}
                sets[name] = [lambda t=t, env=env: with_env(env, lambda: ops.w4a8_gemm_out(
                    xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128, None, o16,
                    20, 0)) for t in w4g]
            for name, v, pdl in CHN:
                env = {"QTOOL_I8_DQ_V": v, "QTOOL_I8_DQ_PDL": pdl}
                sets[name] = [lambda t=t, env=env: with_env(env, lambda: ops.w4a8_gemm_out(
                    xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1, None, o16, 20, 0))
                    for t in w4c]
            sets["c c10"] = [lambda t=t: ops.w4a8_gemm_out(xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"],
                                                           None, None, -1, None, o16, 10, 0) for t in w4c]
            ts = dict(zip(sets, time_paired(list(sets.values()), target_s=tgt)))
            rows.append({"K": K, "N": N, "M": M, **ts})
            t6 = ts["c6"]
            print(f"{K}x{N} M={M:5d} c6 {t6:6.1f} | " + " | ".join(
                f"{k} {ts[k]:6.1f} ({t6 / ts[k]:.3f})" for k in sets if k != "c6"), flush=True)
        # the dequantizing kernel alone, per variant, and the copy of the same bytes
        c16 = torch.empty(N, K // 2, device="cuda", dtype=torch.int16)
        asets = {f"dq v{v}": [lambda t=t, v=v: with_env({"QTOOL_I8_DQ_V": v}, lambda: ops.w4a8_dequantize(
            t["qweight"], t["s2_scales"], t["s2_zeros"], 128)) for t in w4g] for v in "0123"}
        asets["copy"] = [lambda t=t: c16.copy_(t["qweight"]) for t in w4g]
        ts = dict(zip(asets, time_paired(list(asets.values()), target_s=tgt)))
        gb = 1.5 * N * K / 1e3
        alone.append({"K": K, "N": N, **ts})
        print(f"  dequantize alone {K}x{N}: " + " | ".join(f"{k} {ts[k]:6.1f} us {gb / ts[k]:5.2f} TB/s" for k in asets),
              flush=True)
        del w8, w4g, w4c, c16
        torch.cuda.empty_cache()
    names = [k for k in rows[0] if k not in ("K", "N", "M", "c6")]
    print("\nmedian x c6 per M: " + "  ".join(f"{k:>9s}" for k in names))
    for M in ms:
        r = [x for x in rows if x["M"] == M]
        print(f"  M {M:5d}        " + "  ".join(f"{statistics.median(x['c6'] / x[k] for x in r):9.3f}" for k in names))
        print(f"  M {M:5d} min    " + "  ".join(f"{min(x['c6'] / x[k] for x in r):9.3f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
