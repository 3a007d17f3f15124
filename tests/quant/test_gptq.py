"""GPTQ (qtool.quant.gptq): identity Hessian = plain quantizer; correlated inputs: lower output error."""

from __future__ import annotations

import logging

import pytest
import torch

from qtool.quant.gptq import gptq_quantize
from qtool.quant.progressive import quantize_progressive, quantize_qoq_per_channel
from qtool.quant.qweight import QuantSpec, quantize_rtn
from qtool.recipe import GPTQCfg, Recipe


def _recipe(bits=4, g=32, sym=False, scheme="rtn", pad=False, block=128, damp=0.01):
    r = Recipe()
    r.quant.w_bits, r.quant.group_size, r.quant.symmetric = bits, g, sym
    r.quant.scheme, r.quant.pad = scheme, pad
    r.quant.gptq = GPTQCfg(damp=damp, block_size=block)
    return r


def _plain(w, r):
    if r.quant.scheme == "progressive":
        if r.quant.group_size == -1:
            return quantize_qoq_per_channel(w)
        return quantize_progressive(w, group_size=r.quant.group_size, pad=r.quant.pad)
    return quantize_rtn(w, QuantSpec(r.quant.w_bits, r.quant.group_size, r.quant.symmetric, r.quant.pad))


def _weight(n=48, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g)) * 0.05


def _correlated_inputs(t=512, k=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ a
    return x * (1 + 4 * torch.rand(k, generator=g))  # unequal channel scales too


def _hessian(x):
    return 2 * x.T @ x / x.shape[0]


CASES = [
    dict(bits=4, g=32),
    dict(bits=3, g=64),
    dict(bits=4, g=32, sym=True),
    dict(bits=8, g=-1, sym=True),
    dict(bits=4, g=-1),
    dict(scheme="progressive", g=32),
    dict(scheme="progressive", g=-1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_identity_hessian_equals_plain_quantizer(case):
    w = _weight()
    r = _recipe(**case)
    got = gptq_quantize(w, torch.eye(w.shape[1]), r)
    ref = _plain(w, r)
    assert torch.equal(got.codes, ref.codes)
    assert got.codes.dtype == ref.codes.dtype
    assert torch.equal(got.scale.reshape(ref.scale.shape), ref.scale)
    for a, b in ((got.zero, ref.zero), (got.scale2, ref.scale2)):
        assert (a is None) == (b is None) and (a is None or (torch.equal(a, b) and a.dtype == b.dtype))
    assert (got.group_size, got.in_features, got.zero_mode, got.bits) == (ref.group_size, ref.in_features, ref.zero_mode, ref.bits)
    assert torch.equal(got.dequantize(), ref.dequantize())


@pytest.mark.parametrize("scheme", ["rtn", "progressive"])
def test_identity_hessian_with_padding(scheme):
    w = _weight(k=80)  # 80 = 2·32 + 16: the last group is padded
    r = _recipe(g=32, scheme=scheme, pad=True)
    got = gptq_quantize(w, torch.eye(80), r)
    ref = _plain(w, r)
    assert got.codes.shape == (48, 96) and got.in_features == 80
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.dequantize(), ref.dequantize())


@pytest.mark.parametrize("case", CASES + [dict(bits=4, g=32, pad=True)], ids=str)
def test_gptq_beats_rtn_on_correlated_inputs(case):
    k = 80 if case.get("pad") else 128
    w = _weight(k=k)
    x = _correlated_inputs(k=k)
    r = _recipe(**case)
    qg = gptq_quantize(w, _hessian(x), r)
    qr = _plain(w, r)
    y = x @ w.T
    err_g = (y - x @ qg.dequantize().T).norm()
    err_r = (y - x @ qr.dequantize().T).norm()
    assert err_g < 0.9 * err_r, (err_g, err_r)
    # codes stay in range whatever the error feedback did
    c = qg.codes.to(torch.int32)
    if r.quant.symmetric:
        assert c.min() >= -(2 ** (r.quant.w_bits - 1)) and c.max() <= 2 ** (r.quant.w_bits - 1) - 1
    else:
        assert c.min() >= 0 and c.max() <= 2 ** r.quant.w_bits - 1


def test_progressive_gptq_keeps_int8_bounds_and_s1():
    w = _weight()
    x = _correlated_inputs()
    qg = gptq_quantize(w, _hessian(x), _recipe(scheme="progressive", g=32))
    ref = quantize_progressive(w, group_size=32)
    assert torch.equal(qg.scale, ref.scale)  # s1 from the full original weight
    w8 = qg.codes.float() * qg.scale2.float().repeat_interleave(32, 1) - qg.zero.float().repeat_interleave(32, 1)
    assert w8.abs().max() <= 127 and qg.scale2.max() <= 17 and (qg.codes.int() * qg.scale2.int().repeat_interleave(32, 1)).max() <= 255


@pytest.mark.parametrize("g", [32, -1])
def test_block_size_does_not_change_the_result(g):
    """Lazy block updates are exact and group statistics see the up-to-date weights, so the result
    does not depend on the block size (group 32 vs blocks of 8, 24, 32, 128)."""
    w = _weight()
    h = _hessian(_correlated_inputs())
    outs = [gptq_quantize(w, h, _recipe(g=g, block=b)) for b in (8, 24, 32, 128)]
    for o in outs[1:]:
        agree = (o.codes == outs[0].codes).float().mean()
        assert agree > 0.999, agree
        torch.testing.assert_close(o.dequantize(), outs[0].dequantize(), rtol=0, atol=float(o.scale.max()) * 1.01)


def test_dead_columns():
    w = _weight()
    x = _correlated_inputs()
    x[:, [3, 40, 41]] = 0
    qg = gptq_quantize(w, _hessian(x), _recipe(g=32))
    deq = qg.dequantize()
    assert torch.isfinite(deq).all()
    assert deq[:, [3, 40, 41]].abs().max() <= qg.scale.max() / 2 + 1e-7  # dead columns quantize 0
    y = x @ w.T
    assert (y - x @ deq.T).norm() < (y - x @ quantize_rtn(w, QuantSpec(4, 32)).dequantize().T).norm()


def test_indefinite_hessian_falls_back_to_plain(caplog):
    w = _weight()
    r = _recipe(g=32)
    with caplog.at_level(logging.WARNING, logger="qtool.quant.gptq"):
        got = gptq_quantize(w, -torch.eye(128), r)
    assert torch.equal(got.codes, _plain(w, r).codes)
    assert "plain quantizer" in caplog.text


def test_shape_errors():
    from qtool.errors import LayoutError

    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(_weight(), torch.eye(64), _recipe())
    with pytest.raises(LayoutError):
        gptq_quantize(_weight(k=80), torch.eye(80), _recipe(g=32, pad=False))
