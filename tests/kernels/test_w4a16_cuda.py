"""CUDA W4A16 kernel (QUICK layout) against the fp32 reference; GPU tests skip cleanly without one.

CPU-only parts (always run): the §4b test packer against a scalar transcription of the formulas,
the production packer when it exists, and that importing `kernels_cuda.ops` touches no CUDA while
`ops.load()` raises a clear error on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernels_cuda.reference import pack_quick, reference, rel_err

HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------ CPU parts


def _word_and_shift(n: int, k: int, N: int) -> tuple[int, int]:
    bx, y, tile, j = n // 128, (n % 128) // 64, (n % 64) // 8, n % 8
    h, jm, c = j // 4, j % 4, tile // 2
    kb, khalf, kr = k // 32, (k % 32) // 16, k % 16
    k8, t, lohi = kr // 8, (kr % 8) // 2, kr % 2
    return kb * 4 * N + (2 * y + h) * N + 128 * bx + 8 * (4 * jm + t) + 4 * khalf + c, 16 * lohi + 4 * k8 + 8 * (tile % 2)


@pytest.mark.parametrize("N,K,g", [(128, 32, 32), (384, 64, 32), (256, 128, 64)])
def test_test_packer_matches_formulas(N, K, g):
    gen = torch.Generator().manual_seed(N + K)
    q = torch.randint(0, 16, (N, K), generator=gen)
    z = torch.randint(0, 16, (N, K // g), generator=gen)
    s = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.002).half()
    t = pack_quick(q, z, s)
    words = [0] * (K * N // 8)
    for n in range(N):
        for k in range(K):
            w, sh = _word_and_shift(n, k, N)
            words[w] |= int(q[n, k]) << sh
    got = (t["qweight"].reshape(-1).long() & 0xFFFFFFFF).tolist()
    assert got == words
    assert t["scales"].shape == (K // g, 2 * N) and t["qzeros"].shape == (K // g, N // 4)
    # every column's scale appears exactly twice per group row, every zero in two nibbles
    zw = t["qzeros"].long() & 0xFFFFFFFF
    for n in (0, 5, 77, N - 1):
        bx, y, tile, j = n // 128, (n % 128) // 64, (n % 64) // 8, n % 8
        x = 8 * (y * (N // 16) + (j // 4) * (N // 32) + 4 * bx + j % 4) + tile
        assert torch.equal(t["scales"][:, 2 * x], s[n]) and torch.equal(t["scales"][:, 2 * x + 1], s[n])
        word = zw[:, x // 4]
        assert torch.equal((word >> (4 * (x % 4))) & 15, z[n]) and torch.equal((word >> (4 * (x % 4) + 16)) & 15, z[n])


def test_production_packer_bit_identical():
    layout_mod = pytest.importorskip("qtool.layouts.quick_w4a16")
    from qtool.quant.qweight import QuantizedWeight

    N, K, g = 640, 576, 64
    gen = torch.Generator().manual_seed(3)
    cq = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    cz = torch.randint(0, 16, (N, K // g), generator=gen, dtype=torch.uint8)
    cs = torch.rand(N, K // g, generator=gen) * 0.02 + 0.002
    qw = QuantizedWeight(codes=cq, scale=cs, zero=cz, bits=4, group_size=g, in_features=K)
    prod = layout_mod.QuickW4A16Layout().pack(qw)
    mine = pack_quick(cq.long(), cz.long(), cs.half())
    for k in ("qweight", "qzeros", "scales"):
        assert torch.equal(prod[k], mine[k]), k


def _lane_b(c64: int, lane: int, N: int) -> tuple[int, int, int]:
    """(w_off uint4, s_off uint4, z_off uint2) of a lane's data for 64-column block c64 (csrc lane_b)."""
    bx, y, h, jm = c64 >> 1, c64 & 1, lane >> 4, (lane >> 2) & 3
    q = y * (N >> 4) + h * (N >> 5) + 4 * bx + jm
    return ((2 * y + h) * N + 128 * bx + 8 * (lane & 15)) >> 2, 2 * q, q


