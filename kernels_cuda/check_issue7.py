#!/usr/bin/env python3
"""Build, check and time the issue-7 CUDA kernels in one GPU call.

    PYTHONUNBUFFERED=1 python kernels_cuda/check_issue7.py [--no-check] [--no-sweep] [--no-bench]
        [--quick] [--out DIR] [--target-s 0.04]

Ops: per-token / per-tensor int8 activation quantization (+ row sum, + fused RMSNorm), W8A8 GEMM,
W4A8 GEMM (QServe layout, per-group and per-channel), KV4 quantize / write and KV4 decode attention.
Sections: build → correctness (every op against its PyTorch reference on fresh random inputs, outputs
poisoned before each run; every kernel config × split on odd shapes; the default op on the bench
shapes × odd M; SmolLM2 shapes with padded K; the qtool modules through the cuda backend; KV4 edge
cases; opcheck) → config sweep (µs per (cfg, split)) → the bench tables of `qtool.bench.run_bench`
and the target summary. Full logs and JSON go to --out (default $OUT or ./.out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels_cuda import ops  # noqa: E402

LOG: list[str] = []
SUMMARY: list[tuple[str, int, int, str]] = []  # (section, passed, total, note)
FAILS: dict[str, list[str]] = {}
BENCH_SHAPES = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (14336, 4096)]
SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
ODD_M = (1, 3, 17, 100, 1000)
KV4_KERNELS = ("u4", "u5", "u6", "ring")  # every QTOOL_KV4_KERNEL choice (csrc/kv4_attention.cu)


LIVE: list = []  # an open file under --out, appended as we go (survives a kill)


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)
    if LIVE:
        LIVE[0].write(s + "\n")
        LIVE[0].flush()


def rel_err(out, ref) -> float:
    out = out.double()
    ref = ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    d = torch.linalg.vector_norm(out - ref)
    n = torch.linalg.vector_norm(ref)
    return float(d / n) if float(n) > 0 else float(d)


class Section:
    def __init__(self, name):
        self.name, self.ok, self.n, self.worst, self.fails = name, 0, 0, 0.0, []

    def rec(self, what, err, tol):
        self.n += 1
        good = err <= tol
        self.ok += good
        self.worst = max(self.worst, err if err == err else float("inf"))
        if not good:
            self.fails.append(f"{what}: {err:.3g} > {tol:g}")
            if len(self.fails) <= 12:
                say(f"  FAIL [{self.name}] {what}: {err:.3g} > {tol:g}")

    def flag(self, what, good):
        self.rec(what, 0.0 if good else float("inf"), 0.0)

    def done(self, note=""):
        FAILS[self.name] = self.fails
        note = note or f"worst {self.worst:.3g}"
        SUMMARY.append((self.name, self.ok, self.n, note))
        say(f"[check] {self.name}: {self.ok}/{self.n} pass ({note})")


def run_section(fn, *a):
    t0 = time.time()
    try:
        fn(*a)
    except Exception:  # noqa: BLE001
        say(traceback.format_exc())
        SUMMARY.append((fn.__name__, 0, 1, "EXCEPTION"))
    say(f"[time] {fn.__name__}: {time.time() - t0:.1f}s")


# ------------------------------------------------------------------------------------ act quant


def check_act_quant():
    from qtool.quant.activations import quantize_per_tensor as ref_pt
    from qtool.quant.activations import quantize_per_token as ref_ptq

    sec = Section("act_quant (exact)")
    gen = torch.Generator(device="cuda").manual_seed(11)
    Ks = (576, 1536, 4096, 11008, 14336, 100, 4104, 20000)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for K in Ks:
            for M in ODD_M:
                if M == 1000 and K > 4200 and dt != torch.float16:
                    continue
                x = (torch.randn(M, K, device="cuda", generator=gen) * 3).to(dt)
                x[0, K // 3] = 40.0  # an outlier channel
                if M > 2:
                    x[2] = 0  # an all-zero row (scale 1e-5/127, codes 0)
                q = torch.full((M, K), -128, device="cuda", dtype=torch.int8)  # poison: never produced
                s = torch.full((M, 1), float("nan"), device="cuda")
                sm = torch.full((M, 1), float("nan"), device="cuda")
                torch.ops.qtool_cuda.act_quant_out(x, None, 0.0, q, s, sm, True)
                rq, rs = ref_ptq(x)
                rsum = rq.float().sum(-1, keepdim=True) * rs
                good = torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(sm, rsum)
                sec.flag(f"per-token {dt} M={M} K={K}", good)
                if not good and len(sec.fails) <= 4:
                    say(f"    q diff {(q.int() - rq.int()).abs().max().item()} scale eq {torch.equal(s, rs)} "
                        f"sum err {(sm - rsum).abs().max().item():.3g}")
        # 3-D input and the functional ops
        x = torch.randn(3, 5, 4096, device="cuda", generator=gen).to(dt)
        q, s = ops.quantize_per_token(x)
        rq, rs = ref_ptq(x)
        sec.flag(f"per-token 3-D {dt}", q.shape == rq.shape and torch.equal(q, rq) and torch.equal(s, rs))
        q2, s2, sm2 = ops.quantize_per_token_sum(x)
        sec.flag(f"per-token-sum 3-D {dt}", torch.equal(q2, rq) and torch.equal(sm2, rq.float().sum(-1, keepdim=True) * rs))
        # per-tensor (static scale: saturates)
        for K in (4096, 100):
            x = (torch.randn(17, K, device="cuda", generator=gen) * 2).to(dt)
            sc = torch.tensor([0.01], device="cuda")
            sec.flag(f"per-tensor {dt} K={K}", torch.equal(ops.quantize_per_tensor(x, sc), ref_pt(x, sc)))
        sec.flag(f"per-tensor float scale {dt}", torch.equal(ops.quantize_per_tensor(x, 0.02), ref_pt(x, 0.02)))
    sec.done()

    # fused RMSNorm + per-token quant: codes may differ by 1 where the normalized value sits on a
    # rounding boundary (reduction order of mean(x²) differs from PyTorch's)
    sec = Section("rmsnorm_quantize")
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for K in (576, 4096, 14336, 100):
            for M in (1, 17, 1000):
                x = (torch.randn(M, K, device="cuda", generator=gen) * 2).to(dt)
                w = (torch.rand(K, device="cuda", generator=gen) + 0.5).to(dt)
                q = torch.full((M, K), -128, device="cuda", dtype=torch.int8)
                s = torch.full((M, 1), float("nan"), device="cuda")
                sm = torch.full((M, 1), float("nan"), device="cuda")
                torch.ops.qtool_cuda.act_quant_out(x, w, 1e-6, q, s, sm, True)
                rq, rs, rsm = ops.rmsnorm_quantize_reference(x, w, 1e-6)
                dq = (q.int() - rq.int()).abs()
                frac = float((dq > 0).float().mean())
                bad = int(dq.max()) > 1 or rel_err(s, rs) > 1e-5 or rel_err(sm, rsm) > 1e-3
                sec.rec(f"{dt} M={M} K={K} (codes off by 1: {frac:.2e})", float("inf") if bad else frac, 5e-3)
    sec.done()


# ------------------------------------------------------------------------------------------ W8A8


def w8a8_problem(M, N, K, gen, bias=False, bcast=False):
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(1 if bcast else M, 1, device="cuda", generator=gen) * 0.02 + 1e-3
    w = torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
    ws = torch.rand(N, device="cuda", generator=gen) * 1e-3 + 1e-4
    b = torch.randn(N, device="cuda", generator=gen).half() if bias else None
    return xq, xs, w, ws, b


def run_w8a8(M, N, K, gen, cfg=-1, split=0, out_dtype=torch.float16, bias=False, bcast=False, ws_shape=None):
    from qtool.nn.w8a8 import w8a8_gemm as ref

    xq, xs, w, ws, b = w8a8_problem(M, N, K, gen, bias, bcast)
    if ws_shape is not None:
        ws = ws.reshape(ws_shape)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=out_dtype)
    ops.w8a8_gemm_out(xq, xs, w, ws, b, out, cfg, split)
    return rel_err(out, ref(xq, xs, w, ws, b, torch.float32))


def tol_for(dt):
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dt]


def n_cfg():
    return ops.i8_config_info(0)["num_configs"]


def cfg_ok_for(cfg, fmt, M):
    info = ops.i8_config_info(cfg)
    if not ops.i8_supports(info, fmt):
        return False  # e.g. c12 is W8-only, the 16-warp decode c18 / c19 W4-only, c20 W4 per-group only
    return info["kind"] != "decode" or M <= info["bm"]


def check_w8a8():
    gen = torch.Generator(device="cuda").manual_seed(21)
    sec = Section("w8a8 configs x splits")
    for M, N, K in ((1, 384, 576), (8, 200, 1024), (16, 640, 4096), (3, 96, 160), (17, 384, 576), (100, 512, 1024),
                    (300, 256, 2048), (130, 1000, 1536), (1000, 320, 4096)):
        for cfg in range(n_cfg()):
            if not cfg_ok_for(cfg, ops.FMT_W8, M):
                continue
            for split in (1, 2, 3, 4, 8):
                sec.rec(f"M={M} N={N} K={K} cfg={cfg} split={split}",
                        run_w8a8(M, N, K, gen, cfg, split), 1e-3)
    sec.done()
    sec = Section("w8a8 default: bench+smol shapes x odd M")
    for K, N in BENCH_SHAPES + SMOL_SHAPES:
        for M in ODD_M + ((4096,) if (K, N) == (4096, 4096) else ()):
            sec.rec(f"{K}x{N} M={M}", run_w8a8(M, N, K, gen), 1e-3)
    sec.done()
    sec = Section("w8a8 dtypes/bias/broadcast/odd N")
    for M in (1, 17, 1000):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            sec.rec(f"M={M} {dt} bias", run_w8a8(M, 4096, 4096, gen, out_dtype=dt, bias=True), tol_for(dt))
        sec.rec(f"M={M} per-tensor x_scale", run_w8a8(M, 1024, 4096, gen, bcast=True), 1e-3)
        sec.rec(f"M={M} w_scale [N,1]", run_w8a8(M, 1024, 4096, gen, ws_shape=(1024, 1)), 1e-3)
        sec.rec(f"M={M} N=36 odd", run_w8a8(M, 36, 4096, gen, bias=True), 1e-3)
        sec.rec(f"M={M} N=1001 odd", run_w8a8(M, 1001, 1024, gen), 1e-3)
    # c6 with more tiles than SMs: bias, bf16, fp32, odd N, per-tensor scale
    sec.rec("M=2000 N=5000 bf16 bias (c6, more tiles than SMs)",
            run_w8a8(2000, 5000, 1024, gen, 6, 1, torch.bfloat16, True), tol_for(torch.bfloat16))
    sec.rec("M=5000 N=1001 odd (c6, more tiles than SMs)", run_w8a8(5000, 1001, 1024, gen, 6, 1, bias=True), 1e-3)
    sec.rec("M=3001 N=4096 fp32 per-tensor x_scale (c6, more tiles than SMs)",
            run_w8a8(3001, 4096, 512, gen, 6, 1, torch.float32, bcast=True), tol_for(torch.float32))
    # functional op + reference fallback (K % 16 != 0) + determinism of split-K
    from qtool.nn.w8a8 import w8a8_gemm as ref

    xq, xs, w, ws, b = w8a8_problem(33, 512, 1000, gen, bias=True)
    sec.rec("K=1000 (reference fallback)", rel_err(ops.w8a8_gemm(xq, xs, w, ws, b, torch.float16),
                                                   ref(xq, xs, w, ws, b, torch.float32)), 1e-3)
    xq, xs, w, ws, b = w8a8_problem(7, 4096, 14336, gen)
    a1 = ops.w8a8_gemm(xq, xs, w, ws, None, torch.float16)
    o2 = torch.empty_like(a1)
    ops.w8a8_gemm_out(xq, xs, w, ws, None, o2, 1, 8)
    o3 = torch.empty_like(a1)
    ops.w8a8_gemm_out(xq, xs, w, ws, None, o3, 1, 1)
    sec.flag("split-K 8 == split 1 bitwise (int32 reduction)", torch.equal(o2, o3))
    sec.flag("repeatable", torch.equal(a1, ops.w8a8_gemm(xq, xs, w, ws, None, torch.float16)))
    sec.done()


# ------------------------------------------------------------------------------------------ W4A8


def w4a8_problem(M, N, K, g, gen, bias=False):
    from qtool.bench import random_w4a8

    t = random_w4a8(K, N, g, "cuda", gen)
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02 + 1e-3
    xsum = xq.float().sum(-1, keepdim=True) * xs if g <= 0 else None
    b = torch.randn(N, device="cuda", generator=gen).half() if bias else None
    return xq, xs, xsum, t, b


def run_w4a8(M, N, K, g, gen, cfg=-1, split=0, bias=False, out_dtype=torch.float32):
    """Relative error against the reference; with a 16-bit out_dtype, inf unless the result is the op's own fp32
    result rounded once (the kernel's store does the only rounding)."""
    from qtool.nn.w4a8 import w4a8_gemm as ref

    xq, xs, xsum, t, b = w4a8_problem(M, N, K, g, gen, bias)
    args = (xq, xs, xsum, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"), t.get("s2_zeros"), g, b)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=out_dtype)
    ops.w4a8_gemm_out(*args, out, cfg, split)
    if out_dtype != torch.float32:
        o32 = torch.full((M, N), float("nan"), device="cuda")
        ops.w4a8_gemm_out(*args, o32, cfg, split)
        if not torch.equal(out, o32.to(out_dtype)):
            return float("inf")
    return rel_err(out, ref(*args))


def check_w4a8():
    gen = torch.Generator(device="cuda").manual_seed(31)
    sec = Section("w4a8 configs x splits (g128, g64, g32, g256, chn)")
    for M, N, K in ((1, 384, 640), (8, 192, 1024), (16, 640, 4096), (17, 384, 576), (100, 512, 1024),
                    (300, 256, 2048), (1000, 320, 4096)):
        # g32 / g256: groups that change inside a 128-k stage / span two
        for g in (128, 64, 32, 256, -1):
            if g > 0 and K % g:
                continue
            for cfg in range(n_cfg()):
                if not cfg_ok_for(cfg, ops.FMT_W4PG if g > 0 else ops.FMT_W4PC, M):
                    continue
                for split in (1, 2, 3, 8):
                    sec.rec(f"M={M} N={N} K={K} g={g} cfg={cfg} split={split}",
                            run_w4a8(M, N, K, g, gen, cfg, split), 1e-3)
    sec.done()
    sec = Section("w4a8 default: bench+smol shapes x odd M")
    for K, N in BENCH_SHAPES:
        for M in ODD_M:
            for g in (128, -1):
                sec.rec(f"{K}x{N} M={M} g={g}", run_w4a8(M, N, K, g, gen, bias=M == 3), 1e-3)
    for K, N in SMOL_SHAPES:
        for g in (128, 64, -1):
            kp = -(-K // g) * g if g > 0 else K  # padded K (activations zero-padded by the module)
            for M in ODD_M:
                sec.rec(f"smol {K}(->{kp})x{N} M={M} g={g}", run_w4a8(M, N, kp, g, gen), 1e-3)
    sec.done()
    sec = Section("w4a8 fp16/bf16 out (what a layer returns) = the fp32 result rounded once")
    for K, N in BENCH_SHAPES:
        for M in (1, 16, 17, 300, 1024):
            for g in (128, -1):
                for dt in (torch.float16, torch.bfloat16):
                    sec.rec(f"{K}x{N} M={M} g={g} {str(dt)[6:]}", run_w4a8(M, N, K, g, gen, bias=M == 17, out_dtype=dt),
                            2e-3)
    sec.done()


# ------------------------------------------------------------------------------------- modules


def check_modules():
    """qtool's runtime modules through the cuda backend vs the reference backend (eval path)."""
    from qtool.kernels import select_backend
    from qtool.layouts.w4a8kv4 import W4A8KV4Layout
    from qtool.nn.w4a8 import W4A8Linear
    from qtool.nn.w8a8 import W8A8Linear
    from qtool.quant.progressive import quantize_progressive, quantize_qoq_per_channel
    from qtool.quant.qweight import QuantSpec, quantize_rtn

    cu, rf = select_backend("cuda"), select_backend("reference")
    sec = Section("modules (cuda vs reference backend)")
    sec.flag("backend maps w8a8/w4a8/act ops",
             all(k in cu.ops for k in ("w8a8_gemm", "w4a8_gemm", "quantize_per_token", "quantize_per_tensor")))
    gen = torch.Generator(device="cuda").manual_seed(41)
    for K, N in ((576, 1536), (1536, 576), (4096, 4096)):
        w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        bias = torch.randn(N, device="cuda", generator=gen).half() * 0.1
        x = torch.randn(2, 9, K, device="cuda", generator=gen).half()
        qw = quantize_rtn(w, QuantSpec(bits=8, group_size=-1, symmetric=True))
        a, b = W8A8Linear(qw, bias, cu)(x), W8A8Linear(qw, bias, rf)(x)
        sec.rec(f"W8A8Linear {K}x{N}", rel_err(a, b), 1e-3)
        # static per-tensor input scale (a CPU buffer until the module is moved: the reference op
        # needs it on the GPU, the cuda wrapper moves it itself)
        b = W8A8Linear(qw, bias, rf, input_scale=0.02).cuda()(x)
        a = W8A8Linear(qw, bias, cu, input_scale=0.02).cuda()(x)
        sec.rec(f"W8A8Linear static {K}x{N}", rel_err(a, b), 1e-3)
        a = W8A8Linear(qw, bias, cu, input_scale=0.02)(x)
        sec.rec(f"W8A8Linear static, CPU scale buffer {K}x{N}", rel_err(a, b), 1e-3)
        for g in (128, 64, -1):
            qw4 = quantize_qoq_per_channel(w) if g == -1 else quantize_progressive(w, g, pad=True)
            lay = W4A8KV4Layout()
            t, meta = lay.pack(qw4), lay.pack_meta(qw4)
            a = W4A8Linear(dict(t), meta, bias, cu)(x)
            b = W4A8Linear(dict(t), meta, bias, rf)(x)
            sec.rec(f"W4A8Linear {K}x{N} g={g}", rel_err(a, b), 1e-3)
    sec.done()


# ------------------------------------------------------------------------------------------- KV4


def check_kv4():
    from qtool.nn.w4a8 import kv4_quantize as ref_q

    gen = torch.Generator(device="cuda").manual_seed(51)
    sec = Section("kv4 quantize / write (exact)")
    for D in (64, 128, 256):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = (torch.randn(4, 3, 37, D, device="cuda", generator=gen) * 2).to(dt)
            x[0, 0, 0] = 1.5  # constant vector (degenerate guard)
            x[0, 0, 1] = 0.0
            x[0, 1, 2] += 3000.0  # large offset: |zero| past 2^10
            x[1, 0, 3, : D // 2] = 1e-3  # two-valued small vector
            c, s, z = ops.kv4_quantize(x)
            rc, rs, rz = ref_q(x)
            sec.flag(f"quantize D={D} {dt}", torch.equal(c, rc) and torch.equal(s, rs) and torch.equal(z, rz))
    for D in (64, 128):
        B, H, S = 3, 4, 50
        cache = torch.randint(0, 256, (B, H, S, D // 2), device="cuda", generator=gen, dtype=torch.uint8)
        params = torch.randn(B, H, S, 2, device="cuda", generator=gen).half()
        c0, p0 = cache.clone(), params.clone()
        x = torch.randn(B, H, D, device="cuda", generator=gen).half()
        pos = torch.tensor([0, 17, 49], device="cuda", dtype=torch.int32)
        ops.kv4_write(x, cache, params, pos)
        pk, pp = ops.kv4_pack_cache(*ref_q(x))
        for b in range(B):
            c0[b, :, pos[b]] = pk[b]
            p0[b, :, pos[b]] = pp[b]
        sec.flag(f"kv4_write D={D}", torch.equal(cache, c0) and torch.equal(params, p0))
    sec.done()

    sec = Section("kv4 decode attention")

    def case(B, Hq, Hkv, D, S, lens, split=0, scale=None):
        k = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).half()
        v = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).half()
        k[:, :, :, 3] += 4.0  # a biased channel
        kc, kp = ops.kv4_pack_cache(*ops.kv4_quantize(k))
        vc, vp = ops.kv4_pack_cache(*ops.kv4_quantize(v))
        q = (torch.randn(B, Hq, D, device="cuda", generator=gen) * 1.5).half()
        ctx = torch.tensor(lens, device="cuda", dtype=torch.int32)
        out = torch.full((B, Hq, D), float("nan"), device="cuda", dtype=torch.float16)
        sc = scale if scale is not None else D ** -0.5
        ops.kv4_decode_attention_out(q, kc, kp, vc, vp, ctx, sc, split, out)
        ref = ops.kv4_decode_attention_reference(q, kc, kp, vc, vp, ctx, sc)
        return rel_err(out, ref)

    for kern in KV4_KERNELS:
        os.environ["QTOOL_KV4_KERNEL"] = kern
        for D in (128, 64):
            for Hq, Hkv in ((32, 8), (9, 3), (16, 16), (16, 1)):
                sec.rec(f"{kern} D={D} Hq={Hq} Hkv={Hkv} varlen", case(3, Hq, Hkv, D, 300, [1, 17, 300]), 2e-3)
            for split in (1, 2, 3, 7):
                sec.rec(f"{kern} D={D} split={split}", case(2, 8, 2, D, 1000, [1000, 513], split), 2e-3)
        sec.rec(f"{kern} ctx 0 rows -> zeros", case(2, 8, 2, 128, 64, [0, 64]), 2e-3)
        sec.rec(f"{kern} sm_scale 0.3", case(2, 8, 2, 128, 200, [200, 33], scale=0.3), 2e-3)
        sec.rec(f"{kern} bench size B=64 ctx=4096", case(64, 32, 8, 128, 4096, [4096] * 64), 2e-3)
        sec.rec(f"{kern} B=64 ctx mixed", case(64, 32, 8, 128, 2048, [(i * 97) % 2048 + 1 for i in range(64)]), 2e-3)
    os.environ.pop("QTOOL_KV4_KERNEL", None)
    sec.done()


# ---------------------------------------------------------------------------------- misc checks


def check_misc():
    sec = Section("opcheck + w4a16 still works")
    gen = torch.Generator(device="cuda").manual_seed(61)
    x = torch.randn(5, 576, device="cuda", generator=gen).half()
    w = torch.rand(576, device="cuda", generator=gen).half() + 0.5
    xq, xs, wq, ws, b = w8a8_problem(17, 256, 576, gen, bias=True)
    xq4, xs4, xsum4, t4, b4 = w4a8_problem(9, 256, 640, 128, gen)
    k = torch.randn(2, 2, 40, 64, device="cuda", generator=gen).half()
    kc, kp = ops.kv4_pack_cache(*ops.kv4_quantize(k))
    q = torch.randn(2, 4, 64, device="cuda", generator=gen).half()
    ctx = torch.tensor([40, 7], device="cuda", dtype=torch.int32)
    cases = [
        (torch.ops.qtool_cuda.quantize_per_token.default, (x,)),
        (torch.ops.qtool_cuda.quantize_per_token_sum.default, (x,)),
        (torch.ops.qtool_cuda.rmsnorm_quantize.default, (x, w, 1e-6)),
        (torch.ops.qtool_cuda.quantize_per_tensor.default, (x, torch.tensor([0.01], device="cuda"))),
        (torch.ops.qtool_cuda.w8a8_gemm.default, (xq, xs, wq, ws, b, torch.float16)),
        (torch.ops.qtool_cuda.w4a8_gemm.default,
         (xq4, xs4, None, t4["qweight"], t4["s1_scales"], None, t4["s2_scales"], t4["s2_zeros"], 128, None)),
        (torch.ops.qtool_cuda.w4a8_gemm.default,
         (xq4, xs4, None, t4["qweight"], t4["s1_scales"], None, t4["s2_scales"], t4["s2_zeros"], 128, None,
          torch.float16)),
        (torch.ops.qtool_cuda.kv4_quantize.default, (k,)),
        (torch.ops.qtool_cuda.kv4_decode_attention.default, (q, kc, kp, kc, kp, ctx, 0.125, 0)),
    ]
    for op, args in cases:
        try:
            torch.library.opcheck(op, args)
            sec.flag(f"opcheck {op}", True)
        except Exception as e:  # noqa: BLE001
            say(f"  opcheck {op}: {type(e).__name__}: {str(e)[:300]}")
            sec.flag(f"opcheck {op}", False)
    # error path raises cleanly (no segfault): K mismatch
    try:
        torch.ops.qtool_cuda.w8a8_gemm(xq[:, :560], xs, wq, ws, None, torch.float16)
        sec.flag("w8a8 K mismatch raises", False)
    except RuntimeError as e:
        sec.flag("w8a8 K mismatch raises", "xq [M, K]" in str(e))
    try:
        from kernels_cuda.reference import random_problem, reference

        x16, q16, z16, s16, t16 = random_problem(7, 512, 1024, 128, gen=gen)
        y = ops.w4a16_gemm(x16, t16["qweight"], t16["scales"], t16["qzeros"], 128)
        sec.rec("w4a16 default op", rel_err(y, reference(x16, q16, z16, s16, 128)), 1e-3)
    except Exception as e:  # noqa: BLE001
        say(f"  w4a16: {type(e).__name__}: {e}")
        sec.flag("w4a16", False)
    sec.done()


# -------------------------------------------------------------------------------------- sweep


def sweep(results, ms=(1, 16, 64, 256, 1024, 4096), sweep_fmts=("w8a8", "w4a8g128", "w4a8chn")):
    from qtool.bench import _copies, make_w4a8_weights, make_w8a8_weights, time_rotating

    out = []
    for K, N in ((4096, 4096), (4096, 22016), (11008, 4096), (14336, 4096)):
        w8 = make_w8a8_weights(K, N, _copies(K * N, 192 << 20))
        w4 = make_w4a8_weights(K, N, 128, _copies(K * N // 2, 192 << 20))
        w4c = make_w4a8_weights(K, N, -1, _copies(K * N // 2, 192 << 20))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01
            xsum = xq.float().sum(-1, keepdim=True) * xs
            for fmt, name in ((ops.FMT_W8, "w8a8"), (ops.FMT_W4PG, "w4a8g128"), (ops.FMT_W4PC, "w4a8chn")):
                if name not in sweep_fmts:
                    continue
                auto = ops.i8_choose(fmt, M, N, K)
                res = []
                for cfg in range(n_cfg()):
                    if not cfg_ok_for(cfg, fmt, M):
                        continue
                    info = ops.i8_config_info(cfg)
                    if info["kind"] == "tiled" and M <= 16 and info["bm"] > 32:
                        continue
                    if info["kind"] != "decode" and M >= 1024 and info["bm"] < 64:
                        continue
                    if info["kind"] == "tiled" and M > 16:
                        splits = (1,) if M >= 1024 else (1, 2)
                    else:
                        splits = (1,) if M >= 1024 else (1, 2, 3, 4, 8)
                    for s in splits:
                        if fmt == ops.FMT_W8:
                            outb = torch.empty(M, N, device="cuda", dtype=torch.float16)
                            calls = [lambda t=t, c=cfg, s=s, o=outb: ops.w8a8_gemm_out(xq, xs, t[0], t[1], None, o, c, s)
                                     for t in w8]
                        elif fmt == ops.FMT_W4PG:
                            outb = torch.empty(M, N, device="cuda")
                            calls = [lambda t=t, c=cfg, s=s, o=outb: ops.w4a8_gemm_out(
                                xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128,
                                None, o, c, s) for t in w4]
                        else:
                            outb = torch.empty(M, N, device="cuda")
                            calls = [lambda t=t, c=cfg, s=s, o=outb: ops.w4a8_gemm_out(
                                xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1,
                                None, o, c, s) for t in w4c]
                        try:
                            us = time_rotating(calls, target_s=0.02, max_reps=40)
                        except RuntimeError as e:
                            say(f"  sweep {name} cfg={cfg} s={s}: {str(e)[:100]}")
                            continue
                        res.append((us, cfg, s))
                res.sort()
                auto_us = next((u for u, c, s in res if (c, s) == auto), None)
                say(f"[sweep] {name} {K}x{N} M={M}: best c{res[0][1]}/s{res[0][2]} {res[0][0]:.1f}us; auto "
                    f"c{auto[0]}/s{auto[1]} {'%.1f' % auto_us if auto_us else '?'}us; "
                    + ", ".join(f"c{c}/s{s}={u:.1f}" for u, c, s in res[:6]))
                out.append(dict(fmt=name, K=K, N=N, M=M, auto=list(auto), auto_us=auto_us,
                                results=[dict(us=u, cfg=c, split=s) for u, c, s in res]))
        del w8, w4, w4c
        torch.cuda.empty_cache()
    results["sweep"] = out


# --------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated check sections (act,w8a8,w4a8,modules,kv4,misc)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / ".out")))
    ap.add_argument("--ms", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--sweep-ms", default="1,16,64,256,1024,4096")
    ap.add_argument("--sweep-fmts", default="w8a8,w4a8g128,w4a8chn")
    ap.add_argument("--bench-ops", default="w8a8,w4a8,kv4attn,act_quant")
    ap.add_argument("--target-s", type=float, default=0.04)
    ap.add_argument("--kv4-variants", default="ring",
                    help="QTOOL_KV4_KERNEL choices timed after the default kv4attn rows (u4,u5,u6,ring)")
    args = ap.parse_args()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    LIVE.append(open(outdir / "log_live.txt", "w"))  # noqa: SIM115
    results: dict = {}
    p = torch.cuda.get_device_properties(0)
    say(f"[env] {p.name} sm_{p.major}{p.minor} SMs={p.multi_processor_count} "
        f"L2={getattr(p, 'L2_cache_size', 0) / 2**20:.0f}MiB torch={torch.__version__} cuda={torch.version.cuda}")
    t0 = time.time()
    path = ops.load(verbose=False)
    say(f"[build] loaded from {path} in {time.time() - t0:.1f}s")
    cfgs = [ops.i8_config_info(c) for c in range(n_cfg())]
    say("[cfg] " + "; ".join(f"c{i} {c['kind']} {c['bm']}x{c['bn']} avail={c['available']}" for i, c in enumerate(cfgs)))
    status = 0
    try:
        if not args.no_check:
            sel = set(filter(None, args.only.split(",")))
            for key, fn in (("act", check_act_quant), ("w8a8", check_w8a8), ("w4a8", check_w4a8),
                            ("modules", check_modules), ("kv4", check_kv4), ("misc", check_misc)):
                if not sel or key in sel:
                    run_section(fn)
                    torch.cuda.synchronize()
                    if key == "w4a8":
                        wg_fail = any(re.search(r"cfg=(6|7|8|9|1[0-2]) ", f)
                                      for name, fs in FAILS.items() if name.startswith("w4a8 configs x splits")
                                      for f in fs)
                        if wg_fail:
                            os.environ["QTOOL_I8_W4_WGMMA"] = "0"
                            say("[check] W4A8 wgmma configs failed: defaults fall back to mma.sync for W4A8")
            say("\n==== correctness summary (early) ====")
            for name, ok, n, note in SUMMARY:
                say(f"{'PASS' if ok == n else 'FAIL'} {ok:4d}/{n:<4d} {name}: {note}")
        if not args.no_bench:
            from qtool.bench import KV4_DEFAULT_KERNEL, format_table, run_bench, summarize_issue7

            t0 = time.time()
            ms = [int(v) for v in args.ms.split(",")]
            bops = tuple(args.bench_ops.split(","))
            rows = run_bench(ops=bops, ms=ms, backend="cuda", echo=False,
                             target_s=args.target_s, log=lambda s: say("[bench] " + s))
            if "kv4attn" in bops:  # the other QTOOL_KV4_KERNEL choices too, at the same bandwidth
                bw0 = next(r for r in rows if r.get("op") == "kv4attn")["bw_tbs"] * 1e12
                say(f"[bench] kv4attn floors at {bw0 / 1e12:.2f} TB/s (measured copy bandwidth)")
                for kern in filter(None, args.kv4_variants.split(",")):
                    os.environ["QTOOL_KV4_KERNEL"] = kern  # the bench rows record it as their kernel
                    rows += run_bench(ops=("kv4attn",), backend="cuda", echo=False, target_s=args.target_s,
                                      bw=bw0, peak=1e15, log=lambda s, k=kern: say(f"[bench {k}] " + s))
                os.environ.pop("QTOOL_KV4_KERNEL", None)
            results["bench"] = rows
            say(f"[time] bench: {time.time() - t0:.1f}s; BW {rows[0].get('bw_tbs', 0) or 0:.2f} TB/s")
            (outdir / "bench_tables.txt").write_text(format_table(rows) + "\n")
            say(format_table([r for r in rows if r["op"] in ("kv4attn", "act_quant")]))
            say(summarize_issue7([r for r in rows if r.get("kernel", KV4_DEFAULT_KERNEL) == KV4_DEFAULT_KERNEL]))
            for op in ("w8a8", "w4a8"):
                rs = [r for r in rows if r["op"] == op]
                if rs:
                    say(f"[bench] {op}: median ×fp16 {statistics.median(r['x_fp16'] for r in rs):.2f}; "
                        f"see bench_tables.txt")
        if not args.no_sweep:
            t0 = time.time()
            try:
                sweep(results, [int(v) for v in args.sweep_ms.split(",")], tuple(args.sweep_fmts.split(",")))
            except Exception:  # noqa: BLE001
                say(traceback.format_exc())
            say(f"[time] sweep: {time.time() - t0:.1f}s")
    except (Exception, KeyboardInterrupt):  # noqa: BLE001
        say(traceback.format_exc())
        status = 2
    finally:
        results["summary"] = SUMMARY
        (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (outdir / "log.txt").write_text("\n".join(LOG) + "\n")
    say("\n==== correctness summary ====")
    allok = True
    for name, ok, n, note in SUMMARY:
        allok &= ok == n
        say(f"{'PASS' if ok == n else 'FAIL'} {ok:4d}/{n:<4d} {name}: {note}")
    if not allok:
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
