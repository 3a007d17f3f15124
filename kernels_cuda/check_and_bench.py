#!/usr/bin/env python3
"""Build, check and time the CUDA W4A16 (QUICK) kernel in one GPU call.

    PYTHONUNBUFFERED=1 python kernels_cuda/check_and_bench.py [--no-check] [--no-sweep] [--no-bench]
        [--sanitize] [--out DIR] [--shapes 4096x4096,...] [--ms 1,16,...]

Sections: build (timed) → correctness (every config × split on small odd shapes with poisoned
outputs, the default op on every bench shape and odd M, groups 32/64/128, bf16, determinism,
opcheck, and the production packer when present) → config sweep (µs per (cfg, split)) → the
bench table of `qtool.bench.run_bench` and the target summary. Full logs and JSON go to --out
(default $OUT or ./.out). `--sanitize` runs only a few small cases (for compute-sanitizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from kernels_cuda.reference import pack_quick, random_problem, reference, rel_err  # noqa: E402

LOG: list[str] = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def run_case(M, N, K, g, cfg, split, dtype=torch.float16, gen=None, tol=None):
    x, q, z, s, t = random_problem(M, N, K, g, dtype=dtype, gen=gen)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    ops.w4a16_gemm_cfg_out(x, t["qweight"], t["scales"], t["qzeros"], g, cfg, split, out)
    torch.cuda.synchronize()
    ref = reference(x, q, z, s, g)
    err = rel_err(out, ref)
    tol = tol if tol is not None else (1e-3 if dtype == torch.float16 else 1e-2)
    return err, err <= tol


def check(results: dict) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(1234)
    ok_all = True
    n_cfg = ops.config_info(0)["num_configs"]
    rows = []

    def record(kind, M, N, K, g, cfg, split, dt, err, ok):
        nonlocal ok_all
        ok_all &= ok
        rows.append(dict(kind=kind, M=M, N=N, K=K, g=g, cfg=cfg, split=split, dtype=str(dt), err=err, ok=ok))
        if not ok:
            say(f"  FAIL {kind} M={M} N={N} K={K} g={g} cfg={cfg} split={split} {dt}: rel err {err:.3g}")

    # (1) every config × split on small odd problems
    small = [(1, 384, 576, 32), (17, 640, 576, 64), (100, 512, 1024, 128), (300, 256, 2048, 64),
             (3, 1024, 4096, 128), (130, 768, 1536, 32), (16, 640, 1536, 128), (9, 384, 4160, 64)]
    for M, N, K, g in small:
        for cfg in range(n_cfg):
            for split in (1, 2, 3, 4, 6, 8):
                if not ops.config_fits(cfg, N, K, g, split, M=M):
                    continue
                try:
                    err, ok = run_case(M, N, K, g, cfg, split, gen=gen)
                except RuntimeError as e:
                    say(f"  launch refused cfg={cfg} split={split} K={K}: {str(e)[:120]}")
                    err, ok = float("inf"), False
                record("cfg", M, N, K, g, cfg, split, torch.float16, err, ok)
    n1 = len(rows)
    say(f"[check] configs x splits: {sum(r['ok'] for r in rows)}/{n1} pass, "
        f"max err {max(r['err'] for r in rows):.3g}")

    # (2) default op on the bench shapes, odd M, groups
    shapes = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096)]
    for K, N in shapes:
        for M in (1, 3, 16, 17, 64, 100, 256, 1000):
            err, ok = run_case(M, N, K, 128, -1, 0, gen=gen)
            record("shape", M, N, K, 128, -1, 0, torch.float16, err, ok)
    for g in (32, 64, 128):
        for M, N, K in ((1, 4096, 4096), (100, 4096, 4096), (4096, 4096, 4096), (33, 384, 576), (5, 640, 576)):
            if K % g:
                continue
            err, ok = run_case(M, N, K, g, -1, 0, gen=gen)
            record("group", M, N, K, g, -1, 0, torch.float16, err, ok)
    for M in (1, 17, 1000, 4096):
        err, ok = run_case(M, 12288, 4096, 128, -1, 0, gen=gen)
        record("shape", M, 12288, 4096, 128, -1, 0, torch.float16, err, ok)
    n2 = len(rows)
    sub = rows[n1:n2]
    say(f"[check] default op, bench shapes/odd M/groups: {sum(r['ok'] for r in sub)}/{len(sub)} pass, "
        f"max err {max(r['err'] for r in sub):.3g}")

    # (3) bf16
    for M, N, K, g in ((1, 4096, 4096, 128), (17, 640, 576, 64), (100, 4096, 4096, 32), (1024, 4096, 4096, 128)):
        err, ok = run_case(M, N, K, g, -1, 0, dtype=torch.bfloat16, gen=gen)
        record("bf16", M, N, K, g, -1, 0, torch.bfloat16, err, ok)
    sub = rows[n2:]
    say(f"[check] bf16 (tol 1e-2): {sum(r['ok'] for r in sub)}/{len(sub)} pass, "
        "errs " + ", ".join("%.2g" % r["err"] for r in sub))

    # (4) determinism of the split-K reduction, 3-D input, fp32 input through the wrapper
    x, q, z, s, t = random_problem(7, 4096, 4096, 128, gen=gen)
    a = ops.w4a16_gemm(x, t["qweight"], t["scales"], t["qzeros"], 128)
    b = ops.w4a16_gemm(x, t["qweight"], t["scales"], t["qzeros"], 128)
    det = bool(torch.equal(a, b))
    y3 = ops.w4a16_gemm(x.view(7, 1, 4096), t["qweight"], t["scales"], t["qzeros"], 128)
    shape_ok = y3.shape == (7, 1, 4096) and torch.equal(y3.view(7, 4096), a)
    y32 = ops.w4a16_gemm(x.float(), t["qweight"], t["scales"], t["qzeros"], 128)
    f32_ok = y32.dtype == torch.float32 and rel_err(y32, reference(x, q, z, s, 128)) < 1e-3
    say(f"[check] deterministic: {det}; 3-D input: {shape_ok}; fp32 input: {f32_ok}")
    ok_all &= det and shape_ok and f32_ok

    # (5) opcheck
    oc_ok = True
    for M, N, K, g in ((1, 384, 576, 32), (17, 512, 1024, 128), (64, 256, 512, 64)):
        x, q, z, s, t = random_problem(M, N, K, g, gen=gen)
        try:
            torch.library.opcheck(torch.ops.qtool_cuda.w4a16_gemm.default,
                                  (x, t["qweight"], t["scales"], t["qzeros"], g))
        except Exception as e:  # noqa: BLE001
            oc_ok = False
            say(f"  opcheck FAIL M={M}: {type(e).__name__}: {str(e)[:300]}")
    say(f"[check] opcheck: {'pass' if oc_ok else 'FAIL'}")
    ok_all &= oc_ok

    # (6) production packer (qtool.layouts.quick_w4a16) when present
    try:
        from qtool.layouts.quick_w4a16 import QuickW4A16Layout
        from qtool.quant.qweight import QuantizedWeight

        N, K, g = 640, 576, 64
        cq = torch.randint(0, 16, (N, K), dtype=torch.uint8)
        cz = torch.randint(0, 16, (N, K // g), dtype=torch.uint8)
        cs = torch.rand(N, K // g) * 0.02 + 0.002
        qw = QuantizedWeight(codes=cq, scale=cs, zero=cz, bits=4, group_size=g, in_features=K)
        prod = QuickW4A16Layout().pack(qw)
        mine = pack_quick(cq.long(), cz.long(), cs.half())
        same = all(torch.equal(prod[k].cpu(), mine[k].cpu()) for k in ("qweight", "qzeros", "scales"))
        x = torch.randn(9, K, device="cuda").half()
        y = ops.w4a16_gemm(x, *(prod[k].cuda() for k in ("qweight", "scales", "qzeros")), g)
        e = rel_err(y, reference(x, cq.cuda().long(), cz.cuda().long(), cs.cuda().half(), g))
        say(f"[check] production packer: bit-identical to §4b test packer: {same}; kernel rel err {e:.3g}")
        ok_all &= same and e <= 1e-3
    except ImportError as e:
        say(f"[check] production packer not present ({e}); skipped")
    except Exception as e:  # noqa: BLE001
        say(f"[check] production packer comparison failed: {type(e).__name__}: {e}")
        ok_all = False

    results["check_rows"] = rows
    say(f"[check] {'ALL PASS' if ok_all else 'FAILURES'}: {sum(r['ok'] for r in rows)}/{len(rows)} numeric cases")
    return ok_all


def sweep(results: dict, shapes, ms):
    from qtool.bench import _copies, make_w4a16_weights, time_rotating, w4a16_bytes

    n_cfg = ops.config_info(0)["num_configs"]
    infos = [ops.config_info(c) for c in range(n_cfg)]
    out = []
    g = 128
    for K, N in shapes:
        wq = make_w4a16_weights(K, N, g, _copies(w4a16_bytes(0, K, N, g), 256 << 20))
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            auto = ops.choose(M, N, K, g)
            if M <= 16:
                cands = [c for c in range(n_cfg) if infos[c]["kind"] in ("gdec", "tdec")]
            else:
                wgs = [c for c in range(n_cfg) if infos[c]["kind"] in ("wgmma", "wgrs") and infos[c]["available"]]
                cands = ([5, 6] if M <= 64 else [6, 8] if M <= 256 else [8]) + wgs
            res = []
            for c in cands:
                base = -(-M // infos[c]["rows"]) * (N // max(1, infos[c]["cols"]))
                for s in (1, 2, 3, 4, 6, 8):
                    if not ops.config_fits(c, N, K, g, s, M=M) or (s > 1 and base * s > 8 * 132):
                        continue
                    try:
                        us = time_rotating(
                            [lambda t=t, c=c, s=s: ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], g, c, s)
                             for t in wq], target_s=0.03, max_reps=50)
                    except RuntimeError:
                        continue  # split not possible for this config/K
                    res.append((us, c, s))
            res.sort()
            auto_us = next((u for u, c, s in res if (c, s) == auto), None)
            best = res[0]
            line = (f"[sweep] {K}x{N} M={M}: best c{best[1]}/s{best[2]} {best[0]:.1f}us; auto c{auto[0]}/s{auto[1]} "
                    f"{'%.1f' % auto_us if auto_us else '?'}us; top: "
                    + ", ".join(f"c{c}/s{s}={u:.1f}" for u, c, s in res[:5]))
            say(line)
            out.append(dict(K=K, N=N, M=M, auto=list(auto), auto_us=auto_us,
                            results=[dict(us=u, cfg=c, split=s) for u, c, s in res]))
            del x
        del wq
        torch.cuda.empty_cache()
    results["sweep"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / ".out")))
    ap.add_argument("--shapes", default="4096x4096,4096x12288,4096x22016,11008x4096,14336x4096")
    ap.add_argument("--ms", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--sweep-ms", default=None)
    args = ap.parse_args()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    sweep_ms = [int(v) for v in args.sweep_ms.split(",")] if args.sweep_ms else ms
    results: dict = {}
    p = torch.cuda.get_device_properties(0)
    say(f"[env] {p.name} sm_{p.major}{p.minor} SMs={p.multi_processor_count} "
        f"L2={getattr(p, 'L2_cache_size', 0) / 2**20:.0f}MiB torch={torch.__version__} cuda={torch.version.cuda}")
    t0 = time.time()
    path = ops.load(verbose=False)
    say(f"[build] loaded from {path} in {time.time() - t0:.1f}s")

    if args.sanitize:
        gen = torch.Generator(device="cuda").manual_seed(7)
        wg_cases = ()  # the wgmma kernels where this GPU / build has them
        if all(ops.config_info(c)["available"] for c in (34, 35, 36)):
            wg_cases = ((130, 512, 1024, 128, 34, 2), (300, 640, 576, 64, 35, 1), (100, 512, 1024, 64, 36, 2),
                        (200, 512, 1024, 64, 41, 2), (40, 768, 1024, 128, 42, 1), (130, 384, 576, 64, 43, 2),
                        (200, 1024, 1024, 128, 44, 2), (300, 512, 2048, 128, 45, 3), (100, 256, 576, 64, 46, 1),
                        (64, 512, 1024, 128, 47, 1), (64, 512, 2048, 128, 47, 3), (257, 512, 1536, 64, 44, 6))
        for M, N, K, g, cfg, split in ((3, 384, 576, 64, -1, 0), (17, 512, 1024, 32, 4, 4), (100, 512, 1024, 128, 9, 2),
                                       (300, 256, 2048, 64, 10, 1), (40, 384, 576, 32, 6, 3),
                                       (5, 384, 576, 32, 21, 2), (20, 384, 576, 64, 5, 2),
                                       (1, 512, 1024, 64, 19, 3), (9, 512, 576, 32, 21, 1),
                                       (5, 384, 1024, 128, 23, 2), (12, 384, 576, 64, 19, 3),
                                       (16, 256, 1024, 128, 24, 2), (3, 384, 1024, 32, 33, 2)) + wg_cases:
            err, ok = run_case(M, N, K, g, cfg, split, gen=gen)
            say(f"[sanitize] M={M} N={N} K={K} g={g} cfg={cfg} split={split}: err {err:.3g} {'ok' if ok else 'FAIL'}")
        return 0

    status = 0
    try:
        if not args.no_check:
            t0 = time.time()
            if not check(results):
                status = 1
            say(f"[check] {time.time() - t0:.1f}s")
        if not args.no_sweep:
            t0 = time.time()
            sweep(results, shapes, sweep_ms)
            say(f"[sweep] {time.time() - t0:.1f}s")
        if not args.no_bench:
            from qtool.bench import format_table, run_bench, summarize_targets

            t0 = time.time()
            rows = run_bench(shapes=shapes, ms=ms, backend="cuda", echo=False,
                             log=lambda s: say("[bench] " + s))
            results["bench"] = rows
            say(f"[bench] {time.time() - t0:.1f}s; ceilings: BW {rows[0]['bw_tbs']:.2f} TB/s, "
                f"bf16 {rows[0]['peak_tflops']:.0f} TFLOP/s")
            say(format_table(rows))
            say(summarize_targets(rows))
    except Exception:  # noqa: BLE001
        say(traceback.format_exc())
        status = 2
    finally:
        (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (outdir / "log.txt").write_text("\n".join(LOG) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