def _emulate_tdec(x, t, N, K, g):
    """The transposed decode kernel's arithmetic (csrc w4a16_tdec), lane by lane, in float64: the
    QUICK B fragments of n8 tiles 2c, 2c+1 used as the m16k16 A fragment {b00, b10, b01, b11} of
    output features; codes raw with off(k) = 1024 (k % 16 < 8) or 64 (MAGIC_64 | 16q = 64 + q);
    O = Σ off·x and X = Σ x from an MMA on the constant A (rows off, 1); per group
    y += s·(g − O) − s·z·X."""
    M = x.shape[0]
    qw = t["qweight"].reshape(-1).long() & 0xFFFFFFFF
    sc = t["scales"].double()
    qz = t["qzeros"].long() & 0xFFFFFFFF
    xd = x.double()
    y = torch.zeros(N, M, dtype=torch.float64)
    off = torch.tensor([1024.0 if k % 16 < 8 else 64.0 for k in range(16)], dtype=torch.float64)
    for c64 in range(N // 64):
        for gi in range(K // g):
            gacc = torch.zeros(8, 16, M, dtype=torch.float64)  # [word c, 16 feature rows, tokens]
            O = torch.zeros(M, dtype=torch.float64)
            X = torch.zeros(M, dtype=torch.float64)
            for kt in range(gi * g // 32, (gi + 1) * g // 32):
                for kh in range(2):
                    k0 = 32 * kt + 16 * kh
                    B = xd[:, k0:k0 + 16].t()  # xᵀ, [16 k, tokens]
                    O += off @ B
                    X += B.sum(0)
                    for c in range(4):
                        A = torch.zeros(16, 16, dtype=torch.float64)
                        for lane in range(32):
                            gq, tq = lane >> 2, lane & 3
                            w = int(qw[4 * (_lane_b(c64, lane, N)[0] + kt * N) + 4 * kh + c])
                            nib = [(w >> (4 * i)) & 15 for i in range(8)]
                            # b00: nibbles 0/4 (tile 2c, k 2tq, +1), b01: 1/5 (k + 8), b10: 2/6, b11: 3/7 (tile 2c+1)
                            A[gq, 2 * tq:2 * tq + 2] = torch.tensor([1024.0 + nib[0], 1024.0 + nib[4]])       # a0 = b00
                            A[gq + 8, 2 * tq:2 * tq + 2] = torch.tensor([1024.0 + nib[2], 1024.0 + nib[6]])   # a1 = b10
                            A[gq, 2 * tq + 8:2 * tq + 10] = torch.tensor([64.0 + nib[1], 64.0 + nib[5]])     # a2 = b01
                            A[gq + 8, 2 * tq + 8:2 * tq + 10] = torch.tensor([64.0 + nib[3], 64.0 + nib[7]]) # a3 = b11
                        gacc[c] += A @ B
            for lane in range(32):
                gq = lane >> 2
                _, s_off, z_off = _lane_b(c64, lane, N)
                zx, zy = int(qz[gi, 2 * z_off]), int(qz[gi, 2 * z_off + 1])
                for c in range(4):
                    for h in range(2):
                        tile = 2 * c + h
                        s = sc[gi, 8 * s_off + 2 * tile]
                        z = ((zx if tile < 4 else zy) >> (4 * (tile & 3))) & 15
                        col = 64 * c64 + 8 * tile + gq
                        if lane & 3 == 0:  # the 4 lanes of a group hold the same columns
                            y[col] += s * (gacc[c, gq + 8 * h] - O) - s * z * X
    return y.t()


def test_transposed_raw_code_math_matches_reference():
    N, K, g, M = 128, 256, 128, 3
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (N, K), generator=gen)
    z = torch.randint(0, 16, (N, K // g), generator=gen)
    s = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.002).half()
    t = pack_quick(q, z, s)
    x = torch.randn(M, K, generator=gen).half()
    got = _emulate_tdec(x, t, N, K, g)
    w = (q.double() - z.double().repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)
    ref = x.double() @ w.t()  # float64: the identity must hold exactly up to float64 rounding
    assert float((got - ref).norm() / ref.norm()) < 1e-12


def test_import_is_lazy_and_load_explains(monkeypatch):
    import importlib

    ops = importlib.import_module("kernels_cuda.ops")
    assert callable(ops.load) and callable(ops.cuda_ops)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="GPU"):
            ops.load()


# ------------------------------------------------------------------------------------ GPU parts


def _ops():
    from kernels_cuda import ops

    ops.load()
    return ops


def _problem(M, N, K, g, dtype=torch.float16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (N, K), device="cuda", generator=gen)
    z = torch.randint(0, 16, (N, K // g), device="cuda", generator=gen)
    s = (torch.rand(N, K // g, device="cuda", generator=gen) * 0.02 + 0.002).half()
    x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
    return x, q, z, s, pack_quick(q, z, s)


def _run(ops, M, N, K, g, cfg=-1, split=0, dtype=torch.float16, seed=0):
    x, q, z, s, t = _problem(M, N, K, g, dtype, seed)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)  # poisoned
    ops.w4a16_gemm_cfg_out(x, t["qweight"], t["scales"], t["qzeros"], g, cfg, split, out)
    return rel_err(out, reference(x, q, z, s, g))


@pytest.mark.parametrize(
    "M,N,K,g",
    [(1, 384, 576, 32), (3, 640, 576, 64), (17, 384, 576, 32), (100, 640, 576, 64), (1000, 384, 576, 32),
     (1, 4096, 4096, 128), (16, 4096, 4096, 64), (64, 4096, 4096, 128), (256, 4096, 4096, 32),
     (1024, 4096, 4096, 128), (7, 4096, 11008, 128), (33, 12288, 4096, 128)],
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_default_matches_reference(M, N, K, g):
    ops = _ops()
    assert _run(ops, M, N, K, g, seed=M + N + K) <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_retired_configs_are_refused():
    # the per-k-tile decode rings (c0-c3, c12 register ring; c13-c16 cp.async ring), retired in the twenty-seventh
    # session: listed as "retired", never fitting, refused by a launch with a one-line message
    ops = _ops()
    x, q, z, s, t = _problem(4, 384, 576, 64)
    for c in (0, 1, 2, 3, 12, 13, 14, 15, 16):
        info = ops.config_info(c)
        assert info["kind"] == "retired" and not info["available"], c
        assert not any(ops.config_fits(c, 384, 576, 64, sp, M=4) for sp in (1, 2, 3))
        with pytest.raises(RuntimeError, match="this config is retired"):
            ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], 64, c, 1)
    assert _run(ops, 4, 384, 576, 64, 19, 1) <= 1e-3  # the group-chunk decode that replaced them


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_every_config_and_split():
    ops = _ops()
    n = ops.config_info(0)["num_configs"]
    for M, N, K, g in ((1, 384, 576, 32), (17, 512, 1024, 64), (130, 256, 2048, 128), (5, 384, 1536, 128)):
        for cfg in range(n):
            for split in (1, 2, 3, 4, 8):
                if not ops.config_fits(cfg, N, K, g, split, M=M):
                    continue
                err = _run(ops, M, N, K, g, cfg, split, seed=cfg * 10 + split)
                assert err <= 1e-3, (M, N, K, g, cfg, split, err)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_multicast_configs():
    # the register-A wgmma configs whose activation tile is TMA-multicast to a CTA pair (clusters of 2;
    # split-K through a global workspace): token counts that leave the last tile's rows (and a whole
    # multicast half) past M, splits 1-6; refused where the column blocks do not pair up
    ops = _ops()
    n = ops.config_info(0)["num_configs"]
    mc = [c for c in range(n) if ops.config_info(c)["multicast"] > 1 and ops.config_info(c)["available"]]
    if not mc:
        pytest.skip("needs an sm_90a build on a Hopper GPU")
    for c in mc:
        cols = ops.config_info(c)["cols"]
        assert not ops.config_fits(c, 3 * cols, 1024, 128, 1, M=128)
        assert ops.config_fits(c, 2 * cols, 4096, 128, 6, M=128)  # no cluster of split x 2 any more
        for M, K, g in ((1, 576, 64), (50, 1024, 128), (130, 2048, 64), (257, 1536, 128)):
            for split in (1, 2, 3, 4, 6):
                if not ops.config_fits(c, 4 * cols, K, g, split, M=M):
                    continue
                err = _run(ops, M, 4 * cols, K, g, c, split, seed=c + M + split)
                assert err <= 1e-3, (c, M, K, g, split, err)
        # the last slice to arrive sums the slices in a fixed order: bitwise the same on every call
        x, q, z, s, t = _problem(200, 2 * cols, 3072, 128, seed=c)
        for split in (2, 3, 6):
            a = ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], 128, c, split)
            for _ in range(3):
                assert torch.equal(a, ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], 128, c, split))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_split_through_workspace_in_a_cuda_graph():
    # the multicast configs' split-K: partial tiles from the caching allocator, per-stream tile counters
    # that every launch leaves zero. Captured on a fresh stream (counters made inside the capture), the
    # graph is right on every replay; eager calls on that stream and a second graph then reuse the array;
    # two streams running at once each use their own
    ops = _ops()
    mc = [c for c in range(ops.config_info(0)["num_configs"])
          if ops.config_info(c)["multicast"] > 1 and ops.config_info(c)["available"]]
    if not mc:
        pytest.skip("needs an sm_90a build on a Hopper GPU")
    c = mc[0]
    N, K, g, M = 4 * ops.config_info(c)["cols"], 2048, 128, 150
    x, q, z, s, t = _problem(M, N, K, g, seed=5)
    gemm = lambda split: ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"], g, c, split)  # noqa: E731
    gemm(3)  # build / warm outside capture (default stream)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    graphs, outs = [], []
    for split in (3, 2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outs.append([gemm(split), gemm(split)])
        graphs.append(graph)
    for seed in (1, 2):
        x.copy_(torch.randn(M, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)).half())
        ref = reference(x, q, z, s, g)
        for graph, ys in zip(graphs, outs):
            for y in ys:
                y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert all(rel_err(y, ref) <= 1e-3 for y in ys)
        with torch.cuda.stream(side):
            eager = gemm(6)
        torch.cuda.synchronize()
        assert rel_err(eager, ref) <= 1e-3
    other = torch.cuda.Stream()
    res = []
    for st in (side, other) * 4:
        with torch.cuda.stream(st):
            res.append(gemm(3))
    torch.cuda.synchronize()
    assert all(torch.equal(r, res[0]) for r in res)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_wgrs_groups_over_several_stages():
    # the register-A wgmma kernels copy a group's scales / zeros with its first 64-k stage and keep them
    # for the others: groups of 2, 3 and 4 stages, with split-K ranges that start inside a group
    ops = _ops()
    cfgs = [c for c in range(ops.config_info(0)["num_configs"])
            if ops.config_info(c)["kind"] == "wgrs" and ops.config_info(c)["available"]]
    if not cfgs:
        pytest.skip("needs an sm_90a build on a Hopper GPU")
    for c in cfgs:
        N = 2 * ops.config_info(c)["cols"]
        for M, K, g in ((70, 1536, 192), (130, 1536, 256), (40, 1280, 128)):
            for split in (1, 2, 3):
                if ops.config_fits(c, N, K, g, split, M=M):
                    err = _run(ops, M, N, K, g, c, split, seed=c + g + split)
                    assert err <= 1e-3, (c, M, K, g, split, err)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_bf16_and_fp32_inputs():
    ops = _ops()
    assert _run(ops, 9, 640, 576, 64, dtype=torch.bfloat16) <= 1e-2
    x, q, z, s, t = _problem(5, 384, 576, 32)
    y = ops.w4a16_gemm(x.float(), t["qweight"], t["scales"], t["qzeros"], 32)
    assert y.dtype == torch.float32 and rel_err(y, reference(x, q, z, s, 32)) <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_deterministic_and_shapes():
    ops = _ops()
    x, q, z, s, t = _problem(7, 4096, 4096, 128)
    a = ops.w4a16_gemm(x, t["qweight"], t["scales"], t["qzeros"], 128)
    b = ops.w4a16_gemm(x, t["qweight"], t["scales"], t["qzeros"], 128)
    assert torch.equal(a, b)
    y3 = ops.w4a16_gemm(x.view(7, 1, 4096), t["qweight"], t["scales"], t["qzeros"], 128)
    assert y3.shape == (7, 1, 4096) and torch.equal(y3.view(7, 4096), a)
    empty = ops.w4a16_gemm(x[:0], t["qweight"], t["scales"], t["qzeros"], 128)
    assert empty.shape == (0, 4096)
    with pytest.raises(ValueError):  # checked in Python before the op
        ops.w4a16_gemm(x[:, :4064], t["qweight"], t["scales"], t["qzeros"], 128)
    with pytest.raises(RuntimeError, match="K = 4064"):  # and by the C++ op itself
        torch.ops.qtool_cuda.w4a16_gemm(x[:, :4064], t["qweight"], t["scales"], t["qzeros"], 128)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_opcheck():
    _ops()
    for M, N, K, g in ((1, 384, 576, 32), (17, 512, 1024, 128)):
        x, q, z, s, t = _problem(M, N, K, g)
        torch.library.opcheck(torch.ops.qtool_cuda.w4a16_gemm.default, (x, t["qweight"], t["scales"], t["qzeros"], g))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_backend_selection_uses_kernel():
    from qtool.kernels import select_backend

    be = select_backend("cuda")
    assert be.name == "cuda" and "w4a16_gemm" in be.ops


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["0", "1", "2"])
def test_pdl_modes_agree(monkeypatch, mode):
    # QTOOL_W4A16_PDL is read per call by the decode kernels (M <= 16) and, on Hopper, the M <= 256
    # register-A wgmma kernels; every mode gives the same (bitwise) result, also inside a
    # CUDA graph of back-to-back calls where the dependent launch actually overlaps — including a
    # chain in which each call reads the previous call's output (the wait must cover it).
    ops = _ops()
    for M in (1, 5, 16, 64, 200, 600):  # decode, PDL wgrs (c37, c43), c41 (no PDL code)
        x, q, z, s, t = _problem(M, 1024, 1024, 128, seed=M)

        def gemm(a):
            return ops.w4a16_gemm(a, t["qweight"], t["scales"], t["qzeros"], 128)

        monkeypatch.setenv("QTOOL_W4A16_PDL", "0")
        base = gemm(x)
        chained = [base]
        for _ in range(2):
            chained.append(gemm(chained[-1]))
        monkeypatch.setenv("QTOOL_W4A16_PDL", mode)
        y = gemm(x)
        assert torch.equal(y, base) and rel_err(y, reference(x, q, z, s, 128)) <= 1e-3
        outs, chain = [], []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                outs.append(gemm(x))
            chain.append(gemm(x))
            for _ in range(2):
                chain.append(gemm(chain[-1]))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, base) for o in outs)
        assert all(torch.equal(a, b) for a, b in zip(chain, chained))
