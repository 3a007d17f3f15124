"""quick-w4a16 packer: golden words from the algorithms.md §4b formulas (scalar integer arithmetic in
this file, independent of the packer's reshape/permute), scale duplication, dual-nibble zeros,
N padding, exact round trips over many shapes, and plan-time checks."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import LayoutError
from qtool.layouts.base import get_layout
from qtool.layouts.quick_w4a16 import QuickW4A16Layout, pack_nibbles, unpack_nibbles
from qtool.quant.qweight import QuantizedWeight, QuantSpec, quantize_rtn

LAYOUT = QuickW4A16Layout()


# ----------------------------------------------------------------------------------- §4b, by hand


def to_i32(u: int) -> int:
    """Unsigned 32-bit pattern → the int32 value torch stores."""
    assert 0 <= u < 2**32
    return u - 2**32 if u >= 2**31 else u


def word_and_shift(n: int, k: int, N: int) -> tuple[int, int]:
    """§4b: flat qweight word and bit shift holding q[n, k] (N = padded out_features)."""
    bx, y, tile, j = n // 128, (n % 128) // 64, (n % 64) // 8, n % 8
    h, jm, c = j // 4, j % 4, tile // 2
    kb, khalf, kr = k // 32, (k % 32) // 16, k % 16
    k8, t, lohi = kr // 8, (kr % 8) // 2, kr % 2
    word = kb * 4 * N + (2 * y + h) * N + 128 * bx + 8 * (4 * jm + t) + 4 * khalf + c
    shift = 16 * lohi + 4 * k8 + 8 * (tile % 2)
    return word, shift


def column_slot(n: int, N: int) -> int:
    """§4b: x = 8Q + tile, the position of column n in the scale/zero order."""
    bx, y, tile, j = n // 128, (n % 128) // 64, (n % 64) // 8, n % 8
    h, jm = j // 4, j % 4
    q = y * (N // 16) + h * (N // 32) + 4 * bx + jm
    return 8 * q + tile


def golden_qweight(codes: torch.Tensor, N: int) -> list[int]:
    """Scalar loop over every code: the whole flat qweight as Python ints."""
    n_real, K = codes.shape
    words = [0] * (K * N // 8)
    c = codes.tolist()
    for n in range(n_real):
        for k in range(K):
            w, s = word_and_shift(n, k, N)
            words[w] |= c[n][k] << s
    return [to_i32(w) for w in words]


def make_qw(N: int, K: int, g: int, seed: int = 0, in_features: int | None = None) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    G = K // g
    return QuantizedWeight(
        codes=torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8),
        scale=torch.rand(N, G, generator=gen) * 0.02 + 1e-3,
        zero=torch.randint(0, 16, (N, G), generator=gen, dtype=torch.uint8),
        bits=4,
        group_size=g,
        in_features=K if in_features is None else in_features,
    )


def single_code_qw(N: int, K: int, g: int, n: int, k: int, v: int) -> QuantizedWeight:
    codes = torch.zeros(N, K, dtype=torch.uint8)
    codes[n, k] = v
    return QuantizedWeight(
        codes=codes,
        scale=torch.ones(N, K // g),
        zero=torch.zeros(N, K // g, dtype=torch.uint8),
        bits=4,
        group_size=g,
        in_features=K,
    )


# ------------------------------------------------------------------------------------------ golden


def test_formula_helper_hand_values():
    # A few positions worked out on paper from §4b for N = 384 (so 4N = 1536 words per k-tile).
    N = 384
    assert word_and_shift(0, 0, N) == (0, 0)
    assert word_and_shift(0, 1, N) == (0, 16)  # lohi = 1
    assert word_and_shift(0, 8, N) == (0, 4)  # k8 = 1
    assert word_and_shift(0, 2, N) == (8, 0)  # t = 1 → next lane
    assert word_and_shift(0, 16, N) == (4, 0)  # khalf = 1
    assert word_and_shift(0, 32, N) == (1536, 0)  # kb = 1
    assert word_and_shift(8, 0, N) == (0, 8)  # tile = 1
    assert word_and_shift(16, 0, N) == (1, 0)  # tile = 2 → c = 1
    assert word_and_shift(1, 0, N) == (32, 0)  # jm = 1 → lane 4
    assert word_and_shift(4, 0, N) == (384, 0)  # h = 1 → segment 1
    assert word_and_shift(64, 0, N) == (768, 0)  # y = 1 → segment 2
    assert word_and_shift(128, 0, N) == (128, 0)  # bx = 1
    assert word_and_shift(383, 63, N) == (1536 + 1152 + 256 + 120 + 7, 28)
    assert column_slot(0, N) == 0 and column_slot(8, N) == 1 and column_slot(1, N) == 8
    assert column_slot(4, N) == 8 * (N // 32) and column_slot(64, N) == 8 * (N // 16)
    assert column_slot(128, N) == 32


@pytest.mark.parametrize(
    "N,n,k",
    [
        (128, 0, 0),
        (128, 127, 31),
        (128, 9, 17),  # tile 1, j 1, khalf 1, kr 1
        (128, 70, 10),  # y 1, h 1, jm 2, k8 1, t 1
        (384, 200, 45),  # bx 1, y 1, tile 1
        (384, 300, 63),  # bx 2, kb 1, kr 15
        (384, 43, 22),  # tile 5 (c 2), j 3, khalf 1, t 3
        (640, 613, 39),  # bx 4, y 1, tile 4, h 1, jm 1
        (640, 258, 5),  # bx 2, j 2, t 2, lohi 1
    ],
)
@pytest.mark.parametrize("v", [1, 7, 9, 15])
def test_single_code_lands_in_formula_word(N, n, k, v):
    K = 64
    packed = LAYOUT.pack(single_code_qw(N, K, 32, n, k, v))["qweight"]
    assert packed.shape == (K // 4, N // 2) and packed.dtype == torch.int32
    word, shift = word_and_shift(n, k, N)
    flat = packed.flatten()
    nz = torch.nonzero(flat).flatten().tolist()
    assert nz == [word]
    assert int(flat[word]) == to_i32(v << shift)


@pytest.mark.parametrize("N,K", [(128, 64), (384, 32), (256, 32)])
def test_qweight_matches_scalar_golden(N, K):
    qw = make_qw(N, K, 32, seed=N + K)
    packed = LAYOUT.pack(qw)["qweight"]
    assert packed.flatten().tolist() == golden_qweight(qw.codes, N)


def test_qweight_golden_with_padded_rows():
    # N = 192 pads to 256: padded rows hold code 0, so the words are the golden of the real rows.
    qw = make_qw(192, 32, 32, seed=5)
    t = LAYOUT.pack(qw)
    assert t["qweight"].shape == (8, 128)
    assert t["qweight"].flatten().tolist() == golden_qweight(qw.codes, 256)


def test_scales_duplicated_in_formula_positions():
    N, K, g = 384, 128, 64
    qw = make_qw(N, K, g, seed=1)
    scales = LAYOUT.pack(qw)["scales"]
    assert scales.shape == (K // g, 2 * N) and scales.dtype == torch.float16
    s16 = qw.scale.to(torch.float16)
    for n in range(N):
        x = column_slot(n, N)
        for gi in range(K // g):
            assert scales[gi, 2 * x] == s16[n, gi]
            assert scales[gi, 2 * x + 1] == s16[n, gi]


def test_qzeros_dual_nibbles_in_formula_words():
    N, K, g = 640, 64, 32
    qw = make_qw(N, K, g, seed=2)
    qzeros = LAYOUT.pack(qw)["qzeros"]
    assert qzeros.shape == (K // g, N // 4) and qzeros.dtype == torch.int32
    z = qw.zero.tolist()
    expected = [[0] * (N // 4) for _ in range(K // g)]
    for n in range(N):
        x = column_slot(n, N)
        for gi in range(K // g):
            expected[gi][x // 4] |= (z[n][gi] << (4 * (x % 4))) | (z[n][gi] << (4 * (x % 4 + 4)))
    assert qzeros.tolist() == [[to_i32(w) for w in row] for row in expected]


def test_single_zero_and_scale_positions():
    N, K, g, n = 384, 32, 32, 203  # bx 1, y 1, tile 1, j 3
    qw = single_code_qw(N, K, g, 0, 0, 0)
    zero = qw.zero.clone()
    zero[n, 0] = 11
    scale = torch.ones(N, 1)
    scale[n, 0] = 0.5
    qw = QuantizedWeight(codes=qw.codes, scale=scale, zero=zero, bits=4, group_size=g, in_features=K)
    t = LAYOUT.pack(qw)
    x = column_slot(n, N)
    assert x == 8 * (1 * 24 + 0 * 12 + 4 * 1 + 3) + 1
    row = t["qzeros"][0].tolist()
    assert row[x // 4] == (11 << 4 * (x % 4)) | (11 << 4 * (x % 4 + 4))
    assert all(w == 0 for i, w in enumerate(row) if i != x // 4)
    s = t["scales"][0]
    assert (s == 0.5).nonzero().flatten().tolist() == [2 * x, 2 * x + 1]


# ------------------------------------------------------------------------------------- padding, meta


@pytest.mark.parametrize("N,Np", [(192, 256), (576, 640), (64, 128), (1536, 1536)])
def test_padded_rows_are_exact_zero_outputs(N, Np):
    K, g = 64, 32
    qw = make_qw(N, K, g, seed=3)
    t, meta = LAYOUT.pack(qw), LAYOUT.pack_meta(qw)
    assert meta == {
        "bits": 4,
        "group_size": g,
        "in_features": K,
        "out_features": N,
        "padded_in": K,
        "padded_out": Np,
    }
    assert t["qweight"].shape == (K // 4, Np // 2)
    assert t["scales"].shape == (K // g, 2 * Np) and t["qzeros"].shape == (K // g, Np // 4)
    # Every padded column's scale is 0 and zero is 0 (read at the formula positions).
    zn = unpack_nibbles(t["qzeros"])  # [G, Np/4, 8]
    for n in range(N, Np):
        x = column_slot(n, Np)
        assert (t["scales"][:, 2 * x] == 0).all() and (t["scales"][:, 2 * x + 1] == 0).all()
        assert (zn[:, x // 4, x % 4] == 0).all()
    if Np > N:
        from qtool.layouts.quick_w4a16 import quick_dequantize

        w = quick_dequantize(t["qweight"], t["scales"], t["qzeros"], g)
        assert w.shape == (Np, K)
        assert torch.equal(w[N:], torch.zeros(Np - N, K))


# ---------------------------------------------------------------------------------------- round trip


def assert_same(u: QuantizedWeight, qw: QuantizedWeight):
    assert u.codes.dtype == torch.uint8 and torch.equal(u.codes, qw.codes)
    assert torch.equal(u.zero, qw.zero.to(torch.uint8))
    assert u.scale.dtype == torch.float32
    assert torch.equal(u.scale, qw.scale.to(torch.float16).to(torch.float32))
    assert (u.bits, u.group_size, u.in_features, u.zero_mode) == (4, qw.group_size, qw.in_features, "pre")
    ref = QuantizedWeight(
        codes=qw.codes, scale=qw.scale.half().float(), zero=qw.zero, bits=4,
        group_size=qw.group_size, in_features=qw.in_features,
    )
    assert torch.equal(u.dequantize(), ref.dequantize())


@pytest.mark.parametrize("N", [128, 256, 384, 640, 576, 192, 1536])
@pytest.mark.parametrize("K", [576, 1536, 512])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_round_trip_random_codes(N, K, g):
    kp = -(-K // g) * g  # the quantizer pads K (576 with g=128 → 640)
    qw = make_qw(N, kp, g, seed=N * 7 + K + g, in_features=K)
    t, meta = LAYOUT.pack(qw), LAYOUT.pack_meta(qw)
    assert meta["padded_in"] == kp and meta["in_features"] == K
    assert t["qweight"].shape == (kp // 4, meta["padded_out"] // 2)
    assert_same(LAYOUT.unpack(t, meta), qw)


def test_round_trip_from_rtn_with_k_padding():
    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(9))
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=128, pad=True))
    assert qw.codes.shape == (192, 640)
    t, meta = LAYOUT.pack(qw), LAYOUT.pack_meta(qw)
    assert (meta["padded_in"], meta["padded_out"], meta["in_features"]) == (640, 256, 576)
    assert_same(LAYOUT.unpack(t, meta), qw)


def test_nibble_helpers_sign_bit():
    nib = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15], [0, 0, 0, 0, 0, 0, 0, 8]], dtype=torch.uint8)
    words = pack_nibbles(nib)
    assert words.tolist() == [to_i32(0xF7654321), to_i32(0x80000000)]
    assert torch.equal(unpack_nibbles(words), nib)


def test_registered():
    assert isinstance(get_layout("quick-w4a16"), QuickW4A16Layout)
    assert QuickW4A16Layout.version == 1


# ---------------------------------------------------------------------------------------- checks


def test_check_accepts_good_and_padded_shapes():
    assert LAYOUT.check((192, 576), QuantSpec(4, 64)) == []
    assert LAYOUT.check((576, 1536), QuantSpec(4, 128)) == []
    assert LAYOUT.check((192, 576), QuantSpec(4, 128, pad=True)) == []


@pytest.mark.parametrize(
    "spec,word",
    [
        (QuantSpec(bits=8, group_size=128), "4-bit"),
        (QuantSpec(bits=4, group_size=128, symmetric=True), "asymmetric"),
        (QuantSpec(bits=4, group_size=-1), "group_size"),
        (QuantSpec(bits=4, group_size=256), "group_size"),
        (QuantSpec(bits=4, group_size=128), "576"),  # K = 576 not a multiple of 128 without pad
    ],
)
def test_check_explains_problems(spec, word):
    problems = LAYOUT.check((576, 576), spec)
    assert problems and any(word in p for p in problems)


def test_pack_refuses_symmetric_and_wrong_bits():
    qw = make_qw(128, 64, 32)
    sym = QuantizedWeight(codes=qw.codes.to(torch.int8), scale=qw.scale, zero=None, bits=4, group_size=32, in_features=64)
    with pytest.raises(LayoutError):
        LAYOUT.pack(sym)
    bad = QuantizedWeight(codes=qw.codes, scale=qw.scale, zero=qw.zero, bits=3, group_size=32, in_features=64)
    with pytest.raises(LayoutError):
        LAYOUT.pack(bad)
    big = QuantizedWeight(codes=qw.codes * 2, scale=qw.scale, zero=qw.zero, bits=4, group_size=32, in_features=64)
    with pytest.raises(LayoutError, match="0..15"):
        LAYOUT.pack(big)
    huge = QuantizedWeight(codes=qw.codes, scale=qw.scale * 1e8, zero=qw.zero, bits=4, group_size=32, in_features=64)
    with pytest.raises(LayoutError, match="fp16"):
        LAYOUT.pack(huge)


def test_unpack_rejects_mismatched_tensors():
    qw = make_qw(128, 64, 32)
    t, meta = LAYOUT.pack(qw), LAYOUT.pack_meta(qw)
    with pytest.raises(LayoutError):
        LAYOUT.unpack(t, {**meta, "padded_out": 256})
    with pytest.raises(LayoutError):
        LAYOUT.unpack({**t, "scales": t["scales"].float()}, meta)
    with pytest.raises(LayoutError, match="missing"):
        LAYOUT.unpack({"qweight": t["qweight"]}, meta)
    broken = t["scales"].clone()
    broken[0, 1] = 123.0
    with pytest.raises(LayoutError, match="duplicated"):
        LAYOUT.unpack({**t, "scales": broken}, meta)
    bz = t["qzeros"].clone()
    bz[0, 0] ^= 1
    with pytest.raises(LayoutError, match="twice"):
        LAYOUT.unpack({**t, "qzeros": bz}, meta)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pack_on_cuda_matches_cpu():
    qw = make_qw(384, 576, 64, seed=11)
    cpu = LAYOUT.pack(qw)
    qc = QuantizedWeight(
        codes=qw.codes.cuda(), scale=qw.scale.cuda(), zero=qw.zero.cuda(), bits=4, group_size=64, in_features=576
    )
    gpu = LAYOUT.pack(qc)
    for name in cpu:
        assert gpu[name].device.type == "cuda"
        assert torch.equal(gpu[name].cpu(), cpu[name])
    u = LAYOUT.unpack(gpu, LAYOUT.pack_meta(qc))
    assert torch.equal(u.codes.cpu(), qw.codes)
