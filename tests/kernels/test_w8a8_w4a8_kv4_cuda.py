"""CUDA int8 activation quantizers, W8A8 / W4A8 GEMMs and KV4 cache kernels against their PyTorch
references (`kernels_cuda.ops`, issue 7). GPU tests skip cleanly without a GPU.

CPU parts (always run): the wrappers fall back to the references for CPU tensors, the KV4 cache
pack/unpack helpers round-trip, the decode-attention reference equals a plain softmax attention over
the dequantized cache, and importing `kernels_cuda.ops` touches no CUDA.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


# ------------------------------------------------------------------------------------ CPU parts


def test_wrappers_fall_back_on_cpu():
    from kernels_cuda import ops
    from qtool.nn.w4a8 import kv4_quantize as ref_kv4
    from qtool.nn.w4a8 import w4a8_gemm as ref_w4
    from qtool.nn.w8a8 import w8a8_gemm as ref_w8
    from qtool.quant.activations import quantize_per_tensor as ref_pt
    from qtool.quant.activations import quantize_per_token as ref_ptq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    q, s = ops.quantize_per_token(x)
    rq, rs = ref_ptq(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    q, s, sm = ops.quantize_per_token_sum(x)
    assert torch.equal(sm, rq.float().sum(-1, keepdim=True) * rs)
    assert torch.equal(ops.quantize_per_tensor(x, 0.01), ref_pt(x, 0.01))
    xq = torch.randint(-127, 128, (3, 32), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(3, 1, generator=g), torch.rand(16, generator=g)
    assert torch.equal(ops.w8a8_gemm(xq, xs, w, ws, None, torch.float16), ref_w8(xq, xs, w, ws, None, torch.float16))
    with pytest.raises(TypeError):
        ops.w8a8_gemm(xq.float(), xs, w, ws, None, torch.float16)
    from qtool.bench import random_w4a8

    t = random_w4a8(64, 32, 32, "cpu", g)
    xq = torch.randint(-127, 128, (3, 64), generator=g, dtype=torch.int8)
    a = ops.w4a8_gemm(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 32)
    assert torch.equal(a, ref_w4(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 32))
    a16 = ops.w4a8_gemm(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 32, None,
                        torch.float16)
    assert a16.dtype == torch.float16 and torch.equal(a16, a.half())
    kx = torch.randn(2, 3, 128, generator=g)
    assert all(torch.equal(u, v) for u, v in zip(ops.kv4_quantize(kx), ref_kv4(kx)))


def test_random_w4a8_respects_kernel_bounds():
    from qtool.bench import random_w4a8
    from qtool.layouts.w4a8kv4 import unpack_qweight, unpack_s2

    g = torch.Generator().manual_seed(1)
    t = random_w4a8(256, 64, 128, "cpu", g)
    q4 = unpack_qweight(t["qweight"]).to(torch.int32)
    s2 = unpack_s2(t["s2_scales"]).to(torch.int32).repeat_interleave(128, dim=1)
    z = unpack_s2(t["s2_zeros"]).to(torch.int32).repeat_interleave(128, dim=1)
    w8 = q4 * s2 + z
    assert int((q4 * s2).max()) <= 255 and int(w8.min()) >= -128 and int(w8.max()) <= 127


@pytest.mark.parametrize("G,N", [(1, 32), (3, 64), (7, 192), (12, 4096), (0, 32)])
def test_s2_tiles_pack_is_exact_and_matches_the_kernel_decode(G, N):
    # pack_s2_tiles (GemmArgs::pgs): exact inverse on random data, and per lane group i of a tile the bytes the
    # decode kernel reads -- the zero word at 4i, the half-word at 32 + 2i turned into the s2 word by pg_s2_word
    from kernels_cuda.ops import pack_s2_tiles, unpack_s2_tiles

    g = torch.Generator().manual_seed(G * N + 1)
    s2 = torch.randint(1, 17, (G, N), generator=g).to(torch.int8)
    z = torch.randint(-128, 128, (G, N), generator=g).to(torch.int8)
    t = pack_s2_tiles(s2, z)
    assert t.dtype == torch.uint8 and t.shape == (N // 32, G, 48) and t.is_contiguous()
    s2b, zb = unpack_s2_tiles(t)
    assert torch.equal(s2b, s2) and torch.equal(zb, z)
    b = t.long()
    for tile in range(min(N // 32, 3)):
        for grp in range(G):
            for i in range(8):
                h = int(b[tile, grp, 32 + 2 * i]) | int(b[tile, grp, 33 + 2 * i]) << 8
                word = (((h | (h << 12)) & 0x0F0F0F0F) + 0x01010101) & 0xFFFFFFFF  # pg_s2_word in w8a8_gemm.cuh
                cols = range(32 * tile + 4 * i, 32 * tile + 4 * i + 4)
                assert [(word >> 8 * j) & 255 for j in range(4)] == [int(s2[grp, c]) for c in cols]
                assert [int(b[tile, grp, 4 * i + j]) for j in range(4)] == [int(z[grp, c]) & 255 for c in cols]


def test_s2_tiles_pack_refuses_what_the_nibbles_cannot_hold():
    from kernels_cuda.ops import pack_s2_tiles, unpack_s2_tiles

    z = torch.zeros(2, 64, dtype=torch.int8)
    for bad in (17, 0, -3):
        s2 = torch.ones(2, 64, dtype=torch.int8)
        s2[1, 40] = bad
        assert pack_s2_tiles(s2, z) is None  # the kernels then read s2_scales / s2_zeros
    with pytest.raises(ValueError, match="N % 32"):
        pack_s2_tiles(torch.ones(2, 48, dtype=torch.int8), torch.zeros(2, 48, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_s2_tiles(torch.ones(2, 64, dtype=torch.int16), z)
    with pytest.raises(ValueError, match="48"):
        unpack_s2_tiles(torch.zeros(2, 1, 64, dtype=torch.uint8))


def test_kv4_cache_pack_round_trip_and_reference():
    from kernels_cuda import ops
    from qtool.nn.w4a8 import kv4_dequantize, kv4_quantize

    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, S, D = 2, 6, 2, 20, 64
    k = torch.randn(B, Hkv, S, D, generator=g).half()
    v = torch.randn(B, Hkv, S, D, generator=g).half()
    qk, sk, zk = kv4_quantize(k)
    kc, kp = ops.kv4_pack_cache(qk, sk, zk)
    assert kc.shape == (B, Hkv, S, D // 2) and kp.shape == (B, Hkv, S, 2)
    c2, s2, z2 = ops.kv4_unpack_cache(kc, kp)
    assert torch.equal(c2, qk) and torch.equal(s2, sk) and torch.equal(z2, zk)
    vc, vp = ops.kv4_pack_cache(*kv4_quantize(v))
    q = torch.randn(B, Hq, D, generator=g).half()
    lens = torch.tensor([20, 7])
    out = ops.kv4_decode_attention_reference(q, kc, kp, vc, vp, lens)
    kd = kv4_dequantize(qk, sk, zk, torch.float32)
    vd = kv4_dequantize(*kv4_quantize(v), torch.float32)
    for b in range(B):
        n = int(lens[b])
        kk = kd[b, :, :n].repeat_interleave(Hq // Hkv, 0)
        vv = vd[b, :, :n].repeat_interleave(Hq // Hkv, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b].float().unsqueeze(1), kk, vv).squeeze(1)
        assert rel_err(out[b], ref) < 1e-5


def test_rmsnorm_quantize_reference_matches_hf_formula():
    from kernels_cuda import ops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 96, generator=g)
    w = torch.rand(96, generator=g) + 0.5
    q, s, sm = ops.rmsnorm_quantize(x, w, 1e-6)  # CPU: the reference
    y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert float((q.float() * s - y).abs().max()) <= float(s.max()) * 0.5 + 1e-6
    assert torch.allclose(sm, q.float().sum(-1, keepdim=True) * s)


def test_decode_ab_summary_takes_each_shapes_fastest_op():
    # kernels_cuda/ab_decode_cfgs.py's summary: per W4 format and M, fastest W4 op vs fastest W8A8 op per shape, and
    # the medians over shapes (best / best, default / default); shapes without a W8A8 row are left out
    from kernels_cuda.ab_decode_cfgs import summarize

    rows = [("4096x4096", 16, "w8a8", {"default c13/s1": 7.0, "c36": 6.4}),
            ("4096x4096", 16, "g128", {"default c13/s1": 5.0, "c29": 4.0}),
            ("4096x12288", 16, "w8a8", {"default c27/s1": 20.0}),
            ("4096x12288", 16, "g128", {"default c1/s1": 12.5, "c31": 10.0, "c35": 11.0}),
            ("11008x4096", 16, "g128", {"default c19/s1": 9.0})]
    (line,) = summarize(rows)
    assert line.startswith("g128 M=16: median best/best 1.800, default/default 1.500")
    assert "4096x4096 c29 4.00 / W8A8 c36 6.40 = 1.600" in line and "4096x12288 c31 10.00" in line
    assert "11008x4096" not in line


def test_import_is_lazy():
    import importlib

    ops = importlib.import_module("kernels_cuda.ops")
    assert callable(ops.cuda_ops) and callable(ops.kv4_decode_attention)


# ------------------------------------------------------------------------------------ GPU parts


def _ops():
    from kernels_cuda import ops

    ops.load()
    return ops


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(1, 576), (17, 4096), (100, 14336), (3, 100), (5, 20000)])
def test_quantize_per_token_exact(dt, M, K):
    from qtool.quant.activations import quantize_per_token as ref

    ops = _ops()
    x = (torch.randn(M, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(M + K)) * 3).to(dt)
    q = torch.full((M, K), -128, device="cuda", dtype=torch.int8)
    s = torch.full((M, 1), float("nan"), device="cuda")
    sm = torch.full((M, 1), float("nan"), device="cuda")
    torch.ops.qtool_cuda.act_quant_out(x, None, 0.0, q, s, sm, True)
    rq, rs = ref(x)  # on the GPU: PyTorch's CUDA numerics (see act_quant_kernels.cu)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert torch.equal(sm, rq.float().sum(-1, keepdim=True) * rs)
    from qtool.quant.activations import quantize_per_tensor as ref_pt

    sc = torch.tensor([0.01], device="cuda")
    assert torch.equal(ops.quantize_per_tensor(x, sc), ref_pt(x, sc))


@pytest.mark.gpu
@gpu
def test_rmsnorm_quantize_close():
    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(4)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(33, 4096, device="cuda", generator=g).to(dt)
        w = (torch.rand(4096, device="cuda", generator=g) + 0.5).to(dt)
        q, s, sm = ops.rmsnorm_quantize(x, w, 1e-6)
        rq, rs, rsm = ops.rmsnorm_quantize_reference(x, w, 1e-6)
        d = (q.int() - rq.int()).abs()
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 5e-3
        assert rel_err(s, rs) < 1e-5 and rel_err(sm, rsm) < 1e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (16, 576, 576), (17, 192, 576), (100, 1536, 576),
                                   (300, 576, 1536), (1000, 4096, 4096), (7, 1001, 1024)])
def test_w8a8_default(M, N, K):
    from qtool.nn.w8a8 import w8a8_gemm as ref

    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N)
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), device="cuda", generator=g, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=g) * 0.02
    ws = torch.rand(N, device="cuda", generator=g) * 1e-3
    b = torch.randn(N, device="cuda", generator=g).half()
    for dt, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3), (torch.float32, 1e-5)):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        ops.w8a8_gemm_out(xq, xs, w, ws, b, out)
        assert rel_err(out, ref(xq, xs, w, ws, b, torch.float32)) <= tol


@pytest.mark.gpu
@gpu
def test_w8a8_every_config_and_split():
    from qtool.nn.w8a8 import w8a8_gemm as ref

    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(5)
    n = ops.i8_config_info(0)["num_configs"]
    # (16, 200, 576): N not a multiple of 32, so the last decode CTA's tile is partial
    for M, N, K in ((3, 384, 576), (16, 200, 576), (130, 256, 2048)):
        xq = torch.randint(-127, 128, (M, K), device="cuda", generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (N, K), device="cuda", generator=g, dtype=torch.int8)
        xs, ws = torch.rand(M, 1, device="cuda", generator=g), torch.rand(N, device="cuda", generator=g) * 1e-3
        r = ref(xq, xs, w, ws, None, torch.float32)
        for cfg in range(n):
            info = ops.i8_config_info(cfg)
            if (info["kind"] == "decode" and M > info["bm"]) or not info["available"]:
                continue
            for split in (1, 2, 3):
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                ops.w8a8_gemm_out(xq, xs, w, ws, None, out, cfg, split)
                assert rel_err(out, r) <= 1e-3, (cfg, split)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [128, 64, -1])
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (16, 576, 640), (11, 608, 768), (17, 192, 576),
                                   (100, 1536, 640), (1000, 576, 1536)])
def test_w4a8_matches_integer_reference(g, M, N, K):
    from qtool.bench import random_w4a8
    from qtool.nn.w4a8 import w4a8_gemm as ref

    if g > 0 and K % g:
        pytest.skip("K not a multiple of the group")
    ops = _ops()
    gen = torch.Generator(device="cuda").manual_seed(M + N + K + g)
    t = random_w4a8(K, N, g, "cuda", gen)
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    xsum = xq.float().sum(-1, keepdim=True) * xs if g < 0 else None
    args = (xq, xs, xsum, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"), t.get("s2_zeros"), g,
            None)
    r = ref(*args)
    n = ops.i8_config_info(0)["num_configs"]
    for cfg in [-1, *range(n)]:
        if cfg >= 0:
            info = ops.i8_config_info(cfg)
            fmt = ops.FMT_W4PG if g > 0 else ops.FMT_W4PC
            if (info["kind"] == "decode" and M > info["bm"]) or not ops.i8_supports(info, fmt):
                continue
        out = torch.full((M, N), float("nan"), device="cuda")
        ops.w4a8_gemm_out(*args, out, cfg, 0)
        assert rel_err(out, r) <= 1e-3, cfg


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [128, -1])
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (17, 576, 640), (1024, 1536, 1024)])
def test_w4a8_half_outputs_are_the_fp32_result_rounded_once(g, M, N, K):
    # every config's epilogue computes the fp32 value and rounds it once in its store
    from qtool.bench import random_w4a8
    from qtool.nn.w4a8 import w4a8_gemm as ref

    ops = _ops()
    gen = torch.Generator(device="cuda").manual_seed(7 * M + N + K + g)
    t = random_w4a8(K, N, g, "cuda", gen)
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    xsum = xq.float().sum(-1, keepdim=True) * xs if g < 0 else None
    bias = torch.randn(N, device="cuda", generator=gen).half()
    args = (xq, xs, xsum, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"), t.get("s2_zeros"), g,
            bias)
    fmt = ops.FMT_W4PG if g > 0 else ops.FMT_W4PC
    n = ops.i8_config_info(0)["num_configs"]
    tried = 0
    for cfg in [-1, *range(n)]:
        if cfg >= 0:
            info = ops.i8_config_info(cfg)
            if (info["kind"] == "decode" and M > info["bm"]) or not ops.i8_supports(info, fmt):
                continue
        o32 = torch.full((M, N), float("nan"), device="cuda")
        ops.w4a8_gemm_out(*args, o32, cfg, 0)
        for dt in (torch.float16, torch.bfloat16):
            o = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
            ops.w4a8_gemm_out(*args, o, cfg, 0)
            assert torch.equal(o, o32.to(dt)), (cfg, dt)
        tried += 1
    assert tried >= 3
    y = ops.w4a8_gemm(*args, torch.float16)  # the allocating op
    assert y.dtype == torch.float16 and rel_err(y, ref(*args)) <= 2e-3


def _w4a8_per_group_extremes(K, N, group, gen, s2_values=(1, 16, 17)):
    """Per-group QServe tensors that reach the layout's integer bounds: s2 in {1, 16, 17} and zeros
    drawn over their whole valid range, so W8 = q4*s2 - zs hits -128 and 127 (s2 = 17, zs = 128).
    Other s2_values: the same draw over them (the bounds are hit only where 17 is among them)."""
    from qtool.layouts.w4a8kv4 import pack_qweight, pack_s2

    q4 = torch.randint(0, 16, (N, K), device="cuda", generator=gen, dtype=torch.uint8)
    q4[:, :32] = 15
    q4[:, 32:64] = 0
    G = K // group
    vals = torch.tensor(s2_values, device="cuda")
    s2 = vals[torch.randint(0, len(s2_values), (N, G), device="cuda", generator=gen)]
    lo = (15 * s2 - 127).clamp(min=0)
    zs = lo + (torch.rand(N, G, device="cuda", generator=gen) * (129 - lo)).long().clamp(max=128 - lo)
    zs[s2 == 17] = 128
    s1 = (torch.rand(N, device="cuda", generator=gen) * 1e-3 + 1e-4).half()
    w8 = q4.long() * s2.repeat_interleave(group, 1) - zs.repeat_interleave(group, 1)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127
    if 17 in s2_values:
        assert int(w8.min()) == -128 and int(w8.max()) == 127
    return {"qweight": pack_qweight(q4), "s1_scales": s1, "s2_scales": pack_s2(s2.to(torch.int8)),
            "s2_zeros": pack_s2((-zs).to(torch.int8))}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [32, 64, 128, 192, 256])
@pytest.mark.parametrize("M", [17, 100, 300])
def test_w4a8_per_group_every_config_bitwise_equal(g, M):
    # The int32 sums are exact, so every config and split gives the same bits (mma.sync tiles, the
    # wgmma kernels, the register-A kernels), also at the layout's extreme values and for groups that
    # change inside a 128-k stage (g32 / g64) or span stages (g192 / g256).
    from qtool.nn.w4a8 import w4a8_gemm as ref

    ops = _ops()
    N, K = 512, 768
    gen = torch.Generator(device="cuda").manual_seed(1000 * g + M)
    t = _w4a8_per_group_extremes(K, N, g, gen)
    xq = torch.randint(-128, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xq[0] = 127
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    args = (xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], g, None)
    r = ref(*args)

    def run(cfg, split):
        out = torch.full((M, N), float("nan"), device="cuda")
        ops.w4a8_gemm_out(*args, out, cfg, split)
        return out

    base = run(2, 1)  # mma.sync tile
    assert rel_err(base, r) <= 1e-3
    n = ops.i8_config_info(0)["num_configs"]
    tried = 0
    for cfg in range(n):
        info = ops.i8_config_info(cfg)
        if info["kind"] == "decode" or not ops.i8_supports(info, ops.FMT_W4PG):
            continue
        for split in (1, 2, 3):
            assert torch.equal(run(cfg, split), base), (cfg, split)
            tried += 1
    assert tried >= 3
    assert ops.i8_supports(ops.i8_config_info(20), ops.FMT_W4PG)  # the dequantizing config was among them


@pytest.mark.gpu
@gpu
def test_kv4_quantize_and_write_exact():
    from qtool.nn.w4a8 import kv4_quantize as ref

    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(3, 4, 9, 128, device="cuda", generator=g).half()
    x[0, 0, 0] = 0.5
    assert all(torch.equal(u, v) for u, v in zip(ops.kv4_quantize(x), ref(x)))
    cache = torch.zeros(3, 4, 16, 64, device="cuda", dtype=torch.uint8)
    params = torch.zeros(3, 4, 16, 2, device="cuda", dtype=torch.float16)
    pos = torch.tensor([0, 5, 15], device="cuda", dtype=torch.int32)
    xn = x[:, :, 0]
    ops.kv4_write(xn, cache, params, pos)
    pk, pp = ops.kv4_pack_cache(*ref(xn))
    for b in range(3):
        assert torch.equal(cache[b, :, pos[b]], pk[b]) and torch.equal(params[b, :, pos[b]], pp[b])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hq,Hkv,D,S,lens,split", [
    (3, 32, 8, 128, 300, [1, 17, 300], 0), (2, 9, 3, 64, 1000, [1000, 513], 3), (2, 16, 1, 128, 64, [0, 64], 1),
    (4, 8, 8, 64, 129, [129, 128, 16, 2], 2)])
@pytest.mark.parametrize("kern", ["", "u5", "u6", "ring"])  # QTOOL_KV4_KERNEL ("" = default u4)
def test_kv4_decode_attention(B, Hq, Hkv, D, S, lens, split, kern, monkeypatch):
    monkeypatch.setenv("QTOOL_KV4_KERNEL", kern)  # read per call by kv4_attention.cu
    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(B + S)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=g).half()
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=g).half()
    kc, kp = ops.kv4_pack_cache(*ops.kv4_quantize(k))
    vc, vp = ops.kv4_pack_cache(*ops.kv4_quantize(v))
    q = torch.randn(B, Hq, D, device="cuda", generator=g).half()
    ctx = torch.tensor(lens, device="cuda", dtype=torch.int32)
    out = torch.full((B, Hq, D), float("nan"), device="cuda", dtype=torch.float16)
    ops.kv4_decode_attention_out(q, kc, kp, vc, vp, ctx, D ** -0.5, split, out)
    assert rel_err(out, ops.kv4_decode_attention_reference(q, kc, kp, vc, vp, ctx)) <= 2e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kern", ["v1", "t4", "u", "ring2"])  # removed kernels and near misses
def test_kv4_decode_attention_refuses_an_unknown_kernel_choice(kern, monkeypatch):
    monkeypatch.setenv("QTOOL_KV4_KERNEL", kern)
    ops = _ops()
    B, Hq, Hkv, D, S = 1, 8, 2, 64, 32
    k = torch.randn(B, Hkv, S, D, device="cuda").half()
    kc, kp = ops.kv4_pack_cache(*ops.kv4_quantize(k))
    q = torch.randn(B, Hq, D, device="cuda").half()
    ctx = torch.tensor([S], device="cuda", dtype=torch.int32)
    out = torch.zeros(B, Hq, D, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="QTOOL_KV4_KERNEL must be unset or one of u4, u5, u6, ring"):
        ops.kv4_decode_attention_out(q, kc, kp, kc, kp, ctx, D ** -0.5, 1, out)


@pytest.mark.gpu
@gpu
def test_backend_maps_the_ops_and_modules_agree():
    from qtool.kernels import select_backend
    from qtool.layouts.w4a8kv4 import W4A8KV4Layout
    from qtool.nn.w4a8 import W4A8Linear
    from qtool.nn.w8a8 import W8A8Linear
    from qtool.quant.progressive import quantize_progressive
    from qtool.quant.qweight import QuantSpec, quantize_rtn

    cu, rf = select_backend("cuda"), select_backend("reference")
    for name in ("w8a8_gemm", "w4a8_gemm", "quantize_per_token", "quantize_per_tensor", "kv4_quantize"):
        assert name in cu.ops
    g = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(1536, 576, device="cuda", generator=g) * 0.02
    x = torch.randn(3, 5, 576, device="cuda", generator=g).half()
    qw = quantize_rtn(w, QuantSpec(bits=8, group_size=-1, symmetric=True))
    assert rel_err(W8A8Linear(qw, None, cu)(x), W8A8Linear(qw, None, rf)(x)) <= 1e-3
    q4 = quantize_progressive(w, 128, pad=True)
    lay = W4A8KV4Layout()
    t, meta = lay.pack(q4), lay.pack_meta(q4)
    assert rel_err(W4A8Linear(dict(t), meta, None, cu)(x), W4A8Linear(dict(t), meta, None, rf)(x)) <= 1e-3


@pytest.mark.gpu
@gpu
def test_opcheck():
    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(5, 576, device="cuda", generator=g).half()
    torch.library.opcheck(torch.ops.qtool_cuda.quantize_per_token_sum.default, (x,))
    xq = torch.randint(-127, 128, (17, 576), device="cuda", generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (256, 576), device="cuda", generator=g, dtype=torch.int8)
    torch.library.opcheck(torch.ops.qtool_cuda.w8a8_gemm.default,
                          (xq, torch.rand(17, 1, device="cuda"), w, torch.rand(256, device="cuda"), None,
                           torch.float16))
    assert ops.kv4_decode_attention is not None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["0", "1", "2"])
def test_int8_decode_pdl_modes_agree(monkeypatch, mode):
    # QTOOL_I8_PDL is read per call; the decode kernels (M <= 16) give the same bitwise result in every
    # programmatic-dependent-launch mode, eagerly and in a CUDA graph of back-to-back dependent calls
    # (where each call's activations are the previous call's output: the wait must hold).
    from qtool.bench import random_w4a8
    from qtool.nn.w4a8 import w4a8_gemm as ref4

    ops = _ops()
    gen = torch.Generator(device="cuda").manual_seed(9)
    for M in (1, 5, 16):
        K = N = 1024
        t = random_w4a8(K, N, 128, "cuda", gen)
        xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
        xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
        w = torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
        ws = torch.rand(N, device="cuda", generator=gen) * 1e-3
        args4 = (xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128, None)

        def w4(x):
            return ops.w4a8_gemm(x, *args4)

        def chain(x):  # W8A8 then W4A8 on the W8A8 output, requantized on the GPU
            y = ops.w8a8_gemm(x, xs, w, ws, None, torch.float16)
            return w4(torch.clamp(torch.round(y.float() * 4), -127, 127).to(torch.int8))

        monkeypatch.setenv("QTOOL_I8_PDL", "0")
        base4, base_chain = w4(xq), chain(xq)
        monkeypatch.setenv("QTOOL_I8_PDL", mode)
        assert torch.equal(w4(xq), base4) and rel_err(base4, ref4(xq, *args4)) <= 1e-3
        assert torch.equal(chain(xq), base_chain)
        outs = []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                outs.append(chain(xq))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, base_chain) for o in outs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 3, 8])
def test_int8_swapped_decode_equals_unswapped(M):
    # The swapped decode configs (weights as the m16 operand, M <= 8) sum the same int32 products in
    # another order and share the epilogue: bitwise equal to the unswapped c0, at every split.
    from qtool.bench import random_w4a8

    ops = _ops()
    gen = torch.Generator(device="cuda").manual_seed(40 + M)
    N, K = 576, 1536
    n = ops.i8_config_info(0)["num_configs"]
    # every 8-row decode config but c0 is a swapped one (c14-c18; c18 runs the W4 formats only), and c21-c24 (4 rows)
    swapped = [c for c in range(1, n)
               if ops.i8_config_info(c)["kind"] == "decode" and ops.i8_config_info(c)["bm"] in (4, 8)]
    assert len(swapped) == 9
    xq = torch.randint(-127, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    w = torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
    ws = torch.rand(N, device="cuda", generator=gen) * 1e-3
    for g in (0, 128, -1):
        if g == 0:
            def run(cfg, split):
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                ops.w8a8_gemm_out(xq, xs, w, ws, None, out, cfg, split)
                return out
        else:
            t = random_w4a8(K, N, g, "cuda", gen)
            xsum = xq.float().sum(-1, keepdim=True) * xs if g < 0 else None
            args = (xq, xs, xsum, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"),
                    t.get("s2_zeros"), g, None)

            def run(cfg, split, args=args):
                out = torch.full((M, N), float("nan"), device="cuda")
                ops.w4a8_gemm_out(*args, out, cfg, split)
                return out
        base = run(0, 1)
        for cfg in swapped:
            fmt = ops.FMT_W8 if g == 0 else ops.FMT_W4PG if g > 0 else ops.FMT_W4PC
            if not ops.i8_supports(ops.i8_config_info(cfg), fmt) or M > ops.i8_config_info(cfg)["bm"]:
                continue
            for split in (1, 2, 3):
                assert torch.equal(run(cfg, split), base), (g, cfg, split)


@pytest.mark.gpu
@gpu
def test_decode_four_row_config_rule():
    # Up to 4 rows, where the 32-column tiles fill the GPU, c21 (a 3-stage ring of 4 token rows: 6 per-group CTAs per
    # SM) replaces c14 for W8 and per-group W4; per-channel keeps c15 (H100, fifteenth session, 4096x22016 M=1 g128
    # c21 18.1 us vs c14 19.7; chn c15 16.9, c21 17.1).
    ops = _ops()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if 22016 // 32 < 4 * sms:  # c14's occupancy is 4 CTAs per SM
        pytest.skip("a GPU whose SMs the 688 tiles of N = 22016 do not fill")
    for M in (1, 4):
        assert ops.i8_choose(ops.FMT_W4PG, M, 22016, 4096)[0] == 21
        assert ops.i8_choose(ops.FMT_W8, M, 22016, 4096)[0] == 21
        assert ops.i8_choose(ops.FMT_W4PC, M, 22016, 4096)[0] == 15
    assert ops.i8_choose(ops.FMT_W4PG, 5, 22016, 4096)[0] == 14
    # below c14's wave (4096x12288: 384 tiles), per-group c22 (8 warps, 4 rows, 3 CTAs per SM) up to 4 rows, c1 above
    if 12288 // 32 <= 3 * sms:
        assert ops.i8_choose(ops.FMT_W4PG, 4, 12288, 4096)[0] == 22
    assert ops.i8_choose(ops.FMT_W4PG, 5, 12288, 4096)[0] == 1
    # 9-16 rows (H100, twenty-third / twenty-fifth sessions): W8 c27 (a 3-stage ring of 16 rows, 3 CTAs per SM instead
    # of c1's 2); where c1's 3 per SM leave a second wave, per-channel c28 (4 warps, 2 stages) and per-group c37
    # (2 warps, 4 stages), both 6 per SM; c1 where its one wave holds the tiles
    for M in (9, 16):
        assert ops.i8_choose(ops.FMT_W8, M, 12288, 4096) == (27, 1)
        assert ops.i8_choose(ops.FMT_W8, M, 22016, 4096) == (27, 1)
        assert ops.i8_choose(ops.FMT_W4PC, M, 12288, 4096) == (1, 1)
        if 12288 // 32 <= 3 * sms:
            assert ops.i8_choose(ops.FMT_W4PG, M, 12288, 4096) == (1, 1)
        if 3 * sms < 22016 // 32 <= 6 * sms:
            assert ops.i8_choose(ops.FMT_W4PC, M, 22016, 4096) == (28, 1)
            assert ops.i8_choose(ops.FMT_W4PG, M, 22016, 4096) == (37, 1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["chn", "g128"])
def test_w4_decode_split_rule(fmt, monkeypatch):
    # W4 decode while the 32-column tiles do not fill the GPU (N = 4096 on an H100 / H200): the 16-warp
    # c18 (M <= 8) / 12-warp c40 (M > 8, K >= 8192; c19's 16 warps until the twenty-fifth session) hold an SM each and
    # do not split K (H100 sweep, thirteenth session: 14336x4096 chn M=1 c18/s1 11.1 us vs c17/s2 12.1); below K = 8192
    # at M > 8 the 8-warp c13 without split (4096^2 chn M=16 c13/s1 5.1, c19/s1 5.4, c13/s2 6.5); W8A8 c17 / c13. Up to
    # 4 rows, rings of 4 token rows instead: W4 c23 (c18 with 4 rows), W8 c24 (c17 with 4 rows and 5 stages).
    ops = _ops()
    f = ops.FMT_W4PC if fmt == "chn" else ops.FMT_W4PG
    few = (4096 + 31) // 32 < torch.cuda.get_device_properties(0).multi_processor_count
    if not few:
        pytest.skip("the 16-warp rule is for GPUs with more SMs than N = 4096 has 32-column tiles")
    assert ops.i8_choose(f, 1, 4096, 4096) == (23, 1)  # up to 4 rows, c18's ring with 4 token rows
    assert ops.i8_choose(f, 4, 4096, 11008) == (23, 1)
    assert ops.i8_choose(f, 5, 4096, 4096) == (18, 1)
    assert ops.i8_choose(f, 8, 4096, 14336) == (18, 1)
    assert ops.i8_choose(f, 16, 4096, 4096) == (13, 1)
    assert ops.i8_choose(f, 16, 4096, 14336) == (40, 1)
    assert ops.i8_choose(f, 9, 4096, 11008) == (40, 1)
    assert ops.i8_choose(ops.FMT_W8, 1, 4096, 14336) == (24, 1)  # c17's 8 warps, 5 stages of 4 rows
    assert ops.i8_choose(ops.FMT_W8, 5, 4096, 14336)[0] == 17
    assert ops.i8_choose(ops.FMT_W8, 16, 4096, 14336)[0] == 13
    monkeypatch.setenv("QTOOL_I8_DECODE_M4", "0")  # read per call: the 8-row c18 / c17 again
    assert ops.i8_choose(f, 1, 4096, 4096) == (18, 1)
    assert ops.i8_choose(ops.FMT_W8, 1, 4096, 14336)[0] == 17


@pytest.mark.gpu
@gpu
def test_w4_only_decode_configs_refuse_w8():
    # c18 / c19 / c23 (16 warps) and the other big rings hold W4 only: W8 tiles would need 270-330 KB of shared
    # memory per CTA
    ops = _ops()
    M, N, K = 4, 256, 1024
    xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    xs, ws = torch.rand(M, 1, device="cuda"), torch.rand(N, device="cuda") * 1e-3
    # (and the 8-12-warp rings of 4-6 chunks, c40 / c47)
    for cfg in (18, 19, 23, 40, 47):
        info = ops.i8_config_info(cfg)
        assert info["kind"] == "decode" and info["threads"] >= 256
        assert info["available_w4"] and info["available_w4pg"] and not info["available"]
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        with pytest.raises(RuntimeError, match="does not run this weight format"):
            ops.w8a8_gemm_out(xq, xs, w, ws, None, out, cfg, 1)


@pytest.mark.gpu
@gpu
def test_retired_configs_are_refused_by_every_format():
    from qtool.bench import random_w4a8

    # the retired experiments keep their ids (the records name them) but run nothing: asked for explicitly, a clear
    # error; never chosen by a default
    ops = _ops()
    retired = [c for c in range(ops.i8_config_info(0)["num_configs"]) if ops.i8_config_info(c)["kind"] == "retired"]
    assert {29, 30, 31, 32, 33, 34, 35, 36, 38, 39, 41, 43, 44, 45, 46} == set(retired)
    M, N, K = 4, 256, 1024
    xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    xs, ws = torch.rand(M, 1, device="cuda"), torch.rand(N, device="cuda") * 1e-3
    t = random_w4a8(K, N, 128, "cuda", torch.Generator(device="cuda").manual_seed(0))
    for cfg in retired:
        info = ops.i8_config_info(cfg)
        assert not (info["available"] or info["available_w4"] or info["available_w4pg"]), cfg
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        with pytest.raises(RuntimeError, match="retired"):
            ops.w8a8_gemm_out(xq, xs, w, ws, None, out, cfg, 1)
        with pytest.raises(RuntimeError, match="retired"):
            ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128,
                              None, out, cfg, 1)
    for fmt in (ops.FMT_W8, ops.FMT_W4PC, ops.FMT_W4PG):
        for m in (1, 4, 8, 16, 64, 1024):
            for n, k in ((4096, 4096), (22016, 4096), (4096, 14336), (576, 1536)):
                assert ops.i8_choose(fmt, m, n, k)[0] not in retired


def _per_group_decode_variants_agree(ops, t, K, N, g, gen, ms, variants) -> int:
    """For each M of ms, every decode config and split (1, 2) that runs per-group W4A8 at M rows: the outputs of the
    `variants` (callables run(args, out, cfg, split)) are bitwise equal and match the reference. Returns the number
    of (M, config, split) cases."""
    from qtool.nn.w4a8 import w4a8_gemm as ref

    tried = 0
    for M in ms:
        xq = torch.randint(-128, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
        xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
        args = (xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], g, None)
        r = ref(*args)
        for cfg in range(ops.i8_config_info(0)["num_configs"]):
            info = ops.i8_config_info(cfg)
            if info["kind"] != "decode" or M > info["bm"] or not ops.i8_supports(info, ops.FMT_W4PG):
                continue
            for split in (1, 2):
                outs = []
                for run in variants:
                    out = torch.full((M, N), float("nan"), device="cuda")
                    run(args, out, cfg, split)
                    outs.append(out)
                assert all(torch.equal(o, outs[0]) for o in outs[1:]), (M, cfg, split)
                assert rel_err(outs[0], r) <= 1e-3, (M, cfg, split)
                tried += 1
    return tried


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [128, 256, 384, 512])
def test_w4a8_decode_one_group_path_bitwise_equal(g, monkeypatch):
    # group = 128 · 2^j: the decode kernels' G1 path (384 takes the general path either way) (one s2 / zero pair per
    # 128-k chunk, u8 weights W8 + 128 and 128·Σx taken off after the k loop) against the general one (a pair per
    # k32 step, s8 weights; QTOOL_I8_DECODE_G1=0), at the layout's extreme values, every decode config and split:
    # the same int32 sums, so the same bits
    ops = _ops()
    N, K = 576, 1536
    gen = torch.Generator(device="cuda").manual_seed(70 + g)
    t = _w4a8_per_group_extremes(K, N, g, gen)

    def with_g1(flag):
        def run(args, out, cfg, split):
            monkeypatch.setenv("QTOOL_I8_DECODE_G1", flag)
            ops.w4a8_gemm_out(*args, out, cfg, split)
        return run

    assert _per_group_decode_variants_agree(ops, t, K, N, g, gen, (1, 5, 16), [with_g1("0"), with_g1("1")]) >= 20


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("g", [128, 256])
def test_w4a8_decode_packed_scales_bitwise_equal(g, monkeypatch):
    # GemmArgs::pgs (the scales packed by pack_s2_tiles, 48 bytes per tile and group) against the [G, N] rows, on
    # every decode config and split, s2 over its packable range (nibbles 0 and 15 included): the same int32 sums,
    # so the same bits; then the wrappers' "auto" path (QTOOL_I8_DECODE_PK=1: packed once per weight, cached)
    ops = _ops()
    N, K = 576, 1536
    gen = torch.Generator(device="cuda").manual_seed(90 + g)
    t = _w4a8_per_group_extremes(K, N, g, gen, s2_values=(1, 2, 9, 15, 16))
    tiles = ops.pack_s2_tiles(t["s2_scales"], t["s2_zeros"])
    assert tiles is not None and tiles.shape == (N // 32, K // g, 48)

    def with_tiles(packed):
        return lambda args, out, cfg, split: ops.w4a8_gemm_out(*args, out, cfg, split, s2_tiles=packed)

    variants = [with_tiles(None), with_tiles(tiles)]
    assert _per_group_decode_variants_agree(ops, t, K, N, g, gen, (1, 3, 5, 16), variants) >= 30
    xq = torch.randint(-128, 128, (2, K), device="cuda", generator=gen, dtype=torch.int8)
    args = (xq, torch.rand(2, 1, device="cuda", generator=gen), None, t["qweight"], t["s1_scales"], None,
            t["s2_scales"], t["s2_zeros"], g, None)
    plain = ops.w4a8_gemm(*args, torch.float16)
    monkeypatch.setenv("QTOOL_I8_DECODE_PK", "1")
    assert torch.equal(ops.w4a8_gemm(*args, torch.float16), plain)
    assert ops._s2_tiles_of(t["s2_scales"], t["s2_zeros"], g) is ops._s2_tiles_of(t["s2_scales"], t["s2_zeros"], g)


@pytest.mark.gpu
@gpu
def test_w4a8_packed_scales_are_checked():
    ops = _ops()
    N, K, g = 256, 512, 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    t = _w4a8_per_group_extremes(K, N, g, gen, s2_values=(3, 16))
    tiles = ops.pack_s2_tiles(t["s2_scales"], t["s2_zeros"])
    xq = torch.randint(-128, 128, (4, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(4, 1, device="cuda", generator=gen) * 0.02
    args = (xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], g, None)
    out = torch.empty(4, N, device="cuda")
    for bad in (tiles[:, :-1], tiles.view(torch.int8), tiles.transpose(0, 1), tiles.cpu()):
        with pytest.raises(RuntimeError, match="s2_tiles must be a contiguous uint8"):
            ops.w4a8_gemm_out(*args, out, -1, 0, s2_tiles=bad)
    s1z = torch.rand(N, device="cuda").half()
    with pytest.raises(RuntimeError, match="s2_tiles is for per-group weights only"):
        ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], s1z, None, None, -1, None, out, -1, 0,
                          s2_tiles=tiles)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,K,g", [(96, 160, 32), (576, 1536, 128), (192, 576, 192), (64, 4096, 64), (32, 256, 256)])
def test_w4a8_dequantize_matches_layout_unpack(N, K, g):
    # the dequantizing config's first kernel against the layout's own (Python) inverse permutations, at the
    # layout's extreme values; K % 128 != 0 (160, 576) leaves the last CTA partly empty
    from qtool.layouts.w4a8kv4 import unpack_qweight, unpack_s2

    ops = _ops()
    gen = torch.Generator(device="cuda").manual_seed(N + K + g)
    t = _w4a8_per_group_extremes(K, N, g, gen)
    q4 = unpack_qweight(t["qweight"]).long()
    s2 = unpack_s2(t["s2_scales"]).long().repeat_interleave(g, 1)
    z2 = unpack_s2(t["s2_zeros"]).long().repeat_interleave(g, 1)
    w8 = ops.w4a8_dequantize(t["qweight"], t["s2_scales"], t["s2_zeros"], g)
    assert w8.dtype == torch.int8 and w8.shape == (N, K)
    assert torch.equal(w8.long(), q4 * s2 + z2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,N,K,g", [(1024, 1024, 1024, 128), (777, 800, 2080, 32), (4100, 544, 640, 64),
                                     (385, 256, 384, 128), (8192, 288, 256, 128), (8193, 96, 256, 128),
                                     (300, 512, 512, 192), (2048, 4096, 14336, 128)])
def test_w4a8_peer_config_bitwise_equal_to_dequantizing(M, N, K, g):
    # c25 (the CTAs of a weight column dequantize it together, one launch) gives c20's bits: the same int8 weights
    # and the same W8A8 sums and epilogue. Odd N (a last column of 1-7 row tiles), K % 128 != 0 (a last k-tile of
    # 1-3 steps), 4 and 64 row tiles (its limits) and, outside them (8193, 300), its fall-back to c20. Repeated
    # and graph-replayed calls: its ticket and counts are zeroed before every launch.
    if K % g:
        pytest.skip("K not a multiple of the group")
    ops = _ops()
    if not ops.i8_supports(ops.i8_config_info(25), ops.FMT_W4PG):
        pytest.skip("c25 needs sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(M + N + K + g)
    t = _w4a8_per_group_extremes(K, N, g, gen)
    xq = torch.randint(-128, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xq[0] = 127
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    args = (xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], g, None)
    wants = {}
    for dt in (torch.float32, torch.float16):
        want = wants[dt] = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        ops.w4a8_gemm_out(*args, want, 20, 0)
        out = torch.full_like(want, float("nan"))
        for _ in range(2):
            out.fill_(float("nan"))
            ops.w4a8_gemm_out(*args, out, 25, 0)
            assert torch.equal(out, want), dt
    out = torch.full((M, N), float("nan"), device="cuda")
    ops.w4a8_gemm_out(*args, out, 25, 0)  # warm-up (allocations) before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.w4a8_gemm_out(*args, out, 25, 0)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, wants[torch.float32])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,N,K", [(1024, 4096, 4096), (1, 192, 576), (3, 384, 16), (129, 576, 1536),
                                   (1000, 1536, 576), (777, 800, 2080), (4100, 544, 640), (257, 8200, 144),
                                   (2048, 4096, 14336)])
def test_w8a8_tma_config_bitwise_equal_to_c6(M, N, K):
    # c26 (TMA tiles, the weights multicast to a cluster of 2 row tiles) runs c6's wgmma stream and epilogue on the
    # same int32 sums: c6's bits for every output dtype, with and without bias. Odd M (a cluster's second row tile
    # past M), N not a multiple of 256, K % 128 != 0 and K = 16 (the TMA unit fills past K with zeros), repeated and
    # graph-replayed calls.
    ops = _ops()
    cfgs = [c for c in (26,) if ops.i8_config_info(c)["available"]]
    if not cfgs:
        pytest.skip("c26 needs sm_90a")
    assert all(ops.i8_config_info(c)["kind"] == "tma" for c in cfgs)
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + N + K)
    xq = torch.randint(-128, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xq[0] = 127
    w = torch.randint(-128, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    ws = torch.rand(N, device="cuda", generator=gen) * 1e-3
    bias = torch.randn(N, device="cuda", generator=gen).half()
    for dt, b in ((torch.float16, None), (torch.bfloat16, bias), (torch.float32, bias)):
        want = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        ops.w8a8_gemm_out(xq, xs, w, ws, b, want, 6, 1)
        for cfg in cfgs:
            out = torch.full_like(want, float("nan"))
            for _ in range(2):
                out.fill_(float("nan"))
                ops.w8a8_gemm_out(xq, xs, w, ws, b, out, cfg, 1)
                assert torch.equal(out, want), (cfg, dt)
    from qtool.nn.w8a8 import w8a8_gemm as ref
    assert rel_err(want, ref(xq, xs, w, ws, bias, torch.float32)) <= 1e-3
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.w8a8_gemm_out(xq, xs, w, ws, bias, out, cfgs[-1], 1)
    for _ in range(2):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M,N,K", [(2048, 4096, 4096), (1, 192, 576), (129, 576, 1536), (1000, 800, 2080),
                                   (4100, 544, 640), (300, 96, 14336)])
def test_w4a8_per_channel_dequantizing_config_bitwise_equal_to_c10(M, N, K, monkeypatch):
    # per-channel c20 (q4 unpacked to int8, then c6's kernel with the per-channel epilogue, 16-bit output through its
    # TMA-store tile) forms the same int32 sums Σ x8·q4 and the same fp32 epilogue as the fused c10: c10's bits, for
    # every output dtype, with and without bias, and with the TMA-store epilogue off (QTOOL_I8_TMA_OUT=0)
    from qtool.bench import random_w4a8

    ops = _ops()
    if not ops.i8_supports(ops.i8_config_info(20), ops.FMT_W4PC):
        pytest.skip("per-channel c20 needs sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(3 * M + N + K)
    t = random_w4a8(K, N, -1, "cuda", gen)
    xq = torch.randint(-128, 128, (M, K), device="cuda", generator=gen, dtype=torch.int8)
    xq[0] = 127
    xs = torch.rand(M, 1, device="cuda", generator=gen) * 0.02
    xsum = xq.float().sum(-1, keepdim=True) * xs
    bias = torch.randn(N, device="cuda", generator=gen).half()
    for dt, b in ((torch.float16, None), (torch.bfloat16, bias), (torch.float32, bias), (torch.float16, bias)):
        args = (xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1, b)
        want = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        ops.w4a8_gemm_out(*args, want, 10, 1)
        for tma_out in ("1", "0"):
            monkeypatch.setenv("QTOOL_I8_TMA_OUT", tma_out)
            out = torch.full_like(want, float("nan"))
            ops.w4a8_gemm_out(*args, out, 20, 0)
            assert torch.equal(out, want), (dt, b is not None, tma_out)


@pytest.mark.gpu
@gpu
def test_w8a8_tma_config_choice(monkeypatch):
    # QTOOL_I8_W8_TMA=26 makes c26 the W8A8 choice beyond M = 256 (split 1), "0" (the default) never; below
    # M = 257 and for the W4A8 formats it changes nothing
    ops = _ops()
    if not ops.i8_config_info(26)["available"]:
        pytest.skip("c26 needs sm_90a")
    for c in (26,):
        monkeypatch.setenv("QTOOL_I8_W8_TMA", str(c))
        assert ops.i8_choose(ops.FMT_W8, 1024, 4096, 4096) == (c, 1)
        assert ops.i8_choose(ops.FMT_W8, 257, 4096, 4096) == (c, 1)
        assert ops.i8_choose(ops.FMT_W8, 256, 4096, 4096)[0] == 6
        assert ops.i8_choose(ops.FMT_W4PC, 4096, 4096, 4096)[0] != c
    monkeypatch.setenv("QTOOL_I8_W8_TMA", "0")
    assert ops.i8_choose(ops.FMT_W8, 1024, 4096, 4096)[0] == 6
    monkeypatch.delenv("QTOOL_I8_W8_TMA")
    assert ops.i8_choose(ops.FMT_W8, 1024, 4096, 4096)[0] == 6


@pytest.mark.gpu
@gpu
def test_w4a8_dequantizing_config_choice(monkeypatch):
    # per-group W4A8 from M = 1024 on: dequantize to int8, then the W8A8 GEMM (c20; its split is the W8A8 one);
    # QTOOL_I8_W4PG_DQ=0 / 1 turn it off / on for every M > 16; never for decode shapes or per-channel
    ops = _ops()
    monkeypatch.delenv("QTOOL_I8_W4PG_DQ", raising=False)
    assert ops.i8_choose(ops.FMT_W4PG, 1024, 4096, 4096) == (20, ops.i8_choose(ops.FMT_W8, 1024, 4096, 4096)[1])
    assert ops.i8_choose(ops.FMT_W4PG, 512, 4096, 4096)[0] != 20
    monkeypatch.setenv("QTOOL_I8_W4PG_DQ", "0")
    assert ops.i8_choose(ops.FMT_W4PG, 4096, 4096, 4096)[0] != 20
    monkeypatch.setenv("QTOOL_I8_W4PG_DQ", "1")
    assert ops.i8_choose(ops.FMT_W4PG, 17, 4096, 4096)[0] == 20
    assert ops.i8_choose(ops.FMT_W4PG, 16, 4096, 4096)[0] != 20
    info = ops.i8_config_info(20)
    assert info["kind"] == "dequant" and info["available_w4pg"] and not info["available"]
    # per-channel from M = 2048 on (sm_90a: c6's kernel with the per-channel epilogue), split 1; QTOOL_I8_W4PC_DQ=0 /
    # 1 turn it off / on for every M > 16
    if info["available_w4"]:
        monkeypatch.delenv("QTOOL_I8_W4PC_DQ", raising=False)
        assert ops.i8_choose(ops.FMT_W4PC, 2048, 4096, 4096) == (20, 1)
        assert ops.i8_choose(ops.FMT_W4PC, 2047, 4096, 4096)[0] != 20
        monkeypatch.setenv("QTOOL_I8_W4PC_DQ", "1")
        assert ops.i8_choose(ops.FMT_W4PC, 17, 4096, 4096) == (20, 1)
        assert ops.i8_choose(ops.FMT_W4PC, 16, 4096, 4096)[0] != 20
        monkeypatch.setenv("QTOOL_I8_W4PC_DQ", "0")
        assert ops.i8_choose(ops.FMT_W4PC, 4096, 4096, 4096)[0] != 20
        monkeypatch.delenv("QTOOL_I8_W4PC_DQ")
    # c25 (the dequantization inside the GEMM's launch) only on request, where c20 would run and it fits (4-64 row
    # tiles); it runs per-group W4 only
    monkeypatch.delenv("QTOOL_I8_W4PG_DQ", raising=False)
    info = ops.i8_config_info(25)
    assert info["kind"] == "dequant" and not info["available_w4"] and not info["available"]
    if info["available_w4pg"]:
        assert ops.i8_choose(ops.FMT_W4PG, 1024, 4096, 4096)[0] == 20
        monkeypatch.setenv("QTOOL_I8_W4PG_PEER", "1")
        assert ops.i8_choose(ops.FMT_W4PG, 1024, 4096, 4096)[0] == 25
        assert ops.i8_choose(ops.FMT_W4PG, 8193, 4096, 4096)[0] == 20
        assert ops.i8_choose(ops.FMT_W4PG, 512, 4096, 4096)[0] not in (20, 25)
        monkeypatch.delenv("QTOOL_I8_W4PG_PEER")
    M, N, K = 32, 256, 1024
    xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    xs = torch.rand(M, 1, device="cuda")
    from qtool.bench import random_w4a8

    t = random_w4a8(K, N, -1, "cuda", torch.Generator(device="cuda").manual_seed(3))
    out = torch.empty(M, N, device="cuda")
    # per-channel runs through c20 on sm_90a (c6's kernel with its epilogue), never through c25
    with pytest.raises(RuntimeError, match="does not run this weight format"):
        ops.w4a8_gemm_out(xq, xs, None, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1, None, out, 25, 1)
