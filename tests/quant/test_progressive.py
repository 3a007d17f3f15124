"""QoQ progressive (per-group) and per-channel weight quantizers.

Expected values are computed here independently: scalar Python/numpy loops from the formulas of
`algorithms.md` §3.2, and an exhaustive search over every (min, max) pair an int8 group can have.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtool.errors import LayoutError
from qtool.quant.progressive import quantize_progressive, quantize_qoq_per_channel


def _fp16_up(x: float) -> float:
    """Smallest-or-nearest fp16 >= x (scalar), the s1 rule of the module."""
    h = np.float16(x)
    if float(h) < x:
        h = np.nextafter(h, np.float16(np.inf))
    return float(h)


def _scalar_progressive(w: np.ndarray, g: int, p: int):
    """Scalar-loop reference: (codes, s1, s2, zs) from the §3.2 formulas (fp32 division like torch)."""
    n, k = w.shape
    codes = np.zeros((n, k), dtype=np.int64)
    s1s, s2s, zss = [], [], []
    for i in range(n):
        absmax = max(float(np.abs(w[i]).max()), 1e-5)
        s1 = _fp16_up(float(np.float32(absmax) / np.float32(p)))
        w8 = [max(-p, min(p, round(float(np.float32(w[i, j]) / np.float32(s1))))) for j in range(k)]
        row_s2, row_z = [], []
        for gi in range(k // g):
            grp = w8[gi * g : (gi + 1) * g]
            lo, hi = min(grp), max(grp)
            s2 = max(1, round((hi - lo) / 15))
            zs = -lo
            for j, v in enumerate(grp):
                codes[i, gi * g + j] = min(15, max(0, round((v + zs) / s2)))
            row_s2.append(s2)
            row_z.append(zs)
        s1s.append(s1)
        s2s.append(row_s2)
        zss.append(row_z)
    return codes, np.array(s1s), np.array(s2s), np.array(zss)


def test_matches_scalar_reference():
    torch.manual_seed(0)
    w = torch.randn(6, 256) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.02, 0.5]).unsqueeze(1)
    w[1, 5] = 2.0  # an outlier: the other groups of that row get few levels
    w[4, 64:128] += 0.3  # a group with only positive values (negative zs)
    qw = quantize_progressive(w, group_size=64)
    codes, s1, s2, zs = _scalar_progressive(w.numpy(), 64, 119)
    assert qw.codes.dtype == torch.uint8 and qw.scale2.dtype == torch.int8 and qw.zero.dtype == torch.int8
    assert qw.codes.shape == (6, 256) and qw.scale.shape == (6, 1) and qw.scale2.shape == (6, 4)
    np.testing.assert_array_equal(qw.codes.numpy(), codes)
    np.testing.assert_array_equal(qw.scale.squeeze(1).double().numpy(), s1)
    np.testing.assert_array_equal(qw.scale2.numpy(), s2)
    np.testing.assert_array_equal(qw.zero.numpy(), zs)
    assert (qw.zero[4, 1] < 0).item()  # the positive group keeps its range: zs is not clamped at 0
    assert qw.group_size == 64 and qw.in_features == 256 and qw.scale2 is not None


def test_dequantize_formula_and_fp16_scales():
    torch.manual_seed(1)
    w = torch.randn(32, 512)
    qw = quantize_progressive(w, group_size=128)
    s1 = qw.scale
    assert torch.equal(s1.half().float(), s1), "s1 must be fp16-representable"
    assert bool((s1 * 119 >= w.abs().amax(1, keepdim=True)).all()), "s1 is rounded up: no clipping"
    q = qw.codes.double().reshape(32, 4, 128)
    expect = s1.double().unsqueeze(2) * (q * qw.scale2.double().unsqueeze(2) - qw.zero.double().unsqueeze(2))
    torch.testing.assert_close(qw.dequantize(torch.float64), expect.reshape(32, 512), rtol=0, atol=0)
    rel = ((qw.dequantize() - w).norm() / w.norm()).item()
    assert rel < 0.12


def _adversarial_weight(pairs: list[tuple[int, int]], p: int, g: int = 64, seed: int = 0) -> torch.Tensor:
    """One row per (lo, hi): group 0 anchors the row max at +-p, group 1 spans [lo, hi] exactly."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(pairs, dtype=torch.float64)
    lo, hi = t[:, :1], t[:, 1:]
    fill = lo + torch.floor(torch.rand(len(pairs), g, generator=gen, dtype=torch.float64) * (hi - lo + 1))
    fill[:, 0:1], fill[:, 1:2] = lo, hi
    anchor = torch.zeros(len(pairs), g, dtype=torch.float64)
    anchor[:, 0], anchor[:, 1] = p, -p
    return (torch.cat([anchor, fill], dim=1) / p).float()


