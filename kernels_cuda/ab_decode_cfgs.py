#!/usr/bin/env python3
"""Times explicit decode configs (cfg / split) of the int8 GEMM engine against the defaults, for W8A8, W4A8 g128 and
W4A8 per-channel, on the five bench shapes; for deciding a default rule (e.g. a new config) in one build. Every op of
one (shape, M) is timed paired (`qtool.bench.time_paired`: graph replays alternating round by round over L2-rotated
weight copies), so that the ratios compare like with like. Prints one line per (shape, M, format): the default's µs
and config, then every listed config's µs (cfg: that config with its own split rule; cfg/s: at split s) and, for the
W4 formats, the W8A8 default's time over each. Last, per format and M, `summarize`'s lines: each shape's fastest op
and the median over the shapes of W8A8-best / W4-best and of W8A8-default / W4-default -- what a default rule that
picks each shape's fastest config would reach (the issue-7 ratios are against our fastest W8A8). Format g128pk is
W4A8 g128 with the scales packed for the decode kernels (`ops.pack_s2_tiles`, GemmArgs::pgs), the same weights as
g128 (g128 itself runs without them).

    python3 kernels_cuda/ab_decode_cfgs.py [Ms, default 1,4] [cfgs, default 14,15,17,18,21; "-" for none]
                                           [formats, default w8a8,g128,chn] [shapes KxN, default the five]
                                           [target seconds, default 0.03]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_paired  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096))


def summarize(rows):
    """rows: (shape "KxN", M, format, {label: µs}) as timed, W8A8 among them (label "default ..." = the default).
    Returns the summary lines: per W4 format and M, each shape's fastest W4 op against the fastest W8A8 op, and the
    medians over the shapes of best / best and default / default."""
    import statistics

    w8 = {(sh, m): t for sh, m, f, t in rows if f == "w8a8"}
    out = []
    for f in dict.fromkeys(f for _, _, f, _ in rows if f != "w8a8"):
        for m in dict.fromkeys(m for _, m, ff, _ in rows if ff == f):
            best, dflt, parts = [], [], []
            for sh, mm, ff, t in rows:
                if ff != f or mm != m or (sh, m) not in w8:
                    continue
                w8t = w8[(sh, m)]
                lab4, t4 = min(t.items(), key=lambda kv: kv[1])
                lab8, t8 = min(w8t.items(), key=lambda kv: kv[1])
                d4 = next(v for k, v in t.items() if k.startswith("default"))
                d8 = next(v for k, v in w8t.items() if k.startswith("default"))
                best.append(t8 / t4)
                dflt.append(d8 / d4)
                parts.append(f"{sh} {lab4} {t4:.2f} / W8A8 {lab8} {t8:.2f} = {t8 / t4:.3f}")
            if best:
                out.append(f"{f} M={m}: median best/best {statistics.median(best):.3f}, default/default "
                           f"{statistics.median(dflt):.3f}  [" + "; ".join(parts) + "]")
    return out


def main():
    ms = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,4").split(",")]
    cfgs = [tuple(int(x) for x in (v + "/0").split("/")[:2])
            for v in (sys.argv[2] if len(sys.argv) > 2 else "14,15,17,18,21").split(",") if v not in ("", "-")]
    fmts = (sys.argv[3] if len(sys.argv) > 3 else "w8a8,g128,chn").split(",")
    shapes = ([tuple(int(x) for x in v.split("x")) for v in sys.argv[4].split(",")] if len(sys.argv) > 4 and sys.argv[4]
              else SHAPES)
    tgt = float(sys.argv[5]) if len(sys.argv) > 5 else 0.03
    ops.load(verbose=False)
    rows = []
    for K, N in shapes:
        w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
        w4 = {g: make_w4a8_weights(K, N, g, _copies(K * N // 2, 192 << 20))
              for g, names in ((128, ("g128", "g128pk")), (-1, ("chn",))) if any(n in fmts for n in names)}
        if "g128pk" in fmts:
            for t in w4[128]:
                t["s2_tiles"] = ops.pack_s2_tiles(t["s2_scales"], t["s2_zeros"])
                assert t["s2_tiles"] is not None  # random_w4a8 draws s2 in [1, 16]
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            xsum = xq.float().sum(-1, keepdim=True) * xs
            o16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            runs = {
                "w8a8": (ops.FMT_W8, w8,
                         lambda c, s=0: lambda t: ops.w8a8_gemm_out(xq, xs, t[0], t[1], None, o16, c, s)),
                "g128": (ops.FMT_W4PG, w4.get(128), lambda c, s=0: lambda t: ops.w4a8_gemm_out(
                    xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128, None, o16,
                    c, s, s2_tiles=None)),
                "g128pk": (ops.FMT_W4PG, w4.get(128), lambda c, s=0: lambda t: ops.w4a8_gemm_out(
                    xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128, None, o16,
                    c, s, s2_tiles=t["s2_tiles"])),
                "chn": (ops.FMT_W4PC, w4.get(-1), lambda c, s=0: lambda t: ops.w4a8_gemm_out(
                    xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1, None, o16, c, s)),
            }
            keys, sets = [], []  # (format, label); the call list per op
            for name, (fmt, ws, call) in runs.items():
                if name != "w8a8" and name not in fmts:
                    continue
                d = ops.i8_choose(fmt, M, N, K)
                keys.append((name, f"default c{d[0]}/s{d[1]}"))
                sets.append([lambda t=t, f=call(-1): f(t) for t in ws])
                if name not in fmts:
                    continue
                for c, s in cfgs:
                    info = ops.i8_config_info(c)
                    if not ops.i8_supports(info, fmt) or (info["kind"] == "decode" and M > info["bm"]):
                        continue
                    keys.append((name, f"c{c}{f'/s{s}' if s else ''}"))
                    sets.append([lambda t=t, f=call(c, s): f(t) for t in ws])
            ts = dict(zip(keys, time_paired(sets, target_s=tgt)))
            for name in runs:
                if name == "w8a8" or name in fmts:
                    rows.append((f"{K}x{N}", M, name, {lab: v for (n, lab), v in ts.items() if n == name}))
            w8t = next(v for (n, _), v in ts.items() if n == "w8a8")
            for name in runs:
                if name not in fmts:
                    continue
                row = [(lab, v) for (n, lab), v in ts.items() if n == name]
                ratio = (lambda v: f" (x{w8t / v:.3f})") if name != "w8a8" else (lambda v: "")
                print(f"{K}x{N} M={M:2d} {name:5s} " + " | ".join(f"{lab} {v:6.2f}{ratio(v)}" for lab, v in row),
                      flush=True)
        del w8, w4
        torch.cuda.empty_cache()
    for line in summarize(rows):
        print(line, flush=True)


if __name__ == "__main__":
    main()
