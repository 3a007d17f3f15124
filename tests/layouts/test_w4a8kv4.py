"""`w4a8kv4` layout: QServe byte order, s2 column order, exact round trips, plan-time checks.

Golden values come from scalar loops over the `algorithms.md` §4c formulas (and a few hand-derived
literal bytes), never from the packer under test.
"""

from __future__ import annotations

import pytest
import torch

from qtool.errors import CheckpointError, LayoutError
from qtool.layouts.base import get_layout
from qtool.layouts.w4a8kv4 import (
    W4A8KV4Layout,
    pack_qweight,
    pack_s2,
    to_qserve_checkpoint_names,
    unpack_qweight,
    unpack_s2,
)
from qtool.quant.progressive import quantize_progressive, quantize_qoq_per_channel
from qtool.quant.qweight import QuantizedWeight, QuantSpec, quantize_rtn

LAYOUT = W4A8KV4Layout()


def _qweight_byte_scalar(q: torch.Tensor, offset: int) -> int:
    """The §4c byte at flat `offset` of qweight, decoded from the offset with scalar arithmetic."""
    n_total, k_total = q.shape
    tile, rest = divmod(offset, 512)
    n_tile, k_tile = divmod(tile, k_total // 32)
    lane, b = divmod(rest, 16)
    nl, kl = divmod(lane, 4)
    kps, r = divmod(b, 8)
    nps, rk = divmod(r, 4)
    n = 32 * n_tile + 8 * nps + nl
    k = 32 * k_tile + 16 * kps + 4 * kl + rk
    return int(q[n, k]) | (int(q[n + 16, k]) << 4)


def _qweight_bytes_scalar(q: torch.Tensor) -> list[int]:
    """All bytes by nested loops in the natural (tile, lane, byte) order of §4c."""
    n_total, k_total = q.shape
    out = []
    for n_tile in range(n_total // 32):
        for k_tile in range(k_total // 32):
            for nl in range(8):
                for kl in range(4):  # lane = 4*nl + kl
                    for kps in range(2):
                        for nps in range(2):
                            for rk in range(4):  # byte = 8*kps + 4*nps + rk
                                n = 32 * n_tile + 8 * nps + nl
                                k = 32 * k_tile + 16 * kps + 4 * kl + rk
                                out.append(int(q[n, k]) | (int(q[n + 16, k]) << 4))
    return out


def _random_codes(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_qweight_literal_bytes():
    # q[n, k] = (n // 4 + k) % 16: lane 0 and lane 1 of tile 0 derived by hand from §4c
    n, k = 32, 32
    q = torch.tensor([[(i // 4 + j) % 16 for j in range(k)] for i in range(n)], dtype=torch.uint8)
    packed = pack_qweight(q).view(torch.uint8).flatten().tolist()
    assert packed[:16] == [0x40, 0x51, 0x62, 0x73, 0x62, 0x73, 0x84, 0x95] * 2
    assert packed[16:32] == [0x84, 0x95, 0xA6, 0xB7, 0xA6, 0xB7, 0xC8, 0xD9] * 2


def test_qweight_golden_bytes_small():
    q = _random_codes(64, 96, seed=1)
    packed = pack_qweight(q)
    assert packed.dtype == torch.int8 and packed.shape == (64, 48)
    assert packed.view(torch.uint8).flatten().tolist() == _qweight_bytes_scalar(q)


def test_qweight_golden_bytes_sampled_large():
    q = _random_codes(192, 576, seed=2)
    flat = pack_qweight(q).view(torch.uint8).flatten()
    offsets = torch.randint(0, flat.numel(), (400,), generator=torch.Generator().manual_seed(3)).tolist()
    offsets += [0, 1, 15, 16, 511, 512, flat.numel() - 1]
    for off in offsets:
        assert int(flat[off]) == _qweight_byte_scalar(q, off), off


def test_s2_column_order_golden():
    n, g = 64, 3
    t = torch.tensor([[(c + 7 * gi) % 120 for gi in range(g)] for c in range(n)], dtype=torch.int8)
    packed = pack_s2(t)
    assert packed.shape == (g, n)
    # literal: within a 32-column block the kernel reads columns 0, 8, 16, 24, 1, 9, 17, 25, ...
    assert packed[0, :8].tolist() == [0, 8, 16, 24, 1, 9, 17, 25]
    assert packed[0, 32:36].tolist() == [32, 40, 48, 56]
    # scalar formula: position p = 4*(n%8) + (n%32)//8 within each block holds column n
    for gi in range(g):
        for c in range(n):
            p = 32 * (c // 32) + 4 * (c % 8) + (c % 32) // 8
            assert int(packed[gi, p]) == int(t[c, gi])
    # not deepcompressor HEAD's order p = 16*(r//16) + 2*(r%8) + (r%16)//8 (pitfall 11)
    head = torch.empty_like(packed)
    for c in range(n):
        r = c % 32
        head[:, 32 * (c // 32) + 16 * (r // 16) + 2 * (r % 8) + (r % 16) // 8] = t[c]
    assert not torch.equal(head, packed)


def _valid_progressive(n: int, k: int, g: int, seed: int) -> QuantizedWeight:
    """Random codes, s2 in [1, 16] and zeros such that every kernel bound holds."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // g
    s2 = torch.randint(1, 17, (n, groups), generator=gen)
    lo = 15 * s2 - 127  # q4*s2 - zs <= 127 for q4 = 15
    zs = lo + torch.floor(torch.rand(n, groups, generator=gen) * (127 - lo + 1)).long()
    s1 = (torch.rand(n, 1, generator=gen) * 0.02 + 1e-4).half().float()
    return QuantizedWeight(
        codes=_random_codes(n, k, seed + 100),
        scale=s1,
        zero=zs.to(torch.int8),
        bits=4,
        group_size=g,
        in_features=k,
        zero_mode="post",
        scale2=s2.to(torch.int8),
    )


def _valid_per_channel(n: int, k: int, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    return QuantizedWeight(
        codes=_random_codes(n, k, seed + 200),
        scale=(torch.rand(n, 1, generator=gen) * 0.01 + 1e-4).half().float(),
        zero=(torch.randn(n, 1, generator=gen) * 0.05).half().float(),
        bits=4,
        group_size=-1,
        in_features=k,
        zero_mode="post",
    )


def _assert_same(a: QuantizedWeight, b: QuantizedWeight):
    assert torch.equal(a.codes, b.codes) and a.codes.dtype == b.codes.dtype
    assert torch.equal(a.scale, b.scale) and a.scale.dtype == b.scale.dtype
    assert torch.equal(a.zero, b.zero) and a.zero.dtype == b.zero.dtype
    assert (a.scale2 is None) == (b.scale2 is None)
    if a.scale2 is not None:
        assert torch.equal(a.scale2, b.scale2) and a.scale2.dtype == b.scale2.dtype
    assert (a.group_size, a.in_features, a.bits, a.zero_mode) == (b.group_size, b.in_features, b.bits, b.zero_mode)


@pytest.mark.parametrize("n", [32, 64, 576, 192, 1536])
@pytest.mark.parametrize("k", [576, 1536, 128])
def test_round_trip_exact(n, k):
    g = 128 if k % 128 == 0 else 64
    seed = n * 7 + k
    for qw in (_valid_progressive(n, k, g, seed), _valid_per_channel(n, k, seed)):
        tensors = LAYOUT.pack(qw)
        meta = LAYOUT.pack_meta(qw)
        back = LAYOUT.unpack(tensors, meta)
        _assert_same(back, qw)
        assert torch.equal(back.dequantize(), qw.dequantize())
        declared = LAYOUT.tensors((n, k), QuantSpec(bits=4, group_size=qw.group_size))
        assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == declared
    assert torch.equal(unpack_qweight(pack_qweight(qw.codes)), qw.codes)


def test_pack_values_and_zero_sign():
    qw = _valid_progressive(64, 256, 128, seed=5)
    t = LAYOUT.pack(qw)
    assert t["s1_scales"].dtype == torch.float16 and torch.equal(t["s1_scales"].float(), qw.scale.squeeze(1))
    # s2_zeros holds -zs, permuted like s2_scales
    assert torch.equal(unpack_s2(t["s2_zeros"]).long(), -qw.zero.long())
    assert torch.equal(unpack_s2(t["s2_scales"]), qw.scale2)
    c = quantize_qoq_per_channel(torch.randn(32, 64))
    tc = LAYOUT.pack(c)
    assert set(tc) == {"qweight", "s1_scales", "s1_szeros"}
    assert torch.equal(tc["s1_szeros"].float(), c.zero.squeeze(1))


def test_quantizer_output_round_trips_with_padding():
    torch.manual_seed(6)
    w = torch.randn(192, 576)
    qw = quantize_progressive(w, group_size=128, pad=True)
    t = LAYOUT.pack(qw)
    meta = LAYOUT.pack_meta(qw)
    assert t["qweight"].shape == (192, 320) and t["s2_scales"].shape == (5, 192)
    assert meta["in_features"] == 576 and meta["padded_in_features"] == 640 and meta["qserve_compatible"]
    back = LAYOUT.unpack(t, meta)
    _assert_same(back, qw)
    assert back.dequantize().shape == (192, 576)


def test_group64_is_noted_not_refused():
    spec = QuantSpec(bits=4, group_size=64)
    assert LAYOUT.check((576, 576), spec) == []
    assert LAYOUT.notes((576, 576), spec) and "reference" in LAYOUT.notes((576, 576), spec)[0]
    assert LAYOUT.notes((576, 576), QuantSpec(bits=4, group_size=128)) == []
    qw = quantize_progressive(torch.randn(64, 576), group_size=64)
    meta = LAYOUT.pack_meta(qw)
    assert meta["qserve_compatible"] is False and meta["notes"]


def test_check_reports_problems():
    assert LAYOUT.check((576, 1536), QuantSpec(bits=4, group_size=128)) == []
    assert LAYOUT.check((1536, 576), QuantSpec(bits=4, group_size=-1)) == []
    assert LAYOUT.check((576, 576), QuantSpec(bits=4, group_size=128))  # K % 128 without pad
    assert LAYOUT.check((576, 576), QuantSpec(bits=4, group_size=128, pad=True)) == []
    assert any("out_features" in p for p in LAYOUT.check((100, 256), QuantSpec(bits=4, group_size=128)))
    assert any("in_features" in p for p in LAYOUT.check((64, 48), QuantSpec(bits=4, group_size=-1)))
    assert LAYOUT.check((64, 256), QuantSpec(bits=4, group_size=32))
    assert LAYOUT.check((64, 256), QuantSpec(bits=8, group_size=128))
    assert LAYOUT.check((64, 256), QuantSpec(bits=4, group_size=128, symmetric=True))


def test_pack_refuses_bad_weights():
    with pytest.raises(LayoutError):  # AWQ-style pre-scale zeros are not a QoQ weight
        LAYOUT.pack(quantize_rtn(torch.randn(32, 128), QuantSpec(bits=4, group_size=128)))
    qw = _valid_progressive(32, 128, 128, seed=7)
    with pytest.raises(LayoutError):  # s1 not fp16-representable
        LAYOUT.pack(QuantizedWeight(qw.codes, qw.scale + 1e-7, qw.zero, 4, 128, 128, "post", qw.scale2))
    zs = qw.zero.clone()
    zs[0, 0] = -120  # q4*s2 - zs can exceed 127
    s2 = qw.scale2.clone()
    s2[0, 0] = 16
    codes = qw.codes.clone()
    codes[0, 0] = 15
    with pytest.raises(LayoutError):
        LAYOUT.pack(QuantizedWeight(codes, qw.scale, zs, 4, 128, 128, "post", s2))
    with pytest.raises(LayoutError):  # N not a multiple of 32
        LAYOUT.pack(quantize_progressive(torch.randn(48, 128), group_size=128))


def test_unpack_checks_tensor_set():
    qw = _valid_progressive(32, 128, 128, seed=8)
    t = LAYOUT.pack(qw)
    meta = LAYOUT.pack_meta(qw)
    with pytest.raises(CheckpointError):
        LAYOUT.unpack({k: v for k, v in t.items() if k != "s2_zeros"}, meta)
    with pytest.raises(CheckpointError):
        LAYOUT.unpack(t, {**meta, "group_size": -1})


def test_registry_and_qserve_names():
    assert isinstance(get_layout("w4a8kv4"), W4A8KV4Layout)
    assert W4A8KV4Layout.version == 1
    t = LAYOUT.pack(_valid_progressive(32, 128, 128, seed=9))
    named = to_qserve_checkpoint_names(t, "model.layers.0.self_attn.q_proj")
    assert set(named) == {f"model.layers.0.self_attn.q_proj.{k}" for k in ("qweight", "s1_scales", "s2_scales", "s2_zeros")}
    with pytest.raises(LayoutError):
        to_qserve_checkpoint_names({"scales": t["s1_scales"]})