def _all_pairs(p: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo in range(-p, p + 1) for hi in range(lo, p + 1)]


def _scalar_top(lo: int, hi: int) -> tuple[int, int, int]:
    """(s2, q4 of the max, reconstruction of the max) from the formulas, scalar."""
    s2 = max(1, round((hi - lo) / 15))
    q = min(15, max(0, round((hi - lo) / s2)))
    return s2, q, q * s2 + lo


@pytest.mark.parametrize("p", [119, 120])
def test_exhaustive_groups_stay_in_int8(p):
    """Every integer group range [lo, hi] within [-P, P]: reconstructions in [-127, 127], q4*s2 <= 255."""
    pairs = _all_pairs(p)
    # the independent scalar search agrees that P = 119 and 120 are safe
    assert max(_scalar_top(lo, hi)[2] for lo, hi in pairs) <= 127
    w = _adversarial_weight(pairs, p)
    qw = quantize_progressive(w, group_size=64, protective=p)
    # the constructed integers are exactly what step 1 sees
    w8 = torch.round(w / qw.scale)
    assert torch.equal(w8[:, 65], torch.tensor([float(hi) for _, hi in pairs]))
    assert torch.equal(w8[:, 64], torch.tensor([float(lo) for lo, _ in pairs]))
    q = qw.codes.long().reshape(len(pairs), 2, 64)
    s2 = qw.scale2.long().unsqueeze(2)
    zs = qw.zero.long().unsqueeze(2)
    r = q * s2 - zs
    assert int(r.max()) <= 127 and int(r.min()) >= -127
    assert int((q * s2).max()) <= 255 and int(qw.scale2.max()) <= 17 and int(qw.scale2.min()) >= 1
    # group 1 against the scalar formulas, pair by pair
    exp = torch.tensor([_scalar_top(lo, hi) for lo, hi in pairs])
    assert torch.equal(qw.scale2[:, 1].long(), exp[:, 0])
    assert torch.equal(q[:, 1, 1], exp[:, 1])  # element 1 of group 1 holds the max
    assert torch.equal(r[:, 1, 1], exp[:, 2])
    assert torch.equal(r[:, 1, 0], torch.tensor([lo for lo, _ in pairs]))  # the min is exact


def test_protective_range_is_tight():
    # P = 121 admits a group whose max reconstructs to 128 (s2 = 16, q4 = 15): found by the scalar search
    bad = [(lo, hi) for lo, hi in _all_pairs(121) if _scalar_top(lo, hi)[2] > 127]
    assert (-112, 121) in bad
    w = _adversarial_weight([(-112, 121)], 121)
    with pytest.raises(LayoutError, match="outside"):
        quantize_progressive(w, group_size=64, protective=121)
    w = _adversarial_weight([(-127, 127)], 127)
    with pytest.raises(LayoutError):
        quantize_progressive(w, group_size=64, protective=127)


def test_random_groups_error_bound():
    torch.manual_seed(2)
    w = torch.randn(64, 1024) * torch.rand(64, 1, generator=None) * 3
    w[:, ::37] *= 8  # outliers
    qw = quantize_progressive(w, group_size=128)
    w8 = torch.round(w / qw.scale).reshape(64, 8, 128)
    assert int(w8.abs().max()) <= 119
    lo, hi = w8.amin(2, keepdim=True), w8.amax(2, keepdim=True)
    s2 = qw.scale2.float().unsqueeze(2)
    r = (qw.codes.float().reshape(64, 8, 128) * s2 - qw.zero.float().unsqueeze(2))
    # rounding error s2/2, or the clip of round((hi-lo)/15)*15 < hi-lo at q4 = 15
    bound = torch.maximum(s2 / 2, hi - (lo + 15 * s2))
    assert bool(((w8 - r).abs() <= bound).all())


