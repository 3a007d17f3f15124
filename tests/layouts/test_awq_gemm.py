"""awq-gemm packer (algorithms.md §4a) and quick-w4a16 ↔ awq-gemm conversion.

Golden words are computed here with scalar loops from the AutoAWQ nibble order
p(o) = [0, 4, 1, 5, 2, 6, 3, 7][o], independently of the packer."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import LayoutError
from qtool.layouts.awq_gemm import AwqGemmLayout, awq_quantization_config
from qtool.layouts.base import get_layout
from qtool.layouts.convert import awq_gemm_to_quick, convert_layout, quick_to_awq_gemm
from qtool.layouts.quick_w4a16 import QuickW4A16Layout
from qtool.quant.qweight import QuantizedWeight, QuantSpec, quantize_rtn

AWQ = AwqGemmLayout()
QUICK = QuickW4A16Layout()
NIBBLE_OF_OFFSET = [0, 4, 1, 5, 2, 6, 3, 7]


def to_i32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def golden_awq_words(t: torch.Tensor) -> list[list[int]]:
    """t [N, R] ints → [R, N/8] words: word (r, c) holds t[8c+o, r] at nibble p(o)."""
    N, R = t.shape
    v = t.tolist()
    out = []
    for r in range(R):
        row = []
        for c in range(N // 8):
            w = 0
            for o in range(8):
                w |= v[8 * c + o][r] << (4 * NIBBLE_OF_OFFSET[o])
            row.append(to_i32(w))
        out.append(row)
    return out


def make_qw(N: int, K: int, g: int, seed: int = 0, in_features: int | None = None) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    return QuantizedWeight(
        codes=torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8),
        scale=torch.rand(N, K // g, generator=gen) * 0.02 + 1e-3,
        zero=torch.randint(0, 16, (N, K // g), generator=gen, dtype=torch.uint8),
        bits=4,
        group_size=g,
        in_features=K if in_features is None else in_features,
    )


def fp16_reference(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(
        codes=qw.codes, scale=qw.scale.half().float(), zero=qw.zero, bits=4,
        group_size=qw.group_size, in_features=qw.in_features,
    )


# ------------------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("o,expected_nibble", list(enumerate([0, 4, 1, 5, 2, 6, 3, 7])))
@pytest.mark.parametrize("v", [5, 12])
def test_single_code_nibble_position(o, expected_nibble, v):
    N, K, g = 32, 64, 32
    n, k = 16 + o, 37  # word column c = 2
    codes = torch.zeros(N, K, dtype=torch.uint8)
    codes[n, k] = v
    qw = QuantizedWeight(codes=codes, scale=torch.ones(N, 2), zero=torch.zeros(N, 2, dtype=torch.uint8),
                         bits=4, group_size=g, in_features=K)
    qweight = AWQ.pack(qw)["qweight"]
    assert qweight.shape == (K, N // 8) and qweight.dtype == torch.int32
    assert torch.nonzero(qweight).tolist() == [[k, 2]]
    assert int(qweight[k, 2]) == to_i32(v << (4 * expected_nibble))


def test_nibble_holds_offset_table():
    # Equivalent statement of §4a: nibble i holds column offset [0,2,4,6,1,3,5,7][i].
    codes = torch.arange(8, dtype=torch.uint8).repeat(32, 1).t().contiguous()  # code = column offset
    qw = QuantizedWeight(codes=codes, scale=torch.ones(8, 1), zero=torch.zeros(8, 1, dtype=torch.uint8),
                         bits=4, group_size=32, in_features=32)
    w = int(AWQ.pack(qw)["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(w >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert w == 0x75316420


@pytest.mark.parametrize("N,K,g", [(64, 64, 32), (24, 128, 64), (128, 128, 128)])
def test_full_golden(N, K, g):
    qw = make_qw(N, K, g, seed=N + K)
    t = AWQ.pack(qw)
    assert t["qweight"].tolist() == golden_awq_words(qw.codes)
    assert t["qzeros"].shape == (K // g, N // 8)
    assert t["qzeros"].tolist() == golden_awq_words(qw.zero)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (K // g, N)
    s = qw.scale.tolist()
    for gi in range(K // g):
        for n in range(N):
            assert t["scales"][gi, n].item() == torch.tensor(s[n][gi]).half().item()


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("N", [8, 192, 576, 1536])
@pytest.mark.parametrize("K,g", [(576, 64), (576, 32), (1536, 128), (512, 128)])
def test_round_trip(N, K, g):
    qw = make_qw(N, K, g, seed=N + 3 * K + g)
    t, meta = AWQ.pack(qw), AWQ.pack_meta(qw)
    assert meta == {"bits": 4, "group_size": g, "in_features": K, "out_features": N}
    u = AWQ.unpack(t, meta)
    assert torch.equal(u.codes, qw.codes) and torch.equal(u.zero, qw.zero)
    assert torch.equal(u.scale, qw.scale.half().float())
    assert torch.equal(u.dequantize(), fp16_reference(qw).dequantize())


def test_check():
    assert AWQ.check((576, 576), QuantSpec(4, 64)) == []
    p = AWQ.check((576, 576), QuantSpec(4, 128))
    assert p and "576" in p[0] and "64" in p[0]
    assert AWQ.check((576, 576), QuantSpec(4, 128, pad=True))  # padding does not help awq-gemm
    assert any("% 8" in x for x in AWQ.check((100, 512), QuantSpec(4, 128)))
    assert any("4-bit" in x for x in AWQ.check((128, 512), QuantSpec(8, 128)))
    assert any("asymmetric" in x for x in AWQ.check((128, 512), QuantSpec(4, 128, symmetric=True)))
    assert any("group_size" in x for x in AWQ.check((128, 512), QuantSpec(4, -1)))


def test_pack_refuses_padded_k_and_bad_n():
    qw = quantize_rtn(torch.randn(64, 576), QuantSpec(4, 128, pad=True))
    with pytest.raises(LayoutError, match="padded"):
        AWQ.pack(qw)
    with pytest.raises(LayoutError, match="multiple of 8"):
        AWQ.pack(make_qw(12, 64, 32))


def test_unpack_rejects_mismatch():
    qw = make_qw(64, 128, 64)
    t, meta = AWQ.pack(qw), AWQ.pack_meta(qw)
    with pytest.raises(LayoutError):
        AWQ.unpack(t, {**meta, "in_features": 64})
    with pytest.raises(LayoutError):
        AWQ.unpack({**t, "qweight": t["qweight"].t().contiguous()}, meta)


def test_quantization_config():
    assert awq_quantization_config(4, 64, ["lm_head"]) == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    assert awq_quantization_config(4, 128, None)["modules_to_not_convert"] == []
    with pytest.raises(LayoutError):
        awq_quantization_config(8, 128, None)


def test_registered():
    assert isinstance(get_layout("awq-gemm"), AwqGemmLayout)


# -------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("N,K,g", [(128, 512, 128), (384, 576, 64), (576, 576, 64), (192, 1536, 32), (1536, 576, 32)])
def test_quick_awq_lossless_both_ways(N, K, g):
    qw = make_qw(N, K, g, seed=N * K)
    quick_t, quick_m = QUICK.pack(qw), QUICK.pack_meta(qw)
    awq_t, awq_m = quick_to_awq_gemm(quick_t, quick_m)
    # Same bytes as packing the canonical weight as awq-gemm directly (golden checked above).
    direct = AWQ.pack(qw)
    assert awq_m == AWQ.pack_meta(qw)
    for name in direct:
        assert torch.equal(awq_t[name], direct[name]), name
    back_t, back_m = awq_gemm_to_quick(awq_t, awq_m)
    assert back_m == quick_m
    for name in quick_t:
        assert torch.equal(back_t[name], quick_t[name]), name
    ref = fp16_reference(qw).dequantize()
    assert torch.equal(AWQ.unpack(awq_t, awq_m).dequantize(), ref)
    assert torch.equal(QUICK.unpack(back_t, back_m).dequantize(), ref)
    # Through the registry-level helper too.
    t2, m2 = convert_layout(awq_t, awq_m, "awq-gemm", "quick-w4a16")
    assert m2 == quick_m and all(torch.equal(t2[k], quick_t[k]) for k in quick_t)


def test_quick_with_padded_k_cannot_become_awq():
    qw = quantize_rtn(torch.randn(128, 576), QuantSpec(4, 128, pad=True))
    with pytest.raises(LayoutError, match="padded"):
        quick_to_awq_gemm(QUICK.pack(qw), QUICK.pack_meta(qw))