def test_constant_and_zero_rows_and_groups():
    w = torch.zeros(4, 128)
    w[1] = 0.37
    w[2] = -2.5
    w[3, :64] = torch.linspace(-1, 1, 64)
    w[3, 64:] = 0.25  # a constant group inside a varying row
    qw = quantize_progressive(w, group_size=64)
    d = qw.dequantize()
    assert torch.equal(d[0], torch.zeros(128))
    assert int(qw.scale2.min()) >= 1
    # constant rows: W8 = +-119 for every element, reconstructed exactly (s1 error only, <= 1e-3 relative)
    torch.testing.assert_close(d[1], w[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(d[2], w[2], rtol=1e-3, atol=0)
    w8_const = torch.round(w[3, 64:] / qw.scale[3])
    assert torch.equal(qw.codes[3, 64:].float() * qw.scale2[3, 1] - qw.zero[3, 1], w8_const)


def test_padding_replicates_last_column():
    torch.manual_seed(3)
    w = torch.randn(32, 576)
    with pytest.raises(LayoutError):
        quantize_progressive(w, group_size=128)
    qw = quantize_progressive(w, group_size=128, pad=True)
    assert qw.codes.shape == (32, 640) and qw.in_features == 576 and qw.scale2.shape == (32, 5)
    assert torch.equal(qw.codes[:, 576:], qw.codes[:, 575:576].expand(32, 64))
    assert qw.dequantize().shape == (32, 576)
    # same as quantizing the explicitly padded weight
    ref = quantize_progressive(torch.cat([w, w[:, -1:].expand(32, 64)], dim=1), group_size=128)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scale2, ref.scale2)
    assert torch.equal(qw.zero, ref.zero) and torch.equal(qw.scale, ref.scale)


def test_argument_checks():
    w = torch.randn(32, 128)
    with pytest.raises(LayoutError):
        quantize_progressive(w, group_size=-1)
    for bad in (0, 128, 1.5):
        with pytest.raises(ValueError):
            quantize_progressive(w, protective=bad)
    with pytest.raises(ValueError):
        quantize_progressive(torch.randn(4, 4, 4))


# ---------------------------------------------------------------- per-channel


def _scalar_per_channel(w: np.ndarray):
    n, k = w.shape
    codes = np.zeros((n, k), dtype=np.int64)
    s1s, szs = [], []
    for i in range(n):
        row = w[i].astype(np.float32)
        rng = max(float(row.max()) - float(row.min()), 1e-5)
        s1 = float(np.float16(np.float32(rng) / np.float32(15)))
        z = round(float(-np.float32(row.min()) / np.float32(s1)))
        sz = float(np.float16(np.float32(z) * np.float32(s1)))
        for j in range(k):
            codes[i, j] = min(15, max(0, round(float((row[j] + np.float32(sz)) / np.float32(s1)))))
        s1s.append(s1)
        szs.append(sz)
    return codes, np.array(s1s), np.array(szs)


def test_per_channel_matches_scalar_reference():
    torch.manual_seed(4)
    w = torch.randn(8, 96) * 0.05
    w[3] = w[3].abs() + 1.0  # all-positive row: keeps its range (z < 0, not clamped)
    qw = quantize_qoq_per_channel(w)
    codes, s1, sz = _scalar_per_channel(w.numpy())
    np.testing.assert_array_equal(qw.codes.numpy(), codes)
    np.testing.assert_array_equal(qw.scale.squeeze(1).double().numpy(), s1)
    np.testing.assert_array_equal(qw.zero.squeeze(1).double().numpy(), sz)
    assert qw.group_size == -1 and qw.zero_mode == "post" and qw.scale2 is None
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (8, 96)
    expect = qw.codes.double() * qw.scale.double() - qw.zero.double()
    torch.testing.assert_close(qw.dequantize(torch.float64), expect, rtol=0, atol=0)


def test_per_channel_error_bound():
    torch.manual_seed(5)
    w = torch.randn(64, 576) * torch.rand(64, 1) + torch.randn(64, 1)
    w[0] = torch.rand(576) + 3.0  # positive row
    w[1] = 0.5  # constant row
    qw = quantize_qoq_per_channel(w)
    s1, sz = qw.scale, qw.zero
    assert torch.equal(s1.half().float(), s1) and torch.equal(sz.half().float(), sz)
    err = (qw.dequantize() - w).abs()
    bound = 0.5 * s1 + 2.0**-10 * (sz.abs() + 15 * s1) + 1e-7
    assert bool((err <= bound).all())
    assert err[1].max().item() <= 2.0**-11  # constant row: exact up to fp16 rounding of sz
    assert int(qw.codes.max()) <= 15
